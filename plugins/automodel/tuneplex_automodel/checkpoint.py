"""Resumable checkpoints in torch.distributed.checkpoint's (DCP) sharded format.

A checkpoint directory `checkpoints/step_N/` holds:
- `dcp/`                 model and optimizer state: DCP's `.metadata` and one `__R_0.distcp`
                         per rank with that rank's shards (the adapter for LoRA, every weight
                         otherwise; AdamW moments and steps keyed per parameter, so pipeline
                         stages and any sharding map onto one set of names);
- `rng_R.json`           rank R's torch (CPU, CUDA), Python and numpy generator states;
- `trainer_state.json`   step, data position, schedule, optimizer settings, the parallel
                         layout it was written with, counters (rank 0);
- `tuneplex_complete.json` written last, by rank 0 (core's `mark_complete`).

Each rank writes only its own shards, so no rank ever holds more than its shards plus (async)
one staging copy of them, and DCP reshards on load: a checkpoint resumes onto another layout.
Every rank builds the directory under one temporary name (rank 0's PID); DCP's save returns on
rank 0 only after every rank's files are written and fsynced (its closing gather), and only
then does rank 0 write the marker and rename the directory into place. An asynchronous save
(`dcp.async_save`, on a gloo group of its own) finishes in a background thread while the next
steps run; rank 0 completes it the same way once its future is done. Old-format checkpoints
(`checkpoint_legacy`) still resume.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneplex.errors import Problem, UsageError, first_line
from tuneplex.runs import (
    checkpoint_path,
    install,
    mark_complete,
    prune_checkpoints,
    temporary_path,
)

from tuneplex_automodel.checkpoint_legacy import is_legacy, load_legacy

if TYPE_CHECKING:
    from collections.abc import Callable

    from tuneplex_automodel.parallel.mesh import Dist

STATE_FILE = "trainer_state.json"
SHARDS_DIR = "dcp"
FORMAT = 2
"""`trainer_state.json`'s format: 2 is sharded (DCP); old checkpoints carry no format."""
MODEL_KEY = "model"
OPTIM_KEY = "optim"
LAYOUT_KEY = "layout"


def _options(**kw):
    """Sharded (each rank its own part), frozen weights left out, optimizer state flattened to
    one key per parameter and value, which DCP can shard and pipeline stages can share."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True, **kw)


def _state_dicts(model, optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_options())
    return {MODEL_KEY: msd, OPTIM_KEY: osd}


def layout_of(dist: Dist) -> dict[str, Any]:
    """The parallel layout a checkpoint is written with, as trainer_state.json keeps it."""
    return {"processes": dist.world_size, "shown": dist.dims.describe(), **dist.dims.as_dict()}


@dataclass
class _Pending:
    step: int
    tmp: Path
    future: Any | None
    """The async save's future (None: saved synchronously, only the marker is left)."""


