"""The run directory every backend writes: where it is, and that we never clobber one silently."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tuneplex.errors import Problem, UsageError

JOB_FILE = "job.json"


def default_run_dir(job_path: str | Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path("runs") / f"{Path(job_path).stem}-{stamp}"


def resolve_run_dir(*, flag: str | Path | None, job_output_dir: str | None, job_path) -> Path:
    """`--output` wins over the job's output.dir, which wins over runs/<job>-<UTC time>."""
    if flag is not None:
        return Path(flag)
    if job_output_dir is not None:
        return Path(job_output_dir)
    return default_run_dir(job_path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def prepare_run_dir(run_dir: Path, *, job: dict[str, Any], resume: bool, overwrite: bool) -> bool:
    """Make `run_dir` ready and write job.json. Returns whether training resumes.

    A non-empty directory is refused unless --resume (same job, continue) or --overwrite
    (replace; only a directory tuneplex made, never an arbitrary folder).
    """
    if resume and overwrite:
        raise UsageError("--resume, --overwrite: choose one (continue the run or replace it)")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(Problem(f"--output {run_dir}", "exists and is not a directory"))
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    is_run = (run_dir / JOB_FILE).is_file()
    if occupied and not (resume or overwrite):
        raise UsageError(
            Problem(
                f"--output {run_dir}",
                "directory is not empty; pass --resume to continue that run or --overwrite "
                "to replace it",
            )
        )
    if occupied and not is_run:
        raise UsageError(
            Problem(
                f"--output {run_dir}",
                f"not a tuneplex run directory (no {JOB_FILE}); refusing to "
                + ("resume in" if resume else "delete")
                + " it",
            )
        )
    if occupied and overwrite:
        shutil.rmtree(run_dir)
    if occupied and resume:
        _check_same_job(run_dir, job)
    elif resume:
        print(f"tuneplex: nothing to resume in {run_dir}; starting a new run", file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / JOB_FILE, job)
    return occupied and resume


def _check_same_job(run_dir: Path, job: dict[str, Any]) -> None:
    try:
        saved = json.loads((run_dir / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(Problem(str(run_dir / JOB_FILE), f"unreadable: {exc}")) from None
    diffs = [
        Problem(key, f"was {old!r} in the run being resumed, now {new!r}")
        for key, old, new in _diff(saved, job)
        if key != "output.dir"
    ]
    if diffs:
        raise UsageError(
            [
                *diffs,
                Problem("--resume", "the job differs from the run it resumes; start a new run"),
            ]
        )


def _diff(old: Any, new: Any, prefix: str = ""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
    elif old != new:
        yield prefix, old, new


# -- what a backend writes into the run directory -------------------------------------------
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
COMPLETE_MARKER = "trainer_state.json"
"""Written last into a checkpoint: a directory without it was never finished."""


class MetricsLog:
    """metrics.jsonl: one JSON object per event (train step, validation, ...).

    Opened for a resumed run, events after the checkpoint's step are dropped first, so the
    file always tells the story of one run without duplicated or orphaned steps.
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None = None):
        self.path = run_dir / METRICS_FILE
        if resume_step is not None and self.path.is_file():
            kept = [
                line
                for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and _event_step(line) <= resume_step
            ]
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, **event: Any) -> None:
        self._fh.write(json.dumps(event) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _event_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:  # a line cut by a crash
        return float("inf")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_json_atomic(run_dir / SUMMARY_FILE, summary)


def peak_memory(device_type: str) -> dict[str, Any]:
    """summary.json's memory figure: CUDA max allocated on a GPU, the process's max RSS on CPU."""
    if device_type == "cuda":
        import torch

        return {
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_memory_kind": "cuda max allocated",
        }
    import resource

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_gib": round(rss_kib / 2**20, 3), "peak_memory_kind": "process max RSS"}


def run_summary(
    status: str,
    *,
    backend: str,
    header: dict[str, Any],
    steps: int,
    total_steps: int,
    epochs: float,
    train_loss: float | None,
    val_loss: float | None,
    best_val_loss: float | None,
    tokens: int,
    elapsed_s: float,
    device_type: str,
    last_checkpoint: str | None,
    **extra: Any,
) -> dict[str, Any]:
    """summary.json, the same keys for every backend (status: completed, interrupted, diverged)."""
    return {
        "status": status,
        "backend": backend,
        **header,
        "steps": steps,
        "total_steps": total_steps,
        "epochs": round(epochs, 4),
        "train_loss": train_loss,
        "val_loss": val_loss,
        "best_val_loss": best_val_loss,
        "tokens": tokens,
        "elapsed_s": round(elapsed_s, 3),
        "tokens_per_s": round(tokens / elapsed_s, 1) if elapsed_s > 0 else None,
        **peak_memory(device_type),
        "last_checkpoint": last_checkpoint,
        "final": FINAL_DIR if status == "completed" else None,
        **extra,
    }


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS_DIR / f"step_{step}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint, oldest first."""
    root = run_dir / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for p in root.iterdir():
            name = p.name
            if name.startswith("step_") and name[5:].isdigit() and (p / COMPLETE_MARKER).is_file():
                found.append((int(name[5:]), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


class AtomicDir:
    """Build a directory under a temporary name, then rename it into place.

    `with AtomicDir(target) as tmp: ...write into tmp...` — on success `target` appears whole
    (an older `target` is replaced); on an exception the temporary directory is removed and
    `target` is untouched. A crash leaves only a `.name.tmp-PID` directory, ignored by
    `complete_checkpoints` and removed by `remove_stale_temporaries`.
    """

    def __init__(self, target: Path):
        self.target = Path(target)
        self.tmp = self.target.with_name(f".{self.target.name}.tmp-{os.getpid()}")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        _fsync_tree(self.tmp)
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())


def remove_stale_temporaries(run_dir: Path) -> None:
    """Half-written checkpoints or final/ left by a crash (never complete, never resumed)."""
    for parent in (run_dir, run_dir / CHECKPOINTS_DIR):
        if parent.is_dir():
            for p in parent.iterdir():
                debris = ".tmp-" in p.name or ".old-" in p.name
                if p.is_dir() and p.name.startswith(".") and debris:
                    shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(run_dir: Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints (None: keep all)."""
    if keep is None:
        return
    found = complete_checkpoints(run_dir)
    for _, path in found[: max(len(found) - keep, 0)]:
        shutil.rmtree(path, ignore_errors=True)
