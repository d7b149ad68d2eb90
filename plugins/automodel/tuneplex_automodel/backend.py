"""The automodel backend object: cheap members only; training imports torch lazily."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from tuneplex.backend import (
    NO_LAUNCH_OPTIONS,
    EnvironmentStatus,
    JobSettings,
    LaunchOptions,
    TrainedModel,
)
from tuneplex.data.spec import DataSpec
from tuneplex.hardware import visible_cuda_gpus
from tuneplex.memory import MemoryChange, MemoryJob

from tuneplex_automodel.schema import AutomodelJobInput

REQUIRED_PACKAGES = ("torch", "transformers", "peft", "safetensors")


class AutomodelBackend:
    name = "automodel"
    description = (
        "Production fine-tuning on PyTorch-native distributed training (FSDP2, tensor, "
        "pipeline, context, expert parallel); SFT and distillation; LoRA or full weights."
    )
    job_schema = AutomodelJobInput

    def check_environment(self) -> EnvironmentStatus:
        missing = [p for p in REQUIRED_PACKAGES if find_spec(p) is None]
        if missing:
            return EnvironmentStatus(
                False,
                f"missing packages: {', '.join(missing)} (pip install 'tuneplex[automodel]')",
            )
        gpus = visible_cuda_gpus()
        if gpus:
            return EnvironmentStatus(True, f"{gpus} CUDA GPU(s) visible (NCCL)")
        return EnvironmentStatus(True, "no CUDA GPU: trains on CPU (gloo for several processes)")

    def derived(self, job: AutomodelJobInput) -> dict[str, int]:
        return job.parallel_dims().as_dict()

    def data_spec(self, job: AutomodelJobInput) -> DataSpec:
        return job.data_spec()

    def check_launch(self, launch: LaunchOptions) -> None:
        """Every launch option applies (multi-node through torchrun's rendezvous); the
        launcher checks their combination against the job when it starts the workers."""

    def describe(self, job: AutomodelJobInput) -> JobSettings:
        t, lora = job.training, job.training.lora
        return JobSettings(
            model=job.model,
            train_data=job.dataset.training,
            validation_data=job.dataset.validation,
            training_type=t.training_type,
            finetuning_type=t.finetuning_type,
            lora_rank=lora.rank if lora else None,
            lora_alpha=lora.alpha if lora else None,
            max_seq_length=t.max_seq_length,
            learning_rate=job.optimizer.learning_rate,
            batch=job.batch.model_dump(),
            epochs=job.schedule.epochs,
            max_steps=job.schedule.max_steps,
            seed=job.schedule.seed,
        )

    def trained_model(
        self, job: AutomodelJobInput, weights: Path, *, device: str, scratch: Path
    ) -> TrainedModel:
        import torch

        from tuneplex_automodel.final import as_pretrained
        from tuneplex_automodel.trainer import pick_runtime

        runtime = pick_runtime(job, torch.device(device))
        return TrainedModel(
            path=as_pretrained(weights, job=job, scratch=scratch),
            base=job.model,
            dtype=str(runtime.dtype).removeprefix("torch."),
            autocast=str(runtime.autocast).removeprefix("torch.") if runtime.autocast else None,
            trust_remote_code=job.training.trust_remote_code,
        )

    def train(
        self,
        job: AutomodelJobInput,
        run_dir: Path,
        *,
        resume: bool = False,
        launch: LaunchOptions = NO_LAUNCH_OPTIONS,
    ) -> None:
        from tuneplex_automodel.trainer import train

        train(job, run_dir, resume=resume, data_spec=self.data_spec(job), launch_options=launch)

    def memory_job(
        self, job: AutomodelJobInput, *, base_dir: Path, device: str = "cuda", bf16: bool = True
    ) -> MemoryJob:
        """The estimator's inputs (`tuneplex plan`); no torch."""
        from tuneplex_automodel.memory import memory_job

        return memory_job(job, base_dir=base_dir, device=device, bf16=bf16)

    def memory_changes(self, job: AutomodelJobInput) -> list[MemoryChange]:
        from tuneplex_automodel.memory import memory_changes

        return memory_changes(job)
