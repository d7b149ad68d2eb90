"""Resumable checkpoints and the final export, written atomically, read without unpickling.

A checkpoint directory `checkpoints/step_N/` holds:
- `model.safetensors`   the trained weights (the adapter for LoRA, every weight otherwise),
                         keyed by parameter name;
- `optimizer.safetensors` AdamW moments and step counts, keyed `<parameter>::<name>`;
- `rng.safetensors`     torch CPU (and CUDA) generator states;
- `trainer_state.json`  step, data position, schedule, optimizer hyper-parameters, Python and
                         numpy RNG, counters;
- `tuneplex_complete.json` written last (core's `mark_complete`): only then is it a checkpoint.
State dicts go through `torch.distributed.checkpoint.state_dict`, which gathers full tensors
from sharded (FSDP2/DTensor) models as well as plain ones. Pipeline stages each hold part of
the model: `merge` brings their parts to rank 0 for one file, and each stage loads its part.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tuneplex.errors import Problem, UsageError, first_line
from tuneplex.runs import AtomicDir, checkpoint_path, mark_complete

STATE_FILE = "trainer_state.json"

SEP = "::"


def _options(*, every_rank: bool = False, **kw):
    """Full tensors, on CPU on rank 0 only; or, `every_rank`, on every rank (pipeline stages
    other than rank 0's need their own full state to send it on)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=not every_rank, **kw)


def _cpu(tree):
    import torch

    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_cpu(v) for v in tree]
    return tree


def full_model_state(model, *, merge=None, **kw) -> dict[str, Any] | None:
    """The whole model's full state dict on rank 0 (CPU tensors); None on ranks that hold no
    whole copy. `merge(state) -> [state of each stage] | None` joins pipeline stages."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if merge is None:
        return get_model_state_dict(model, options=_options(**kw))
    parts = merge(_cpu(get_model_state_dict(model, options=_options(every_rank=True, **kw))))
    return None if parts is None else {k: v for part in parts for k, v in part.items()}


def _merge_optimizer(parts: list[dict[str, Any]]) -> dict[str, Any]:
    groups = [dict(g) for g in parts[0]["param_groups"]]
    for g in groups:
        g["params"] = []
    state: dict[str, Any] = {}
    for part in parts:
        state.update(part["state"])
        for g, pg in zip(groups, part["param_groups"], strict=True):
            g["params"] += list(pg["params"])
    return {"state": state, "param_groups": groups}


def _dedupe(tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """safetensors refuses shared storage (tied embeddings): keep one name, note the aliases."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.contiguous()
    return out, aliases


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model,
    optimizer,
    state: dict[str, Any],
    write: bool = True,
    merge=None,
) -> Path:
    """Gather the full state (a collective on every rank) and write it (on `write` ranks)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict

    options = _options(ignore_frozen_params=True, every_rank=merge is not None)
    msd, osd = get_state_dict(model, optimizer, options=options)
    target = checkpoint_path(run_dir, step)
    if merge is not None:
        parts = merge(_cpu((msd, osd)))
        if parts is None:
            return target
        msd = {k: v for m, _ in parts for k, v in m.items()}
        osd = _merge_optimizer([o for _, o in parts])
    if not write:
        return target
    weights, aliases = _dedupe(msd)
    moments = {
        f"{fqn}{SEP}{name}": t.detach().reshape(t.shape).contiguous()
        for fqn, entries in osd["state"].items()
        for name, t in entries.items()
        if isinstance(t, torch.Tensor)
    }
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    full_state = {
        **state,
        "step": step,
        "aliases": aliases,
        "param_groups": [
            {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
            for g in osd["param_groups"]
        ],
        "python_rng": _jsonable(random.getstate()),
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    with AtomicDir(target) as tmp:
        save_file(weights, str(tmp / "model.safetensors"))
        save_file(moments, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1), encoding="utf-8")
        mark_complete(tmp, step=step)
    return target


def load_checkpoint(path: Path, *, model, optimizer, partial: bool = False) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from `path`; return its trainer state.

    `partial`: the model is one pipeline stage, which takes its own part of the checkpoint."""
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_state_dict

    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        weights = load_file(str(path / "model.safetensors"))
        moments = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise UsageError(Problem(str(path), f"unreadable checkpoint: {first_line(exc)}")) from None
    for name, target in state["aliases"].items():
        weights[name] = weights[target]
    expected = {
        name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad
    }
    if partial:
        weights = {k: v for k, v in weights.items() if k in expected}
    if set(weights) != expected:
        missing = sorted(expected - set(weights))[:3]
        extra = sorted(set(weights) - expected)[:3]
        raise UsageError(
            Problem(
                str(path),
                f"checkpoint does not fit this model (missing {missing}, unexpected {extra})",
            )
        )
    per_param: dict[str, dict[str, Any]] = {}
    for key, t in moments.items():
        fqn, name = key.rsplit(SEP, 1)
        if fqn in expected:
            per_param.setdefault(fqn, {})[name] = t
    groups = [
        {**g, "params": [n for n in g["params"] if n in expected]} for g in state["param_groups"]
    ]
    osd = {"state": per_param, "param_groups": groups}
    set_state_dict(
        model,
        optimizer,
        model_state_dict=weights,
        optim_state_dict=osd,
        options=_options(strict=False),
    )
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_tupled(state["python_rng"]))
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    return state


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, tuple | list) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def export_final(
    target: Path, *, model, tokenizer, merge: bool, lora: bool, dtype: Any | None
) -> str:
    """Write `final/` in the ecosystem's formats; returns a phrase saying what it holds.

    LoRA: adapter_config.json + adapter_model.safetensors (peft). Merged LoRA: the merged
    model (config.json + safetensors) and, under adapter/, the adapter it was made from.
    Full weights: the model. Weights are cast to `dtype` (the base checkpoint's) when given.
    """
    with AtomicDir(target) as tmp:
        if lora and not merge:
            model.save_pretrained(str(tmp))
            what = "LoRA adapter: peft.PeftModel.from_pretrained(base, path)"
        else:
            if lora:
                model.save_pretrained(str(tmp / "adapter"))
                model = model.merge_and_unload()
                what = "merged model (adapter in adapter/): AutoModelForCausalLM.from_pretrained"
            else:
                what = "full model: AutoModelForCausalLM.from_pretrained(path)"
            if dtype is not None:
                model = model.to(dtype)
            model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return what


