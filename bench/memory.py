"""The memory estimator (`tuneplex plan`) against the measured peak of real training steps.

    python bench/memory.py                              # every configuration below
    python bench/memory.py --configs small-lora-256,small-full-dp2-256

Each configuration trains a random-init model of a bench shape (`train_throughput.SHAPES`)
for three steps on synthetic text rows longer than `max_seq_length` (every micro-batch is
full), in fresh worker processes that run the automodel recipe (`trainer.train_here`; two
gloo processes for DP=2, started as torchrun starts them). What is measured, per rank:

- CPU: the peak of live tensor bytes of the CPU allocator, from PyTorch's profiler with
  `profile_memory=True` (every allocation and free with its size, on the thread that trains:
  the weights load on it, `HF_DEACTIVATE_ASYNC_LOAD`). The profiler starts before the model
  is loaded, so weights count (checked: the peak is at least the parameters' bytes); the
  peak is taken over the training steps (optimizer steps included, checkpoint saves
  excluded). Memory outside PyTorch's allocator (the tokenizer, arrow tables, Python
  objects) is not counted; nor does the estimate claim it.
- CUDA: `torch.cuda.max_memory_allocated` over the same steps (reset after setup), compared
  with the estimate less its fixed runtime overhead (which the allocator does not see).

The table shows the measured peak (the largest over ranks), the estimate and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt

STEPS = 3
MARK = "tuneplex.train_step"
SKIP = "tuneplex.checkpoint"


@dataclass(frozen=True)
class Config:
    name: str
    shape: str
    setup: str  # lora | full
    seq: int
    micro: int = 2
    checkpointing: str = "none"
    dp: int = 1
    accumulation: int = 1


CONFIGS = [
    Config("small-lora-256", "small", "lora", 256),
    Config("small-lora-512", "small", "lora", 512),
    Config("small-lora-ac-512", "small", "lora", 512, checkpointing="full"),
    Config("small-full-256", "small", "full", 256),
    Config("small-full-512", "small", "full", 512),
    Config("small-full-ac-512", "small", "full", 512, checkpointing="full"),
    Config("small-full-sel-512", "small", "full", 512, checkpointing="selective"),
    Config("bigvocab-lora-512", "bigvocab", "lora", 512),
    Config("bigvocab-full-256", "bigvocab", "full", 256),
    Config("bigvocab-full-ac-512", "bigvocab", "full", 512, checkpointing="full"),
    Config("small-lora-dp2-256", "small", "lora", 256, dp=2),
    Config("small-full-dp2-256", "small", "full", 256, dp=2, accumulation=2),
]
BY_SMALL = {c.name: c for c in CONFIGS}
CI_CONFIGS = [  # tests/test_memory_measured.py: seconds each
    Config("tiny-lora-512", "tiny", "lora", 512, micro=4),
    BY_SMALL["small-full-256"],
]
EXTRA_CONFIGS = [  # tiny full weights: some of its small tensors are not counted (0.87-0.93)
    Config("tiny-full-512", "tiny", "full", 512, micro=4),
    Config("tiny-full-ac-512", "tiny", "full", 512, micro=4, checkpointing="full"),
]
BY_NAME = {c.name: c for c in CONFIGS + CI_CONFIGS + EXTRA_CONFIGS}


def job_dict(work: Path, c: Config, *, precision: str = "auto") -> dict:
    training = {
        "finetuning_type": "lora" if c.setup == "lora" else "all_weights",
        "max_seq_length": c.seq,
        "activation_checkpointing": c.checkpointing,
        "precision": precision,
    }
    if c.setup == "lora":
        training["lora"] = {"rank": 16, "alpha": 32}
    return {
        "model": str(work / c.shape),
        "dataset": {"training": str(work / f"data-{c.seq}.jsonl")},
        "training": training,
        "schedule": {"max_steps": STEPS, "seed": 0},
        "batch": {
            "global_batch_size": c.micro * c.dp * c.accumulation,
            "micro_batch_size": c.micro,
        },
        "optimizer": {"learning_rate": 1.0e-4},
        "parallelism": {"num_gpus_per_node": c.dp},
    }


# -- the worker: one rank of one configuration, measured ----------------------------------------
def worker(job_json: Path, run_dir: Path, out: Path) -> None:
    """Train under the measurement; writes {"peak": bytes, "device": ..., "bf16": bool}."""
    import torch
    from tuneplex.plugins import registry
    from tuneplex.progress import quiet_third_party_logs
    from tuneplex_automodel import loop, trainer

    quiet_third_party_logs()
    cuda = torch.cuda.is_available()
    backend = registry().get("automodel").backend
    job = backend.job_schema.model_validate(json.loads(job_json.read_text()))
    windows = _mark_steps(loop.Loop, cuda=cuda)
    if cuda:
        trainer.train_here(job, run_dir, resume=False, data_spec=backend.data_spec(job))
        peak = windows["cuda_peak"]
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer.train_here(job, run_dir, resume=False, data_spec=backend.data_spec(job))
        peak = peak_in_steps(prof.profiler.kineto_results.events())
        if peak < windows["weights"]:  # allocated where the profiler did not look
            raise SystemExit(f"measured {peak} bytes, below the weights' {windows['weights']}")
    device = torch.device("cuda" if cuda else "cpu")
    result = {"peak": peak, "device": device.type, "bf16": trainer.native_bf16(device)}
    out.write_text(json.dumps(result))


def _mark_steps(cls, *, cuda: bool) -> dict:
    """Each training step inside a profiler range (`MARK`), each checkpoint save in another
    (`SKIP`); on CUDA the allocator's peak is reset before the first step and read after
    each (outside the saves)."""
    import torch
    from torch.profiler import record_function

    seen: dict = {"cuda_peak": 0}
    step, save = cls._train_step, cls._checkpoint

    def train_step(self, *args, **kwargs):
        if "weights" not in seen:  # this rank's parameters (its shards under FSDP2)
            local = [getattr(p, "_local_tensor", p) for p in self.parts.model.parameters()]
            seen["weights"] = sum(t.numel() * t.element_size() for t in local)
        if cuda and not seen.get("reset"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            seen["reset"] = True
        with record_function(MARK):
            return step(self, *args, **kwargs)

    def checkpoint(self):
        if cuda:
            torch.cuda.synchronize()
            seen["cuda_peak"] = max(seen["cuda_peak"], torch.cuda.max_memory_allocated())
        with record_function(SKIP):
            save(self)
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    cls._train_step, cls._checkpoint = train_step, checkpoint
    return seen


def peak_in_steps(events) -> int:
    """The largest running total of live CPU bytes (allocations minus frees since profiling
    began) at any moment inside a training step and outside a checkpoint save."""
    ranges = {MARK: [], SKIP: []}
    memory = []
    for e in events:
        name = e.name()
        if name == "[memory]":
            if str(e.device_type()).endswith("CPU"):
                memory.append((e.start_ns(), e.nbytes()))
        elif name in ranges:
            ranges[name].append((e.start_ns(), e.end_ns()))
    if not ranges[MARK]:
        raise SystemExit("no training step was recorded")

    def inside(t: int, name: str) -> bool:
        return any(a <= t <= b for a, b in ranges[name])

    total = peak = 0
    for t, nbytes in sorted(memory):
        total += nbytes
        if inside(t, MARK) and not inside(t, SKIP):
            peak = max(peak, total)
    starts = sorted(ranges[MARK])
    # the level at the start of the first step counts too (weights, before any allocation)
    level = sum(n for t, n in memory if t < starts[0][0])
    return max(peak, level)


# -- the driver ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(work: Path, c: Config, *, precision: str = "auto") -> list:
    """Start the worker process(es) of `c`: (process, result file) per rank."""
    run = work / f"run-{c.name}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    job_json = work / f"job-{c.name}.json"
    job_json.write_text(json.dumps(job_dict(work, c, precision=precision)))
    # the weights load on the main thread: the profiler records that thread's allocations
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DEACTIVATE_ASYNC_LOAD": "1"}
    if c.dp > 1:
        port = str(_free_port())
        env |= {"WORLD_SIZE": str(c.dp), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    procs = []
    for rank in range(c.dp):
        out = work / f"peak-{c.name}-{rank}.json"
        out.unlink(missing_ok=True)
        rank_env = env | ({"RANK": str(rank), "LOCAL_RANK": str(rank)} if c.dp > 1 else {})
        cmd = [sys.executable, __file__, "--worker", str(job_json), str(run), str(out)]
        proc = subprocess.Popen(
            cmd, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        procs.append((proc, out))
    return procs


def finish(c: Config, procs: list) -> dict:
    """Wait for `c`'s workers; the largest peak over the ranks."""
    results = []
    for proc, out in procs:
        log, _ = proc.communicate()
        if proc.returncode != 0 or not out.is_file():
            raise SystemExit(f"{c.name}: the worker failed:\n{log[-4000:]}")
        results.append(json.loads(out.read_text()))
    peak = max(r["peak"] for r in results)
    return {"peak": peak, **{k: results[0][k] for k in ("device", "bf16")}}