class Checkpointer:
    """Saves (sync or async) and loads this run's checkpoints; one per training process.

    `saved_step` is the step of the last save begun, the same on every rank, so that every
    rank takes the same decision about saving again without a collective."""

    def __init__(
        self,
        *,
        run_dir: Path,
        dist: Dist,
        asynchronous: bool,
        keep: int | None,
        on_saved: Callable[[Path, int], None],
    ):
        self.run_dir = Path(run_dir)
        self.dist = dist
        self.asynchronous = asynchronous
        self.keep = keep
        self.on_saved = on_saved
        self.saved_step = 0
        self.pending: _Pending | None = None
        self.group = None
        self.pid = os.getpid()
        if dist.world_size > 1:
            import torch.distributed as tdist

            # a gloo group of its own: async saves run collectives from a background thread,
            # which must not interleave with training's on the default group
            self.group = tdist.new_group(backend="gloo")
            shared = [self.pid]
            tdist.broadcast_object_list(shared, src=0, group=self.group)
            self.pid = shared[0]

    # -- saving --------------------------------------------------------------------------------
    def save(self, step: int, *, model, optimizer, state: dict[str, Any]) -> None:
        """Save at `step` (on every rank): synchronously, or begun asynchronously (the previous
        async save is finished first)."""
        self.wait()
        target = checkpoint_path(self.run_dir, step)
        tmp = temporary_path(target, pid=self.pid)
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        _write_rng(tmp, rank=self.dist.rank)
        if self.dist.is_main:
            groups = [
                {k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"}
                for g in optimizer.param_groups
            ]
            full = {
                **state,
                "format": FORMAT,
                "step": step,
                LAYOUT_KEY: layout_of(self.dist),
                "param_groups": groups,
            }
            _write_json(tmp / STATE_FILE, full)
        self.saved_step = step
        states = _state_dicts(model, optimizer)
        import torch.distributed.checkpoint as dcp

        if self.asynchronous:
            future = dcp.async_save(
                states,
                storage_writer=_writer(tmp / SHARDS_DIR, staged=True),
                process_group=self.group,
                no_dist=self._no_dist,
            )
            self.pending = _Pending(step=step, tmp=tmp, future=future)
            return
        dcp.save(
            states,
            storage_writer=_writer(tmp / SHARDS_DIR),
            process_group=self.group,
            no_dist=self._no_dist,
        )
        self.pending = _Pending(step=step, tmp=tmp, future=None)
        self.wait()

    def poll(self) -> None:
        """Complete an async save whose writes are done (never blocks)."""
        pending = self.pending
        if pending is not None and (pending.future is None or pending.future.done()):
            self.wait()

    def wait(self) -> None:
        """Finish the save in flight, if any (blocks); rank 0 then marks it complete, renames
        it into place and prunes. A failed write leaves only a temporary directory."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        if pending.future is not None:
            pending.future.result()
        if not self.dist.is_main:
            return
        target = checkpoint_path(self.run_dir, pending.step)
        mark_complete(pending.tmp, step=pending.step)
        install(pending.tmp, target)
        _fsync_dir(target.parent)
        self.on_saved(target, pending.step)
        prune_checkpoints(self.run_dir, self.keep)

    def settle(self) -> None:
        """On the way out after an error: finish a save in flight if it can be; if not, its
        temporary directory stays, never counted and removed on resume."""
        try:
            self.wait()
        except Exception:  # the error on its way out is the one to report
            self.pending = None

    @property
    def _no_dist(self) -> bool:
        return self.dist.world_size == 1

    def _barrier(self) -> None:
        if self.group is not None:
            import torch.distributed as tdist

            tdist.barrier(group=self.group)

    # -- loading -------------------------------------------------------------------------------
    def load(self, path: Path, *, model, optimizer, partial: bool) -> dict[str, Any]:
        """Restore weights, optimizer and this rank's RNG from `path`; returns its trainer
        state. `partial`: the model is one pipeline stage, which takes its own part."""
        state = _read_state(path)
        if is_legacy(path):
            return load_legacy(path, model=model, optimizer=optimizer, state=state, partial=partial)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        states = _state_dicts(model, optimizer)
        metadata = read_metadata(path)
        check_fits(path, metadata=metadata, model_state=states[MODEL_KEY], partial=partial)
        try:
            dcp.load(
                states,
                storage_reader=_reader(path / SHARDS_DIR),
                process_group=self.group,
                no_dist=self._no_dist,
            )
        except Exception as exc:  # DCP wraps each rank's failure in its own error type
            raise UsageError(
                Problem(str(path), f"unreadable checkpoint: {first_line(exc)}")
            ) from None
        set_state_dict(
            model,
            optimizer,
            model_state_dict=states[MODEL_KEY],
            optim_state_dict=states[OPTIM_KEY],
            options=_options(strict=False),  # frozen weights are not in it (checked above)
        )
        _read_rng(path, rank=self.dist.rank)
        self.saved_step = int(state["step"])
        return state


# -- files -----------------------------------------------------------------------------------
def _writer(path: Path, *, staged: bool = False):
    """DCP's file writer, fsynced: the marker is written on the strength of these files being
    durable. `staged`: for an async save, which first copies this rank's shards once."""
    from torch.distributed.checkpoint import FileSystemWriter

    if not staged:
        return FileSystemWriter(str(path), sync_files=True, single_file_per_rank=True)

    class _OneCopyWriter(FileSystemWriter):
        def stage(self, state_dict):
            # DCP's default staging deep-copies each DTensor and then copies into a fresh
            # buffer: two copies of the shards, the first thrown away; this makes one
            self.per_thread_copy_ahead = 0
            return _staged(state_dict)

    return _OneCopyWriter(str(path), sync_files=True, single_file_per_rank=True)


def _staged(tree):
    """A CPU copy of every tensor of `tree` (a DTensor keeps its sharding spec), for the
    background write while training goes on changing the originals."""
    import torch
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        local = _staged(tree._local_tensor)
        return DTensor(local, tree._spec, requires_grad=False)
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _staged(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_staged(v) for v in tree)
    return tree


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path))


