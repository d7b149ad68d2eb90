"""The v1 hyperparameter object, as users have it in their files: what `tuneplex migrate` reads.

Types, allowed values and defaults are the v1 specification's. A default of None is one v1
leaves open (or one that depends on the training type: DPO's batch size, epochs and learning
rate, filled in by `V1Hyperparameters.default`). A key written as null counts as not written.
Nothing here is a tuneplex job: `tuneplex.migrate` maps it onto one.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from tuneplex.schema.base import StrictModel

V1Optimizer = Literal[
    "adam_with_cosine_annealing",
    "adam_with_flat_lr",
    "adamw_with_cosine_annealing",
    "adamw_with_flat_lr",
]


class V1Sft(StrictModel):
    hidden_dropout: float | None = Field(default=None, ge=0, le=1)
    attention_dropout: float | None = Field(default=None, ge=0, le=1)


class V1Dpo(StrictModel):
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    ref_policy_kl_penalty: float | None = Field(default=0.05, ge=0)
    preference_loss_weight: float | None = Field(default=1.0, ge=0)
    preference_average_log_probs: bool | None = False
    sft_loss_weight: float | None = Field(default=0.0, ge=0)
    sft_average_log_probs: bool | None = False


class V1Grpo(StrictModel):
    environment: dict[str, Any]
    normalize_rewards: bool | None = True
    use_rloo: bool | None = True
    overlong_filtering: bool | None = False
    num_prompts_per_step: int | None = Field(default=1, ge=1)
    num_generations_per_prompt: int | None = Field(default=1, ge=1)
    ref_policy_kl_penalty: float | None = Field(default=0.01, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    ratio_clip_min: float | None = Field(default=0.2, ge=0)
    ratio_clip_max: float | None = Field(default=0.2, ge=0)
    ratio_clip_c: float | None = None
    use_on_policy_kl_approximation: bool | None = False
    use_importance_sampling_correction: bool | None = False
    token_level_loss: bool | None = True
    logprob_chunk_size: int | None = Field(default=1024, ge=1)
    generation_batch_size: int | None = Field(default=32, ge=1)
    generation_temperature: float | None = Field(default=1.0, ge=0, le=1)
    generation_top_p: float | None = Field(default=0.9, ge=0, le=1)
    generation_top_k: int | None = Field(default=50, ge=1)
    generation_pipeline_parallel_size: int | None = Field(default=1, ge=1)

    @field_validator("environment")
    @classmethod
    def _named(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(value.get("name"), str):
            raise ValueError("an environment is a mapping with a name")
        return value


class V1Lora(StrictModel):
    adapter_dim: int | None = Field(default=8, ge=1)
    alpha: int | None = Field(default=16, ge=1)
    adapter_dropout: float | None = Field(default=None, ge=0, lt=1)
    target_modules: list[str] | None = Field(default=None, min_length=1)


class V1Distillation(StrictModel):
    teacher: str = Field(min_length=1)


DPO_DEFAULTS = {"batch_size": 16, "epochs": 1, "learning_rate": 9e-6}
"""v1's own defaults for a DPO job, where they differ from the object's."""


class V1Hyperparameters(StrictModel):
    """The v1 `HyperparametersInput` object."""

    finetuning_type: Literal["lora", "lora_merged", "all_weights"]
    training_type: Literal["dpo", "sft", "distillation", "grpo"] | None = "sft"
    warmup_steps: int | None = Field(default=200, ge=0)
    seed: int | None = Field(default=42, ge=0)
    max_steps: int | None = -1
    optimizer: V1Optimizer | None = "adamw_with_cosine_annealing"
    adam_beta1: float | None = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float | None = Field(default=0.99, ge=0, lt=1)
    min_learning_rate: float | None = Field(default=None, ge=0)
    batch_size: int | None = Field(default=8, ge=1)
    epochs: int | None = Field(default=50, ge=1)
    learning_rate: float | None = Field(default=1e-4, gt=0)
    log_every_n_steps: int | None = Field(default=10, ge=1)
    val_check_interval: int | float | None = None
    weight_decay: float | None = Field(default=None, ge=0)
    sft: V1Sft | None = None
    dpo: V1Dpo | None = None
    grpo: V1Grpo | None = None
    lora: V1Lora | None = None
    distillation: V1Distillation | None = None
    sequence_packing_enabled: bool | None = False

    @field_validator("val_check_interval")
    @classmethod
    def _interval(cls, value: int | float | None) -> int | float | None:
        if isinstance(value, float) and not 0.1 <= value <= 1.0:
            raise ValueError(f"a fraction of an epoch is in [0.1, 1.0] (got {value})")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"a number of batches is at least 1 (got {value})")
        return value

    @property
    def kind(self) -> str:
        return self.training_type or "sft"

    def default(self, key: str) -> Any:
        """v1's default of a top-level key for this job's training type."""
        if self.kind == "dpo" and key in DPO_DEFAULTS:
            return DPO_DEFAULTS[key]
        return type(self).model_fields[key].default
