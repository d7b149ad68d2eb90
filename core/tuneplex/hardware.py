"""What accelerators this machine has, found without importing torch (CLI fast path)."""

from __future__ import annotations

import os
from pathlib import Path

_NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")


def visible_cuda_gpus() -> int:
    """How many NVIDIA GPUs a CUDA program started now would see (0 without a driver).

    Reads the driver's /proc entries and honours CUDA_VISIBLE_DEVICES; a real CUDA
    initialisation happens later, in the process that trains.
    """
    try:
        found = sum(1 for p in _NVIDIA_PROC.iterdir() if p.is_dir())
    except OSError:
        found = 0
    if found == 0 and Path("/dev/nvidia0").exists():
        found = sum(1 for p in Path("/dev").glob("nvidia[0-9]*"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return found
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    count = 0
    for entry in entries:  # CUDA stops at the first invalid entry
        if entry.startswith("-"):
            break
        count += 1
    return min(count, found)
