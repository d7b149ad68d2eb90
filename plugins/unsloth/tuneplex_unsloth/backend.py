"""The unsloth backend object: cheap members only; training imports unsloth lazily."""

from __future__ import annotations

from pathlib import Path

from tuneplex.backend import EnvironmentStatus
from tuneplex.errors import TuneplexError

from tuneplex_unsloth import env
from tuneplex_unsloth.schema import UnslothJobInput


class UnslothBackend:
    name = "unsloth"
    description = (
        "Memory-constrained single-GPU LoRA and full fine-tuning with unsloth "
        "(4-bit/8-bit loading through bitsandbytes, TRL's trainer)."
    )
    job_schema = UnslothJobInput

    def check_environment(self) -> EnvironmentStatus:
        return env.check_environment()

    def derived(self, job: UnslothJobInput) -> dict[str, int | str]:
        b = job.batch
        return {
            "total_gpus": 1,
            "visible_gpus": job.hardware.gpus or "(unchanged CUDA_VISIBLE_DEVICES)",
            "effective_batch_size": b.per_device_train_batch_size * b.gradient_accumulation_steps,
        }

    def train(self, job: UnslothJobInput, run_dir: Path, *, resume: bool = False) -> None:
        raise TuneplexError(
            "unsloth: the training engine is not in this version of tuneplex-unsloth yet; "
            "`tuneplex validate --backend unsloth` checks the job"
        )
