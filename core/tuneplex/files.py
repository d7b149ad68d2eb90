"""Reading the user's files safely, and telling whether they changed.

`open_regular` refuses what is no regular file (a FIFO would block, /dev/zero never ends);
`fingerprint` is the one content hash of an input file: the data cache keys and a run's record
of its inputs both use it, and a file hashed once in a process is not read again.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path
from typing import BinaryIO

from tuneplex.errors import Problem, UsageError, first_line

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
SAMPLED_ABOVE = 64 << 20
SAMPLES, SAMPLE_SIZE = 32, 64 << 10
SETTLED_S = 2.0
"""A file modified less than this long ago is hashed again each time (timestamps are coarse)."""

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def file_kind(mode: int) -> str:
    """`a named pipe`, `a character device`, ...: what a path is when it is no regular file."""
    return _KINDS.get(stat.S_IFMT(mode), "a special file")


def open_regular(path: str | os.PathLike, *, what: str) -> BinaryIO:
    """Open `path` for reading only if it is a regular file: a FIFO would block and /dev/zero
    never ends. Refusals are UsageErrors naming the path; `what` (`job file`) words them."""
    where = str(path)
    try:  # non-blocking: opening a FIFO with no writer must not hang
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise UsageError(Problem(where, "no such file")) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or first_line(exc)
        raise UsageError(Problem(where, f"cannot read it ({reason})")) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise UsageError(Problem(where, f"is a directory, not a {what}"))
        raise UsageError(Problem(where, f"not a regular file ({file_kind(mode)})"))
    return os.fdopen(fd, "rb")


_known: dict[tuple, str] = {}


def fingerprint(path: Path, *, what: str = "file") -> str:
    """Content hash of `path`. Large weight files: size, header and 32 evenly spaced blocks
    (hashing a 140 GB checkpoint on every start would cost minutes); everything else in full.
    Remembered in this process while the file's identity, size and times stay the same."""
    info = os.stat(path)
    key = (os.path.realpath(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    settled = time.time() - info.st_mtime > SETTLED_S and time.time() - info.st_ctime > SETTLED_S
    if settled and key in _known:
        return _known[key]
    digest = _hash(Path(path), info.st_size, what=what)
    if settled:
        _known[key] = digest
    return digest


def _hash(path: Path, size: int, *, what: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(size).encode() + b"\0")
    with open_regular(path, what=what) as fh:
        if size > SAMPLED_ABOVE and path.suffix.lower() in WEIGHT_SUFFIXES:
            h.update(fh.read(1 << 20))  # the header: tensor names, shapes, offsets
            for i in range(SAMPLES):
                fh.seek((size - SAMPLE_SIZE) * i // (SAMPLES - 1))
                h.update(fh.read(SAMPLE_SIZE))
            return "sampled:" + h.hexdigest()
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
