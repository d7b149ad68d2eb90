"""Checkpoints in a run directory: when one is complete, when it is damaged, which one resumes.

A checkpoint `checkpoints/step_N/` is complete only when it holds `tuneplex_complete.json`,
which tuneplex writes last (after every other file is on disk, for every backend) and which
lists each file with its size. Checkpoints are built under a temporary name and renamed into
place; pruning renames a checkpoint away before deleting it; so a crash at any moment leaves
either a whole checkpoint or debris that is never mistaken for one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

from tuneplex.errors import Problem, UsageError

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "tuneplex_complete.json"
"""Written last into a checkpoint: a directory without it was never finished."""
MARKER_FORMAT = 1

_TEMPORARY = re.compile(r"^\..+\.(tmp|old|del)-\d+$")
"""`.NAME.tmp-PID` (being written), `.NAME.old-PID` (being replaced), `.NAME.del-PID` (being
deleted): the only names tuneplex gives to things that are not finished."""


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step}"


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for p in root.iterdir():
            name = p.name
            if name.startswith("step_") and name[5:].isdigit() and p.is_dir():
                found.append((int(name[5:]), p))
    return sorted(found)


def mark_complete(directory: Path, *, step: int) -> None:
    """Write the completion marker into `directory` (every other file must be written already):
    each file's relative path and size, fsynced, so truncation is caught on resume."""
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != COMPLETE_MARKER
    }
    for name in files:
        with (directory / name).open("rb") as fh:
            os.fsync(fh.fileno())
    marker = directory / COMPLETE_MARKER
    with marker.open("w", encoding="utf-8") as fh:
        json.dump({"format": MARKER_FORMAT, "step": step, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def damage(path: Path) -> str | None:
    """Why checkpoint `path` cannot be resumed from, or None when it is intact: the marker is
    present and readable, every file it lists has its recorded size, and every safetensors
    header and JSON file parses. (Reads headers only: cheap even for large checkpoints.)"""
    marker = Path(path) / COMPLETE_MARKER
    try:
        listed = json.loads(marker.read_text(encoding="utf-8"))["files"]
        if not isinstance(listed, dict):
            raise TypeError
    except FileNotFoundError:
        return f"no {COMPLETE_MARKER} (never finished)"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return f"unreadable {COMPLETE_MARKER}"
    for name, size in listed.items():
        file = Path(path) / name
        try:
            actual = file.stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} is {actual} bytes, {size} were written (truncated?)"
        why = _unparsable(file)
        if why:
            return f"{name}: {why}"
    return None


def _unparsable(file: Path) -> str | None:
    try:
        if file.suffix == ".json":
            json.loads(file.read_text(encoding="utf-8"))
        elif file.suffix == ".safetensors":
            with file.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > file.stat().st_size - 8:
                    return "header runs past the end of the file"
                json.loads(fh.read(n))
    except (OSError, UnicodeDecodeError, ValueError, struct.error):
        return "unreadable" if file.suffix == ".safetensors" else "unreadable JSON"
    return None


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint carrying the completion marker, oldest first."""
    return [(s, p) for s, p in _step_dirs(run_dir) if (p / COMPLETE_MARKER).is_file()]


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def resume_checkpoint(run_dir: Path, *, warn: Callable[[str], None]) -> tuple[int, Path] | None:
    """The newest intact checkpoint to resume from (None, said in one `warn` line: there is
    none, start at step 0).

    Damaged newer ones are named in one `warn` line; when every checkpoint is damaged the
    resume is refused (exit 2) rather than silently restarted."""
    damaged: list[tuple[Path, str]] = []
    for step, path in reversed(_step_dirs(run_dir)):
        why = damage(path)
        if why is None:
            if damaged:
                resumed = _rel(run_dir, path)
                warn(f"tuneplex: {_describe(run_dir, damaged)}; resuming from {resumed}")
            return step, path
        damaged.append((path, why))
    if damaged:
        raise UsageError(
            Problem("--resume", f"no intact checkpoint: {_describe(run_dir, damaged)}")
        )
    warn(f"tuneplex: no checkpoint in {run_dir} yet; starting from step 0")
    return None


def _rel(run_dir: Path, path: Path) -> str:
    return str(Path(path).relative_to(run_dir))


def _describe(run_dir: Path, damaged: list[tuple[Path, str]]) -> str:
    first, why = damaged[0]
    more = f" (and {len(damaged) - 1} older, also damaged)" if len(damaged) > 1 else ""
    return f"{_rel(run_dir, first)} is damaged: {why}{more}"


class AtomicDir:
    """Build a directory under a temporary name, then rename it into place.

    `with AtomicDir(target) as tmp: ...write into tmp...` — on success `target` appears whole
    (an older `target` is replaced); on an exception the temporary directory is removed and
    `target` is untouched. A crash leaves only a `.name.tmp-PID` directory, never resumed from
    and removed by `remove_stale_temporaries`.
    """

    def __init__(self, target: Path, *, pid: int | None = None):
        self.target = Path(target)
        self.tmp = temporary_path(self.target, pid=pid)

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        install(self.tmp, self.target)


def temporary_path(target: Path, *, pid: int | None = None) -> Path:
    """Where `target` is built before `install`: `.NAME.tmp-PID`. Several processes building
    one directory (ranks writing their shards) pass the PID of the one that installs it."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp-{os.getpid() if pid is None else pid}")


def install(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` into place as `target` (an older `target` is replaced),
    after fsyncing everything in it. Files are installed the same way (a file replaced in one
    rename)."""
    _fsync_tree(tmp)
    old = None
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for p in [root] if root.is_file() else root.rglob("*"):
        if p.is_file():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())


def is_temporary(name: str) -> bool:
    return bool(_TEMPORARY.match(name))


def remove_stale_temporaries(run_dir: Path) -> list[str]:
    """Remove what a crash left half-written (`.NAME.tmp-PID` files and directories in the run
    directory and under checkpoints/). Only safe while holding the run's lock, which
    guarantees no other writer. Returns the names removed."""
    removed = []
    for parent in (Path(run_dir), Path(run_dir) / CHECKPOINTS_DIR):
        if not parent.is_dir():
            continue
        for p in parent.iterdir():
            if is_temporary(p.name):
                remove_entry(p)
                removed.append(p.name)
    return removed


def remove_entry(path: Path) -> None:
    """Delete a file, a symlink (never what it points to) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_checkpoint(path: Path) -> None:
    """Rename out of the `step_N` namespace first, so a half-deleted checkpoint is never seen."""
    doomed = path.with_name(f".{path.name}.del-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune_checkpoints(run_dir: Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints (None: keep all)."""
    if keep is None:
        return
    found = complete_checkpoints(run_dir)
    for _, path in found[: max(len(found) - keep, 0)]:
        remove_checkpoint(path)
