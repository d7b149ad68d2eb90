"""How long `tuneplex train` takes to stop on SIGTERM: the grace period a scheduler must give.

    python bench/stop_latency.py                              # tiny model on CPU, 1 and 2 procs
    python bench/stop_latency.py --shape llama-1b --setups lora,full --procs 1 --seq 1024

Builds a random-init model of a named shape (see train_throughput.py) and synthetic text rows,
starts `tuneplex train` in a fresh process, waits for `--after` training steps, sends SIGTERM
and times, from the signal: the checkpoint at the last completed step appearing complete,
summary.json saying `interrupted`, and the process's exit (143). With several processes it
also kills the launcher with SIGKILL and times until no worker is left. One table, medians over
`--repeats` runs. Compare the exit column with the scheduler's grace: Slurm's KillWait (30 s by
default), Kubernetes' terminationGracePeriodSeconds (30 s by default).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import SETUPS, SHAPES, build_data, build_model
from tuneplex.testing import child_pids, is_running


def job_text(work: Path, setup: str, args) -> str:
    return (
        f"model: {work / 'model'}\n"
        f"dataset: {{training: {work / 'data.jsonl'}}}\n"
        f"{SETUPS[setup]}\n"
        f"schedule: {{max_steps: {args.after + 1000}, seed: 0}}\n"
        f"batch: {{global_batch_size: {2 * args.micro}, micro_batch_size: {args.micro}}}\n"
        "optimizer: {learning_rate: 1.0e-4}\n"
        "output: {checkpoint_steps: 100000}\n"
    )


def _train_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum('"split": "train"' in line for line in path.read_text().splitlines())


def one_stop(work: Path, setup: str, procs: int, args, *, sig: int) -> dict:
    """Start a run, signal it after `args.after` steps; seconds from the signal to each event."""
    from tuneplex.runs import latest_checkpoint

    run = Path(tempfile.mkdtemp(dir=work)) / "run"
    cmd = [sys.executable, "-m", "tuneplex", "train", str(work / f"job-{setup}.yaml"), "-o"]
    cmd += [str(run), "--set", f"parallelism.num_gpus_per_node={procs}"]
    cmd += ["--set", f"training.max_seq_length={args.seq}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(run.parent / "err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    while _train_steps(run) < args.after:
        if proc.poll() is not None:
            raise SystemExit(f"{setup}: the run ended early: {(run.parent / 'err').read_text()}")
        time.sleep(0.005)
    step_s = statistics.median(
        e["tokens"] / e["tokens_per_s"]
        for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if e["split"] == "train" and e["step"] > 1 and e.get("tokens_per_s")  # after warm-up
    )
    workers = child_pids(proc.pid)
    t0 = time.perf_counter()
    os.kill(proc.pid, sig)
    times: dict[str, float] = {"step_s": step_s}
    while proc.poll() is None or (sig == signal.SIGKILL and any(map(is_running, workers))):
        now = time.perf_counter() - t0
        if "checkpoint_s" not in times and latest_checkpoint(run) is not None:
            times["checkpoint_s"] = now
        summary = run / "summary.json"
        if "summary_s" not in times and summary.is_file() and "interrupted" in summary.read_text():
            times["summary_s"] = now
        time.sleep(0.002)
    times["exit_s" if sig != signal.SIGKILL else "workers_gone_s"] = time.perf_counter() - t0
    if sig == signal.SIGTERM and proc.returncode != 143:
        raise SystemExit(f"{setup}: exit {proc.returncode}: {(run.parent / 'err').read_text()}")
    return times


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--setups", default="lora,full")
    parser.add_argument("--procs", default="1,2", help="worker processes, comma-separated")
    parser.add_argument("--after", type=int, default=3, help="steps before the signal")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tuneplex-stop-"))
    work.mkdir(parents=True, exist_ok=True)
    build_model(work / "model", args.shape)
    build_data(work / "data.jsonl", rows=64, seq=args.seq)
    rows = []
    for setup in args.setups.split(","):
        (work / f"job-{setup}.yaml").write_text(job_text(work, setup, args))
        for procs in map(int, args.procs.split(",")):
            runs = [
                one_stop(work, setup, procs, args, sig=signal.SIGTERM) for _ in range(args.repeats)
            ]
            row = {"setup": setup, "procs": procs, "workers_gone_s": None}
            for key in ("step_s", "checkpoint_s", "summary_s", "exit_s"):
                row[key] = statistics.median(r[key] for r in runs)
            if procs > 1:  # the launcher killed outright: the workers stop on their own
                killed = one_stop(work, setup, procs, args, sig=signal.SIGKILL)
                row["workers_gone_s"] = killed["workers_gone_s"]
            rows.append(row)
    _print(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


def _print(rows: list[dict], args) -> None:
    cols = ("step_s", "checkpoint_s", "summary_s", "exit_s", "workers_gone_s")
    heads = ("step", "SIGTERM→ckpt", "→summary", "→exit", "SIGKILL→no worker")
    print(f"shape {args.shape}, seq {args.seq}, medians of {args.repeats} stops (seconds)")
    print(f"{'setup':<6} {'procs':>5} " + " ".join(f"{h:>17}" for h in heads))
    for r in rows:
        cells = " ".join(f"{r[c]:>17.3f}" if r[c] is not None else f"{'-':>17}" for c in cols)
        print(f"{r['setup']:<6} {r['procs']:>5} {cells}")


if __name__ == "__main__":
    main()