def measure(work: Path, c: Config, *, precision: str = "auto") -> dict:
    """Train `c` in fresh worker process(es); the largest peak over the ranks."""
    return finish(c, start(work, c, precision=precision))


def estimated(work: Path, c: Config, *, device: str, bf16: bool, precision: str = "auto"):
    """The estimate of the same job, as `tuneplex plan` makes it (less the runtime overhead,
    which no allocator sees)."""
    from tuneplex.memory import estimate
    from tuneplex_automodel.memory import memory_job
    from tuneplex_automodel.schema import AutomodelJobInput

    job = AutomodelJobInput.model_validate(job_dict(work, c, precision=precision))
    result = estimate(memory_job(job, base_dir=work, device=device, bf16=bf16))
    breakdown = {k: v for k, v in result.breakdown.items() if k != "runtime overhead"}
    return sum(breakdown.values()), breakdown


def prepare(work: Path, configs: list[Config]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    for shape in sorted({c.shape for c in configs}):
        tt.build_model(work / shape, shape)
    for seq in sorted({c.seq for c in configs}):
        data = work / f"data-{seq}.jsonl"
        if not data.is_file():
            tt.build_data(data, rows=64, seq=seq)


def run(work: Path, configs: list[Config], *, precision: str = "auto") -> list[dict]:
    prepare(work, configs)
    rows = []
    for c in configs:
        m = measure(work, c, precision=precision)
        est, breakdown = estimated(work, c, device=m["device"], bf16=m["bf16"], precision=precision)
        rows.append(
            {
                "config": c.name,
                "measured": m["peak"],
                "estimate": est,
                "ratio": est / m["peak"],
                "device": m["device"],
                "breakdown": breakdown,
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    mib = 1 << 20
    print(f"{'configuration':<22} {'measured MiB':>13} {'estimate MiB':>13} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['config']:<22} {r['measured'] / mib:>13.1f} {r['estimate'] / mib:>13.1f} "
            f"{r['ratio']:>6.3f}"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(Path(argv[1]), Path(argv[2]), Path(argv[3]))
        sys.stdout.flush()
        os._exit(0)  # as the automodel worker: no teardown race with torch's threads
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--configs", default=",".join(c.name for c in CONFIGS), help="comma-separated names"
    )
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench-memory"))
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    ap.add_argument("--json", action="store_true", help="also print each row as JSON")
    args = ap.parse_args(argv)
    configs = [BY_NAME[n] for n in args.configs.split(",")]
    rows = run(args.workdir, configs, precision=args.precision)
    print_table(rows)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    return rows


if __name__ == "__main__":
    main()
