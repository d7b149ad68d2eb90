"""The unsloth backend object: cheap members only; training imports unsloth lazily."""

from __future__ import annotations

from pathlib import Path

from tuneplex.backend import (
    NO_LAUNCH_OPTIONS,
    EnvironmentStatus,
    JobSettings,
    LaunchOptions,
    TrainedModel,
)
from tuneplex.data.spec import DataSpec
from tuneplex.errors import Problem, UsageError
from tuneplex.memory import MemoryChange, MemoryJob
from tuneplex.schema.grpo import reference_setting

from tuneplex_unsloth import env
from tuneplex_unsloth.schema import UnslothJobInput


class UnslothBackend:
    name = "unsloth"
    description = (
        "Memory-constrained single-GPU LoRA and full fine-tuning with unsloth "
        "(4-bit/8-bit loading through bitsandbytes, TRL's SFT, DPO and GRPO trainers)."
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

    def data_spec(self, job: UnslothJobInput) -> DataSpec:
        d = job.dataset
        reference_column, reference_required = reference_setting(job.training.grpo)
        return DataSpec(
            train=d.path,
            validation=d.validation_path,
            tokenizer=job.model.name,
            max_seq_length=job.model.max_seq_length,
            format=d.format,
            column_mapping=d.column_mapping.model_dump() if d.column_mapping else None,
            text_field=d.text_field,
            skip_invalid_rows=d.skip_invalid_rows,
            chat_template="tokenizer" if d.apply_chat_template else "none",
            packing=d.packing,
            preference=job.training.training_type == "dpo",
            prompts=job.training.training_type == "grpo",
            reference_column=reference_column,
            reference_required=reference_required,
            trust_remote_code=job.model.trust_remote_code,
            train_key="dataset.path",
            validation_key="dataset.validation_path",
        )

    def check_launch(self, launch: LaunchOptions) -> None:
        """Called by the CLI before the run directory is opened."""
        refuse_launch_options(launch)

    def describe(self, job: UnslothJobInput) -> JobSettings:
        t, lora = job.training, job.training.lora
        return JobSettings(
            model=job.model.name,
            train_data=job.dataset.path,
            validation_data=job.dataset.validation_path,
            training_type=t.training_type,
            finetuning_type=t.finetuning_type,
            lora_rank=lora.rank if lora else None,
            lora_alpha=lora.alpha if lora else None,
            max_seq_length=job.model.max_seq_length,
            learning_rate=job.optimizer.learning_rate,
            batch=job.batch.model_dump(),
            epochs=job.schedule.epochs,
            max_steps=job.schedule.max_steps,
            seed=job.schedule.seed,
        )

    def trained_model(
        self, job: UnslothJobInput, weights: Path, *, device: str, scratch: Path
    ) -> TrainedModel:
        """final/ and the trainer's checkpoints are peft adapters or whole models already. On
        a GPU the base loads as it trained (4/8-bit, the compute dtype); on a CPU, which
        computes neither, in its own dtype (fp32 compute)."""
        m = job.model
        on_gpu = device.startswith("cuda")
        dtype = None if m.dtype == "auto" or not on_gpu else m.dtype
        autocast = job.hardware.precision if on_gpu else None
        quantization = "4bit" if m.load_in_4bit else "8bit" if m.load_in_8bit else None
        return TrainedModel(
            path=weights,
            base=m.name,
            dtype=dtype,
            autocast={"bf16": "bfloat16", "fp16": "float16"}.get(autocast or ""),
            quantization=quantization if on_gpu else None,
            trust_remote_code=m.trust_remote_code,
        )

    def train(
        self,
        job: UnslothJobInput,
        run_dir: Path,
        *,
        resume: bool = False,
        launch: LaunchOptions = NO_LAUNCH_OPTIONS,
    ) -> None:
        refuse_launch_options(launch)  # before unsloth loads; the CLI discards the new run
        from tuneplex_unsloth.trainer import train

        train(job, run_dir, resume=resume, data_spec=self.data_spec(job))

    def memory_job(self, job: UnslothJobInput, *, base_dir: Path) -> MemoryJob:
        """The estimator's inputs (`tuneplex plan`); no torch."""
        from tuneplex_unsloth.memory import memory_job

        return memory_job(job, base_dir=base_dir)

    def memory_changes(self, job: UnslothJobInput) -> list[MemoryChange]:
        from tuneplex_unsloth.memory import memory_changes

        return memory_changes(job)


def refuse_launch_options(launch: LaunchOptions) -> None:
    """One process on one GPU: multi-node flags would be silently ignored, so they are refused."""
    given = launch.given()
    if given:
        raise UsageError(
            Problem(
                ", ".join(given),
                "the unsloth backend trains on one GPU in one process; launch options "
                "(--node-rank, --master-addr, --master-port, --rdzv-endpoint) apply to "
                "automodel only",
            )
        )
