"""Where an export goes, and how it gets there without harming what is already there.

Nothing existing is replaced without `--overwrite`; with it, only what an export would write is
replaced: a directory that a tuneplex export wrote (it holds `MARKER`) or an empty one, a file
of the kind being written. Everything is written under a temporary sibling name first and
renamed into place whole, so a failed export leaves the old output as it was and no
half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from tuneplex.errors import Problem, UsageError

MARKER = "tuneplex_export.json"
"""Written into every exported directory: what it was made from (and the proof tuneplex wrote
it, so `--overwrite` may replace it)."""
GGUF_MAGIC = b"GGUF"
OUTPUT_KEY = "--output"


def check_directory(out: Path, *, overwrite: bool) -> None:
    """Refuse `out` as a directory to write, in one line, before anything loads."""
    _check_parent(out)
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise UsageError(Problem(OUTPUT_KEY, f"{out} exists; pass --overwrite to replace it"))
    if out.is_symlink() or not out.is_dir():
        raise UsageError(Problem(OUTPUT_KEY, f"{out} exists and is not a directory"))
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise UsageError(
            Problem(
                OUTPUT_KEY,
                f"{out} holds files no tuneplex export wrote ({MARKER} is missing); "
                "--overwrite replaces only an earlier export: remove it yourself or pick "
                "another --output",
            )
        )


def check_file(out: Path, *, overwrite: bool, magic: bytes | None = None) -> None:
    """Refuse `out` as a file to write; with `magic`, an existing file is replaced only when
    it starts with those bytes (a file of the kind being written)."""
    _check_parent(out)
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise UsageError(Problem(OUTPUT_KEY, f"{out} exists; pass --overwrite to replace it"))
    if out.is_symlink() or not out.is_file():
        raise UsageError(Problem(OUTPUT_KEY, f"{out} exists and is not a regular file"))
    if magic is not None:
        with out.open("rb") as fh:
            if fh.read(len(magic)) != magic:
                raise UsageError(
                    Problem(
                        OUTPUT_KEY,
                        f"{out} is not a {magic.decode()} file; --overwrite replaces only a "
                        "file of the kind being written",
                    )
                )


def _check_parent(out: Path) -> None:
    parent = out.parent
    if not parent.is_dir():
        raise UsageError(Problem(OUTPUT_KEY, f"{parent}: no such directory"))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(Problem(OUTPUT_KEY, f"{parent}: not writable"))


def check_apart(out: Path, *, reads: list[Path]) -> None:
    """Refuse an output that is, holds, or lies inside something the export reads (the run
    directory, the model or adapter directory, the base)."""
    mine = out.resolve()
    for path in reads:
        theirs = path.resolve()
        if mine == theirs or mine.is_relative_to(theirs) or theirs.is_relative_to(mine):
            raise UsageError(Problem(OUTPUT_KEY, f"{out} overlaps {path}, which this export reads"))


@contextlib.contextmanager
def staged(outs: list[Path]) -> Iterator[list[Path]]:
    """Temporary siblings of `outs` to write; when the block succeeds each is renamed into
    place (a directory replaced by moving the old one aside first, then removing it); when it
    fails they are removed and `outs` are untouched."""
    from tuneplex.runs.checkpoints import install, remove_entry, temporary_path

    tmps = [temporary_path(out) for out in outs]
    for tmp in tmps:
        remove_entry(tmp)
    try:
        yield tmps
    except BaseException:
        for tmp in tmps:
            remove_entry(tmp)
        raise
    for out, tmp in zip(outs, tmps, strict=True):
        if tmp.exists() or tmp.is_symlink():
            install(tmp, out)


def write_marker(directory: Path, **facts) -> None:
    """Record in `directory` what it was exported from (see MARKER)."""
    from tuneplex import __version__

    body = {"tuneplex": __version__, **facts}
    (directory / MARKER).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


def size_of(path: Path) -> int:
    """Bytes in a file, or in every file under a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
