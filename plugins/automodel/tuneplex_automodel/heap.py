"""Freed host memory handed back to the operating system between phases that allocate
differently.

On a CPU, tensors come from the C allocator (glibc's malloc on Linux). A GRPO step alternates
generation (a KV cache, one token at a time) with training passes (whole sequences'
activations): what one phase frees lies scattered through the heap, glibc keeps it, and the
process's resident memory climbs a few hundred MiB above what is live (measured on the `small`
bench shape: 250-400 MiB). `malloc_trim(0)` hands every free page back, but walks the whole
heap to do so (milliseconds: a large share of a tiny model's step), so it runs only once the
process's anonymous resident memory has grown `RELEASE_ABOVE` past where the last release
left it. A no-op on other devices (CUDA keeps its own caching allocator) and without glibc.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

RELEASE_ABOVE = 64 << 20
"""Bytes of growth in anonymous resident memory that make a release worth its walk."""
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_floor: list[int | None] = [None]


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _anonymous_resident() -> int | None:
    """Resident bytes not backed by a file (statm's resident minus shared)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            fields = fh.read().split()
    except OSError:
        return None
    return (int(fields[1]) - int(fields[2])) * _PAGE


def release_freed(device: Any) -> None:
    """Give the heap's free pages back to the OS when `device` is the CPU and the process has
    grown `RELEASE_ABOVE` since the last release."""
    if getattr(device, "type", device) != "cpu" or _malloc_trim() is None:
        return
    now = _anonymous_resident()
    if now is None:
        return
    floor = _floor[0]
    if floor is not None and now - floor < RELEASE_ABOVE:
        _floor[0] = min(floor, now)
        return
    if floor is not None:
        _malloc_trim()(0)
        now = _anonymous_resident() or now
    _floor[0] = now
