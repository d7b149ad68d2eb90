"""Opening a run directory: whose it is, who writes it, and what `--overwrite` may delete.

A run directory is recognised only by `.tuneplex/run.json`, which tuneplex creates with the
run (format version, run id, fingerprints of the job's input files) — never by `job.json` or
any other name a user's own folder may also hold. `train` holds an exclusive lock
(`.tuneplex/lock`, an OS file lock that dies with the process) for the whole run, so a run has
one writer. `--overwrite` deletes only the entries tuneplex writes (OWNED), and refuses
outright where a mistake would cost the user files: not a run, the job's own files inside,
`/`, the home or current directory or a parent of it, a path through a symlink.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneplex import __version__
from tuneplex.errors import Problem, UsageError, redact, show
from tuneplex.runs.checkpoints import (
    CHECKPOINTS_DIR,
    is_temporary,
    remove_entry,
    remove_stale_temporaries,
)
from tuneplex.runs.inputs import changes, fingerprints, job_inputs
from tuneplex.runs.records import (
    EVALS_DIR,
    FINAL_DIR,
    METRICS_FILE,
    ROLLOUTS_FILE,
    SUMMARY_FILE,
    write_json_atomic,
)

JOB_FILE = "job.json"
LOG_FILE = "train.log"
STATE_DIR = ".tuneplex"
MARKER = f"{STATE_DIR}/run.json"
LOCK = f"{STATE_DIR}/lock"
WORKER_LOCK = f"{STATE_DIR}/worker.lock"
"""Held by rank 0 of the workers a launcher starts: should the launcher die first (SIGKILL),
its workers still finish their stop, and no new `train` may start on the run meanwhile."""
RUN_FORMAT = 1
OWNED = (
    JOB_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    FINAL_DIR,
    LOG_FILE,
    "curves.png",
    "wandb",
    "tensorboard",
    EVALS_DIR,
    ROLLOUTS_FILE,
)
"""Entries of a run directory that tuneplex writes (and `--overwrite` replaces); checkpoints/
is emptied of checkpoints only. Anything else in the directory is the user's and stays."""


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


def is_run(run_dir: Path) -> bool:
    return (Path(run_dir) / MARKER).is_file()