def read_metadata(path: Path):
    """DCP's metadata of checkpoint `path` (what every key's global shape and dtype is)."""
    try:
        return _reader(Path(path) / SHARDS_DIR).read_metadata()
    except Exception as exc:
        raise UsageError(Problem(str(path), f"unreadable checkpoint: {first_line(exc)}")) from None


def check_fits(path: Path, *, metadata, model_state: dict[str, Any], partial: bool) -> None:
    """Refuse, in one line, a checkpoint of another model (names, or shapes: a LoRA rank)."""
    prefix = MODEL_KEY + "."
    saved = {
        k[len(prefix) :]: tuple(m.size)
        for k, m in metadata.state_dict_metadata.items()
        if k.startswith(prefix) and hasattr(m, "size")
    }
    wanted = {k: tuple(t.shape) for k, t in model_state.items()}
    missing = sorted(set(wanted) - set(saved))[:3]
    extra = [] if partial else sorted(set(saved) - set(wanted))[:3]
    shapes = [
        f"{k} {list(saved[k])} vs {list(shape)}"
        for k, shape in wanted.items()
        if k in saved and saved[k] != shape
    ][:2]
    if missing or extra:
        why = f"missing {missing}, unexpected {extra}"
    elif shapes:
        why = "shapes differ: " + "; ".join(shapes)
    else:
        return
    raise UsageError(Problem(str(path), f"checkpoint does not fit this model ({why})"))


def model_tensors(path: Path) -> dict[str, Any]:
    """The weights a checkpoint holds, as full CPU tensors by parameter name, read in this one
    process (for generate / eval on a checkpoint, which load the whole model anyway)."""
    import torch
    import torch.distributed.checkpoint as dcp

    if is_legacy(path):
        from tuneplex_automodel.checkpoint_legacy import legacy_model_tensors

        return legacy_model_tensors(path)
    prefix = MODEL_KEY + "."
    tensors = {
        k[len(prefix) :]: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in read_metadata(path).state_dict_metadata.items()
        if k.startswith(prefix) and hasattr(m, "size")
    }
    dcp.load({MODEL_KEY: tensors}, storage_reader=_reader(Path(path) / SHARDS_DIR), no_dist=True)
    return tensors


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(Problem(str(path), f"unreadable checkpoint: {first_line(exc)}")) from None


def _write_json(file: Path, value: Any) -> None:
    with file.open("w", encoding="utf-8") as fh:
        json.dump(value, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _b64(t) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _write_rng(directory: Path, *, rank: int) -> None:
    """This rank's generator states (ranks draw differently: dropout, sampling)."""
    import numpy as np
    import torch

    kind, keys, *rest = np.random.get_state()
    states = {
        "torch_cpu": _b64(torch.get_rng_state()),
        "torch_cuda": _b64(torch.cuda.get_rng_state()) if torch.cuda.is_available() else None,
        "python": _lists(random.getstate()),
        "numpy": [kind, keys.tolist(), *rest],
    }
    _write_json(directory / f"rng_{rank}.json", states)


def _read_rng(path: Path, *, rank: int) -> None:
    """This rank's states; a rank the checkpoint's layout did not have takes rank 0's."""
    import numpy as np
    import torch

    file = path / f"rng_{rank}.json"
    states = json.loads((file if file.is_file() else path / "rng_0.json").read_text())

    def tensor(text: str):
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(states["torch_cpu"]))
    if states["torch_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(states["torch_cuda"]))
    random.setstate(_tuples(states["python"]))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))


def _lists(x):
    return [_lists(v) for v in x] if isinstance(x, tuple | list) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
