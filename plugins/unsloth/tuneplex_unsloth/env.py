"""Can unsloth train here? Answered without importing unsloth or torch."""

from __future__ import annotations

from importlib.util import find_spec

from tuneplex.backend import EnvironmentStatus
from tuneplex.hardware import visible_cuda_gpus

REQUIRED_PACKAGES = ("unsloth", "bitsandbytes", "trl", "peft")


def check_environment() -> EnvironmentStatus:
    gpus = visible_cuda_gpus()
    if not gpus:
        return EnvironmentStatus(
            False,
            "needs a CUDA GPU (unsloth's kernels run on CUDA only; none visible here); "
            "use --backend automodel to train on CPU",
        )
    missing = [p for p in REQUIRED_PACKAGES if find_spec(p) is None]
    if missing:
        return EnvironmentStatus(
            False, f"missing packages: {', '.join(missing)} (pip install 'tuneplex[unsloth]')"
        )
    return EnvironmentStatus(True, f"{gpus} CUDA GPU(s) visible; trains on one")