@dataclass
class Run:
    """An open run directory, locked for this process until `close` (or the process ends)."""

    path: Path
    resuming: bool
    run_id: str
    lock_fd: int | None
    created: bool = False
    """Whether opening the run created the directory itself."""

    def discard(self) -> None:
        """Undo a new run that was refused before it trained: remove what tuneplex wrote (and
        the directory, if it made it and nothing else is there), so a corrected job can use
        the same --output. A resumed run is never discarded."""
        if self.resuming:
            return
        for name in OWNED:
            remove_entry(self.path / name)
        remove_entry(self.path / STATE_DIR)  # the lock file goes; our descriptor keeps the lock
        if self.created and not any(self.path.iterdir()):
            self.path.rmdir()

    def close(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # releases the flock
            self.lock_fd = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_run(
    run_dir: Path,
    *,
    job: Mapping[str, Any],
    job_file: Path,
    backend: str,
    resume: bool,
    overwrite: bool,
    note: Callable[[str], None],
    may_change: tuple[str, ...] = (),
) -> Run:
    """Make `run_dir` ready for `train` by `backend` and lock it; refuse (one line each, exit
    2, nothing touched) whatever could lose a user's file or let two trainings write one run.
    `may_change`: the job's sections a resume may change (the backend's parallel layout)."""
    if resume and overwrite:
        raise UsageError("--resume, --overwrite: choose one (continue the run or replace it)")
    where = f"--output {run_dir}"
    if (run_dir.exists() or run_dir.is_symlink()) and not run_dir.is_dir():
        raise UsageError(Problem(where, "exists and is not a directory"))
    occupied = run_dir.is_dir() and (
        is_run(run_dir) or any(p.name != STATE_DIR for p in run_dir.iterdir())
    )
    if not occupied:
        if resume:
            note(f"tuneplex: nothing to resume in {run_dir}; starting a new run")
        return _create(run_dir, job=job, backend=backend, where=where)
    if not is_run(run_dir):
        action = "resume in it" if resume else "delete anything in it" if overwrite else None
        raise UsageError(
            Problem(
                where,
                f"not a tuneplex run directory (no {MARKER}); "
                + (f"refusing to {action}" if action else "choose an empty or new directory"),
            )
        )
    if overwrite:
        _refuse_unsafe_delete(run_dir, job=job, job_file=job_file)
    fd = _lock(run_dir)
    try:
        marker = _read_marker(run_dir)
        if not (resume or overwrite):
            raise UsageError(
                Problem(
                    where,
                    "holds a tuneplex run; pass --resume to continue it or --overwrite to "
                    "replace it",
                )
            )
        if resume:
            _check_same_backend(run_dir, backend, marker)
            _check_same_job(run_dir, job, may_change=may_change)
            _check_same_inputs(run_dir, job, marker)
            remove_stale_temporaries(run_dir)
            return Run(run_dir, resuming=True, run_id=marker["run_id"], lock_fd=fd)
        kept = _clear(run_dir)
        if kept:
            shown = ", ".join(sorted(kept)[:5]) + (", ..." if len(kept) > 5 else "")
            note(f"tuneplex: kept {len(kept)} entries tuneplex did not write in {run_dir}: {shown}")
        return _start(run_dir, job=job, backend=backend, lock_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def _check_same_backend(run_dir: Path, backend: str, marker: Mapping[str, Any]) -> None:
    """A run goes on with the backend that began it (runs made before the marker named its
    backend are taken as they are)."""
    began = marker.get("backend")
    if isinstance(began, str) and began != backend:
        raise UsageError(
            Problem(
                f"--output {run_dir}",
                f"was trained by the {began} backend, not {backend}; resume it with "
                f"--backend {began}",
            )
        )


def _create(run_dir: Path, *, job: Mapping[str, Any], backend: str, where: str) -> Run:
    existed = run_dir.is_dir()
    try:
        (run_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(Problem(where, "a file is in the way of this directory")) from None
    except NotADirectoryError:
        raise UsageError(Problem(where, "cannot be a directory: a file is on its path")) from None
    except OSError as exc:
        raise UsageError(Problem(where, f"cannot create it ({exc.strerror or exc})")) from None
    fd = _lock(run_dir)
    try:
        run = _start(run_dir, job=job, backend=backend, lock_fd=fd)
        run.created = not existed
        return run
    except BaseException:
        os.close(fd)
        raise


def _start(run_dir: Path, *, job: Mapping[str, Any], backend: str, lock_fd: int) -> Run:
    """Write the marker (a new run id, the backend, the inputs' fingerprints) and job.json."""
    run_id = uuid.uuid4().hex
    marker = {
        "format": RUN_FORMAT,
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tuneplex": __version__,
        "backend": backend,
        "inputs": fingerprints(job_inputs(job), skip_under=run_dir),
    }
    try:
        write_json_atomic(run_dir / MARKER, marker)
        write_json_atomic(run_dir / JOB_FILE, dict(job))
    except OSError as exc:
        raise UsageError(
            Problem(f"--output {run_dir}", f"cannot write there ({exc.strerror or exc})")
        ) from None
    return Run(run_dir, resuming=False, run_id=run_id, lock_fd=lock_fd)


def _lock(run_dir: Path) -> int:
    """Take the run's exclusive lock, or refuse naming who holds it (a `train`, or workers a
    `train` started that are still stopping)."""
    fd = _take(run_dir, LOCK)
    try:
        os.close(_take(run_dir, WORKER_LOCK))
    except BaseException:
        os.close(fd)
        raise
    return fd


_worker_lock: int | None = None


def hold_as_worker(run_dir: Path) -> None:
    """Rank 0 of a launcher's workers: hold WORKER_LOCK until this process ends."""
    global _worker_lock
    if _worker_lock is None:
        _worker_lock = _take(Path(run_dir), WORKER_LOCK)


def _take(run_dir: Path, name: str) -> int:
    import fcntl

    path = run_dir / name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise UsageError(
            Problem(f"--output {run_dir}", f"cannot write there ({exc.strerror or exc})")
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _holder(fd)
        os.close(fd)
        raise UsageError(
            Problem(str(run_dir), f"in use by another tuneplex train ({holder})")
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    return fd


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"pid {int(info['pid'])} on host {str(info['host'])[:64]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def _read_marker(run_dir: Path) -> dict[str, Any]:
    try:
        marker = json.loads((run_dir / MARKER).read_text(encoding="utf-8"))
        if not isinstance(marker, dict) or not isinstance(marker.get("run_id"), str):
            raise ValueError
        return marker
    except (OSError, UnicodeDecodeError, ValueError):
        raise UsageError(Problem(str(run_dir / MARKER), "unreadable run marker")) from None


def _refuse_unsafe_delete(run_dir: Path, *, job: Mapping[str, Any], job_file: Path) -> None:
    given = Path(os.path.abspath(run_dir))
    real = given.resolve()
    where = f"--output {run_dir}"
    why = None
    if real == Path("/") or real == Path.home().resolve():
        why = "is / or the home directory"
    elif real == Path.cwd().resolve() or real in Path.cwd().resolve().parents:
        why = "is the current directory or one of its parents"
    elif given != real:
        why = f"is reached through a symlink (it is {real}); give the real path"
    elif _inside(Path(job_file), real):
        why = f"holds the job file {job_file}"
    else:
        for key, path in job_inputs(job).items():
            if _inside(path, real):
                why = f"holds {key} ({path})"
                break
    if why:
        raise UsageError(Problem(where, f"{why}; refusing to --overwrite it"))


def _inside(path: Path, root: Path) -> bool:
    real = path.resolve()
    return real == root or root in real.parents


def _clear(run_dir: Path) -> list[str]:
    """Delete what tuneplex wrote in a run directory; return the names of what stays."""
    kept = []
    for entry in run_dir.iterdir():
        name = entry.name
        if name == STATE_DIR:
            continue
        if name in OWNED or is_temporary(name):
            remove_entry(entry)
        elif name == CHECKPOINTS_DIR and entry.is_dir() and not entry.is_symlink():
            kept += [f"{name}/{rest}" for rest in _clear_checkpoints(entry)]
        else:
            kept.append(name)
    return kept


def _clear_checkpoints(root: Path) -> list[str]:
    kept = []
    for entry in root.iterdir():
        step = entry.name.partition("_")[2] or entry.name.partition("-")[2]
        ours = entry.name.startswith(("step_", "checkpoint-")) and step.isdigit()
        if ours or is_temporary(entry.name):
            remove_entry(entry)
        else:
            kept.append(entry.name)
    if not kept:
        root.rmdir()
    return kept


def _check_same_job(run_dir: Path, job: Mapping[str, Any], *, may_change: tuple[str, ...]) -> None:
    try:
        saved = json.loads((run_dir / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise UsageError(Problem(str(run_dir / JOB_FILE), "missing or unreadable")) from None
    diffs = [
        Problem(key, f"was {show(old)} in the run being resumed, now {show(new)}")
        for key, old, new in _diff(redact(saved), redact(job))
        if key != "output.dir" and key.split(".", 1)[0] not in may_change
    ]
    if diffs:
        last = Problem("--resume", "the job differs from the run it resumes; start a new run")
        raise UsageError([*diffs, last])


def _diff(old: Any, new: Any, prefix: str = ""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
    elif old != new:
        yield prefix, old, new


def _check_same_inputs(run_dir: Path, job: Mapping[str, Any], marker: Mapping[str, Any]) -> None:
    now = fingerprints(job_inputs(job), skip_under=run_dir)
    problems = [
        Problem(key, f"{name} {what}; start a new run or restore the file")
        for key, name, what in changes(marker.get("inputs") or {}, now)
    ]
    if problems:
        raise UsageError(problems)
