"""GPU memory sizes: the common cards by name, and the GPUs visible now (through nvidia-smi,
never torch, so `tuneplex plan` and `validate` stay on the fast path)."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from tuneplex.errors import Problem, UsageError, one_line

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True, kw_only=True)
class Gpu:
    """One card's memory: `total` as the driver reports it (a little under the box's figure:
    an 80 GB H100 reports 79.6 GiB), `free` when read from a GPU visible now."""

    name: str
    """As the driver or the card table names it; empty for a size given alone."""
    total: int
    """Bytes."""
    free: int | None = None
    """Bytes free now; None for a card looked up by name or given by size."""

    @property
    def total_gib(self) -> float:
        return self.total / GIB


# name shown, memory.total in MiB as nvidia-smi reports it, and the names it is also known by
_CARDS: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("B200", 183_359, ("b200", "b200 180gb", "b200 192gb")),
    ("H200", 143_771, ("h200", "h200 141gb", "h200 nvl", "gh200 144gb")),
    ("H100 NVL", 95_830, ("h100 nvl", "h100 94gb", "h100 nvl 94gb")),
    ("H100 80GB", 81_559, ("h100", "h100 80gb", "h100 hbm3", "h800")),
    ("A100 80GB", 81_920, ("a100 80gb", "a800 80gb")),
    ("A100 40GB", 40_960, ("a100 40gb", "a800 40gb")),
    ("L40S", 46_068, ("l40s",)),
    ("L40", 46_068, ("l40",)),
    ("A40", 46_068, ("a40",)),
    ("RTX 6000 Ada", 49_140, ("rtx 6000 ada", "6000 ada")),
    ("RTX A6000", 49_140, ("rtx a6000", "a6000")),
    ("L4", 23_034, ("l4",)),
    ("A10G", 23_028, ("a10g",)),
    ("A10", 23_028, ("a10", "a10 24gb")),
    ("RTX 5090", 32_607, ("rtx 5090", "5090")),
    ("RTX 4090", 24_564, ("rtx 4090", "4090")),
    ("RTX 3090", 24_576, ("rtx 3090", "3090", "rtx 3090 ti", "3090 ti")),
    ("RTX 4080", 16_376, ("rtx 4080", "4080")),
    ("V100 32GB", 32_510, ("v100 32gb",)),
    ("V100 16GB", 16_160, ("v100 16gb",)),
    ("T4", 15_360, ("t4",)),
)
# words a card's name may carry that do not tell its memory apart
_NOISE = {"nvidia", "geforce", "tesla", "quadro", "gpu", "pcie", "sxm", "sxm2", "sxm4", "sxm5"}
_NOISE |= {"hbm2", "hbm2e", "hbm3", "hbm3e", "gddr6", "gddr6x", "gddr7"}


def _key(name: str) -> str:
    """`NVIDIA H100-SXM5-80GB` and `h100 80g` both become `h10080`."""
    words = re.split(r"[^a-z0-9]+", name.lower())
    words = [re.sub(r"^(\d+)g(?:b|ib)?$", r"\1", w) for w in words if w and w not in _NOISE]
    return "".join(words)


_BY_KEY: dict[str, tuple[str, int]] = {
    _key(alias): (name, mib) for name, mib, aliases in _CARDS for alias in (name, *aliases)
}


def known_gpus() -> list[str]:
    """The cards `--gpu` knows, largest first."""
    return [name for name, _, _ in _CARDS]


def find_gpu(name: str) -> Gpu:
    """The card called `name`, leniently (`h100`, `H100-80GB`, `a100-40gb`, `NVIDIA L4`); an
    unknown or ambiguous name is one line with the choices."""
    key = _key(name)
    if key in _BY_KEY:
        shown, mib = _BY_KEY[key]
        return Gpu(name=shown, total=mib * MIB)
    starting = sorted({shown for k, (shown, _) in _BY_KEY.items() if key and k.startswith(key)})
    if len(starting) == 1:
        shown, mib = next(v for k, v in _BY_KEY.items() if v[0] == starting[0])
        return Gpu(name=shown, total=mib * MIB)
    where = f"--gpu {one_line(name)}"
    if len(starting) > 1:
        raise UsageError(Problem(where, f"ambiguous: {' or '.join(starting)}"))
    near = difflib.get_close_matches(key, list(_BY_KEY), n=1, cutoff=0.6)
    hint = f"; did you mean '{_BY_KEY[near[0]][0]}'?" if near else ""
    known = ", ".join(known_gpus())
    raise UsageError(
        Problem(where, f"unknown GPU{hint} (known: {known}; or give --gpu-memory GIB)")
    )


_QUERY = "--query-gpu=index,uuid,name,memory.total,memory.free"


def visible_gpus() -> list[Gpu]:
    """The NVIDIA GPUs a CUDA program started now would see (CUDA_VISIBLE_DEVICES honoured),
    with their free memory; none when nvidia-smi is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        done = subprocess.run(
            [exe, _QUERY, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode != 0:
        return []
    rows = []
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 5:
            continue
        index, uuid, name, total, free = cells
        try:
            rows.append((index, uuid, Gpu(name=name, total=int(total) * MIB, free=int(free) * MIB)))
        except ValueError:  # `[N/A]`, `[Not Supported]`
            continue
    return _visible(rows, os.environ.get("CUDA_VISIBLE_DEVICES"))


def _visible(rows: list[tuple[str, str, Gpu]], setting: str | None) -> list[Gpu]:
    """`rows` as CUDA_VISIBLE_DEVICES orders and limits them (indices or UUID prefixes; CUDA
    stops at the first entry it cannot match)."""
    if setting is None:
        return [gpu for _, _, gpu in rows]
    chosen: list[Gpu] = []
    for entry in (e.strip() for e in setting.split(",")):
        match = [
            gpu
            for index, uuid, gpu in rows
            if entry and (entry == index or (entry.startswith("GPU-") and uuid.startswith(entry)))
        ]
        if len(match) != 1:
            break
        chosen.append(match[0])
    return chosen
