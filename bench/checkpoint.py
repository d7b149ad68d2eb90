"""Checkpoint saves and final/ at DP=2 (FSDP2, gloo on CPU), full weights, fp32 + AdamW.

One `torchrun --nproc-per-node 2` per mode, each on a fresh pair of processes that take one
optimizer step (so the Adam moments exist) and then save once:

- gathered:  the old save (commit f18e156): full model + optimizer state gathered on rank 0
             (`get_state_dict(full_state_dict=True, cpu_offload=True)`), written as safetensors;
- sharded:   `Checkpointer(asynchronous=False).save` (DCP, each rank its own shards);
- async:     `Checkpointer(asynchronous=True).save`, then `wait()`;
- final-gathered: final/'s old way, the full model state dict on rank 0 (written as one file);
- final-streamed: `final_stream.stream_final`, one whole tensor at a time.

Figures, from rank 0: `peak` = the highest RSS sampled every 2 ms during the save minus the RSS
just before it, freed heap handed back to the OS first (malloc_trim): an RSS delta, on CPU;
`blocked` = how long the save call held the training loop (async: until `save` returned);
`total` = until the files were complete; the bytes each rank wrote.

    .venv/bin/python bench/checkpoint.py --shape small
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODES = ("gathered", "sharded", "async", "final-gathered", "final-streamed")


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    """Hand freed heap back to the OS (glibc), so that a save's new memory shows in the RSS
    rather than hiding in what the training step freed."""
    import ctypes

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRss:
    """The highest RSS over a block, minus the RSS at its start (sampled every 2 ms)."""

    def __enter__(self):
        _trim()
        self.base = self.peak = _rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, _rss())
        self.delta = self.peak - self.base


def _sizes(root: Path, world: int) -> list[int]:
    """Bytes each rank wrote under `root`: DCP's `__R_*` files and rng_R.json by their rank,
    everything else (metadata, trainer state, gathered files) by rank 0."""
    out = [0] * world
    for f in root.rglob("*"):
        if not f.is_file():
            continue
        rank = 0
        if f.name.startswith("__") and f.name.endswith(".distcp"):
            rank = int(f.name[2:].split("_")[0])
        elif f.name.startswith("rng_"):
            rank = int(f.stem.split("_")[1])
        out[rank] += f.stat().st_size
    return out


def _gathered_save(out: Path, *, model, optimizer, dist) -> None:
    import torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    msd, osd = get_state_dict(model, optimizer, options=options)
    if dist.is_main:
        out.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in msd.items()}, str(out / "model.safetensors"))
        moments = {
            f"{fqn}::{name}": t.contiguous()
            for fqn, entries in osd["state"].items()
            for name, t in entries.items()
            if isinstance(t, torch.Tensor) and t.dim()
        }
        save_file(moments, str(out / "optimizer.safetensors"))


def _final_gathered(out: Path, *, model, dist) -> None:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if dist.is_main:
        out.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in full.items()}, str(out / "model.safetensors"))


def worker(args) -> None:
    import torch
    import torch.distributed as tdist
    from transformers import AutoModelForCausalLM
    from tuneplex_automodel.checkpoint import Checkpointer
    from tuneplex_automodel.final_stream import stream_final
    from tuneplex_automodel.parallel.dims import ParallelDims
    from tuneplex_automodel.parallel.fsdp import apply_fsdp
    from tuneplex_automodel.parallel.mesh import init

    world = int(os.environ["WORLD_SIZE"])
    dims = ParallelDims(
        num_nodes=1, gpus_per_node=world, tp=1, pp=1, cp=1, ep=1,
        global_batch_size=world, micro_batch_size=1,
    )  # fmt: skip
    dist = init(dims, cuda=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    apply_fsdp(list(model.model.layers), root=model, mesh=dist.mesh("dp_cp"), cuda=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    out = Path(args.out)
    run = out / "run"
    tdist.barrier()
    mode = args.mode
    with PeakRss() as peak:
        start = time.perf_counter()
        if mode == "gathered":
            _gathered_save(run / "ckpt", model=model, optimizer=optimizer, dist=dist)
            blocked = time.perf_counter() - start
        elif mode in ("sharded", "async"):
            ckpt = Checkpointer(
                run_dir=run, dist=dist, asynchronous=mode == "async", keep=None,
                on_saved=lambda path, step: None,
            )  # fmt: skip
            start = time.perf_counter()
            ckpt.save(1, model=model, optimizer=optimizer, state={})
            blocked = time.perf_counter() - start
            ckpt.wait()
        elif mode == "final-gathered":
            _final_gathered(run / "final", model=model, dist=dist)
            blocked = time.perf_counter() - start
        else:
            if dist.is_main:
                (run / "final").mkdir(parents=True)
            stream_final(
                run / "final" if dist.is_main else None,
                model=model, dist=dist, lora=False, merge=False, dtype=None,
            )  # fmt: skip
            blocked = time.perf_counter() - start
        tdist.barrier()
        total = time.perf_counter() - start
    if dist.is_main:
        result = {
            "mode": mode,
            "peak_mib": peak.delta / 2**20,
            "blocked_s": blocked,
            "total_s": total,
            "bytes": _sizes(run, world),
        }
        (out / "result.json").write_text(json.dumps(result))
    tdist.destroy_process_group()


def run_mode(mode: str, *, model: Path, work: Path, procs: int) -> dict:
    out = work / mode
    out.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}",
        "--master-port=0", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
        __file__, "--worker", "--mode", mode, "--model", str(model), "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "result.json").read_text())


def table(results: list[dict]) -> str:
    base = {r["mode"]: r for r in results}
    lines = [
        "| save | rank 0 peak RSS Δ (MiB) | × gathered | blocked (s) | total (s) "
        "| bytes per rank (MiB) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ref = base.get("final-gathered" if r["mode"].startswith("final") else "gathered", r)
        ratio = r["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] > 0 else float("nan")
        written = " / ".join(f"{b / 2**20:.1f}" for b in r["bytes"])
        lines.append(
            f"| {r['mode']} | {r['peak_mib']:.1f} | {ratio:.2f} | {r['blocked_s']:.3f} | "
            f"{r['total_s']:.3f} | {written} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="small")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from train_throughput import build_model

    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        work = Path(tmp)
        model = work / "model"
        build_model(model, args.shape)
        results = [
            run_mode(m, model=model, work=work, procs=args.procs) for m in args.modes.split(",")
        ]
    print(f"DP={args.procs} (FSDP2, gloo, CPU), shape {args.shape}, fp32 weights + AdamW\n")
    print(table(results))
    print(f"\ncommand: python bench/checkpoint.py --shape {args.shape} --procs {args.procs}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
