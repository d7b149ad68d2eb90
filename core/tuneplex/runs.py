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