def export_run(target: Path, *, job, model, tokenizer, dist, load_dtype, dtype) -> str | None:
    """final/ from rank 0. With several processes the full weights are gathered to rank 0
    first and loaded into a CPU copy of the model (weights in `load_dtype`), which is what gets
    saved; `dtype` is the one final/ is written in (None: as trained)."""
    from tuneplex_automodel.model import apply_lora, load_model

    lora = job.training.lora
    if dist.world_size > 1:
        full = full_model_state(model, merge=stage_merger(dist))
        if not dist.is_main:
            return None
        model, _ = load_model(
            job.model,
            dtype=load_dtype,
            device="cpu",
            trust_remote_code=job.training.trust_remote_code,
        )
        if lora is not None:
            model = apply_lora(
                model, rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules
            )
        model.load_state_dict(full, strict=True)
    return export_final(
        target,
        model=model,
        tokenizer=tokenizer,
        merge=job.training.merges_adapter,
        lora=lora is not None,
        dtype=dtype,
    )


def as_pretrained(weights: Path, *, job, scratch: Path) -> Path:
    """`weights` as a directory transformers / peft load: final/ as it is; a checkpoint written
    under `scratch` — a LoRA checkpoint as a peft adapter (its config and weights, names as
    peft saves them), a full-weight one as the base's config beside its weights (linked)."""
    import os

    from safetensors import safe_open
    from safetensors.torch import save_file

    if not (weights / STATE_FILE).is_file():
        return weights
    file = weights / "model.safetensors"
    try:
        with safe_open(str(file), framework="pt") as fh:
            names = list(fh.keys())
            lora = job.training.lora
            if lora is not None:
                tensors = {_peft_name(n): fh.get_tensor(n) for n in names}
    except Exception as exc:
        raise UsageError(
            Problem(str(weights), f"unreadable checkpoint: {first_line(exc)}")
        ) from None
    scratch.mkdir(parents=True, exist_ok=True)
    if lora is not None:
        from tuneplex_automodel.model import lora_config

        config = lora_config(rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules)
        config.base_model_name_or_path = job.model
        config.save_pretrained(str(scratch))
        save_file(tensors, str(scratch / "adapter_model.safetensors"))
        return scratch
    from transformers import AutoConfig
    from tuneplex.nn.models import resolve_model_ref

    where, local = resolve_model_ref(job.model, key="model")
    config = AutoConfig.from_pretrained(
        where, local_files_only=local, trust_remote_code=job.training.trust_remote_code
    )
    config.save_pretrained(str(scratch))
    os.symlink(file.resolve(), scratch / "model.safetensors")
    return scratch


def _peft_name(name: str) -> str:
    """A LoRA parameter's name in the model (`...lora_A.default.weight`) as peft saves it in an
    adapter file (`...lora_A.weight`)."""
    for part in (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B."):
        head, sep, tail = name.partition(part)
        if sep and "." in tail:
            return head + part + tail.split(".", 1)[1]
    return name


def stage_merger(dist):
    """How state dicts of pipeline stages meet on rank 0 (None: no pipeline)."""
    if dist.dims.pp == 1:
        return None
    from tuneplex_automodel.parallel.pp import merge_stages

    return lambda state: merge_stages(state, dist=dist)
