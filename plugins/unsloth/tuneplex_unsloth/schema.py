"""`UnslothJobInput`: the strict job schema of the unsloth backend."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema, field_validator, model_validator
from tuneplex.errors import CrossFieldError
from tuneplex.schema import IntegrationsConfig, JobSchema, StrictModel
from tuneplex.schema.common import (
    ColumnMapping,
    DataFormatName,
    DpoConfig,
    column_mapping_field,
    data_format_field,
    data_format_problems,
    keep_checkpoints_field,
    max_grad_norm_field,
    output_dir_field,
    settle_dpo,
    skip_invalid_rows_field,
)
from tuneplex.schema.grpo import GrpoConfig, settle_grpo

UNSLOTH_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

_GPUS_PATTERN = r"^\s*\d+\s*(,\s*\d+\s*)*$"


class UnslothModel(StrictModel):
    name: str = Field(
        min_length=1, description="Base model to fine-tune: a local directory or a Hugging Face id."
    )
    max_seq_length: int = Field(
        default=2048, ge=1, description="Maximum tokens per sample (longer ones are truncated)."
    )
    load_in_4bit: bool = Field(
        default=True,
        description="Load the base model in 4-bit (bitsandbytes NF4). Exclusive with load_in_8bit.",
    )
    load_in_8bit: bool = Field(
        default=False, description="Load the base model in 8-bit (bitsandbytes LLM.int8)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="Compute dtype; auto: bfloat16 where the GPU supports it, else float16.",
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow custom model code shipped with the checkpoint."
    )

    @model_validator(mode="after")
    def _rules(self) -> UnslothModel:
        if self.load_in_4bit and self.load_in_8bit:
            raise CrossFieldError(
                [
                    (
                        "load_in_8bit",
                        "load_in_4bit and load_in_8bit are exclusive (load_in_4bit defaults "
                        "to true); set load_in_4bit: false to load in 8-bit",
                    )
                ]
            )
        return self


class UnslothDataset(StrictModel):
    path: str = Field(
        min_length=1,
        description="Training data: a local .jsonl/.json/.parquet file, a directory of them, or a "
        "Hugging Face dataset id.",
    )
    text_field: str = Field(
        default="text", min_length=1, description="Row field holding the text to train on."
    )
    apply_chat_template: bool = Field(
        default=False,
        description="Render rows that have a `messages` field with the tokenizer's chat template.",
    )
    validation_path: str | None = Field(
        default=None,
        min_length=1,
        description="Validation data, same forms as `path`; null: no validation.",
    )
    packing: bool = Field(
        default=False,
        description="Pack several samples into one sequence (no attention across samples); "
        "sft only.",
    )
    format: DataFormatName = data_format_field()
    column_mapping: ColumnMapping | None = column_mapping_field()
    skip_invalid_rows: bool = skip_invalid_rows_field()

    @model_validator(mode="after")
    def _rules(self) -> UnslothDataset:
        problems = data_format_problems(self.format, self.column_mapping)
        if self.format == "chat" and not self.apply_chat_template:
            problems.append(("format", "chat needs apply_chat_template: true"))
        if problems:
            raise CrossFieldError(problems)
        return self


class UnslothLora(StrictModel):
    rank: int = Field(default=16, ge=1, description="LoRA rank.")
    alpha: float = Field(
        default=16, gt=0, description="LoRA scaling factor; updates are scaled by alpha / rank."
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(UNSLOTH_TARGET_MODULES),
        min_length=1,
        description="Modules to adapt; default: q_proj, k_proj, v_proj, o_proj, gate_proj, "
        "up_proj, down_proj.",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        default="none", description="Which biases train: none, all, or those of adapted layers."
    )
    use_rslora: bool = Field(
        default=False, description="Rank-stabilised LoRA: scale by alpha / sqrt(rank)."
    )
    random_state: int = Field(default=3407, ge=0, description="Seed of the adapter initialisation.")
    use_dora: bool = Field(
        default=False,
        description="DoRA (weight-decomposed LoRA): also trains a magnitude per output feature "
        "of each adapted layer (peft's use_dora; unsloth runs such layers without its fused "
        "LoRA kernels, so slower).",
    )


def _checkpointing_choice(value):
    if isinstance(value, bool) or value == "unsloth":
        return value
    raise ValueError(f"must be one of: unsloth, true, false (got {value!r})")


GradientCheckpointing = Annotated[
    Literal["unsloth"] | bool,
    BeforeValidator(_checkpointing_choice),
    WithJsonSchema({"enum": ["unsloth", True, False]}),
]


class UnslothTraining(StrictModel):
    training_type: Literal["sft", "dpo", "grpo"] = Field(
        default="sft",
        description="Training method: sft, dpo (preference tuning on chosen/rejected pairs, "
        "with TRL's DPOTrainer, or its ORPOTrainer / CPOTrainer for orpo / simpo), grpo "
        "(reinforcement learning from rewards, with TRL's GRPOTrainer).",
    )
    finetuning_type: Literal["lora", "all_weights"] = Field(
        default="lora",
        description="lora trains an adapter; all_weights trains every weight (unquantized).",
    )
    lora: UnslothLora | None = Field(
        default=None,
        description="LoRA settings; filled with defaults when finetuning_type is lora, refused "
        "with all_weights.",
    )
    use_gradient_checkpointing: GradientCheckpointing = Field(
        default="unsloth",
        description="Gradient checkpointing: unsloth (its offloaded implementation), true, false.",
    )
    dpo: DpoConfig | None = Field(
        default=None,
        description="Preference-tuning settings; filled with defaults when training_type is "
        "dpo, refused otherwise. The reference model is the starting model: with lora the "
        "base model (the adapter disabled), with all_weights a frozen copy. TRL computes the "
        "losses: preference_average_log_probs must be true for ipo and false for hinge and "
        "label_smoothing, and sft_average_log_probs false. orpo runs TRL's ORPOTrainer and "
        "simpo its CPOTrainer (cpo_alpha = sft_loss_weight), with no reference and "
        "preference_loss_weight 1; kto_pair, which no TRL trainer computes, and kto (not "
        "mapped onto TRL's KTOTrainer yet) are refused.",
    )
    grpo: GrpoConfig | None = Field(
        default=None,
        description="GRPO settings; required when training_type is grpo (its environment, the "
        "reward), refused otherwise. TRL's GRPOTrainer computes the loss; the advantages "
        "(use_rloo, normalize_rewards) are tuneplex's. TRL has no equal of "
        "use_importance_sampling_correction, of use_on_policy_kl_approximation with a KL "
        "penalty, of a ratio_clip_c at or below 1 + ratio_clip_max, nor of overlong_filtering "
        "with token_level_loss false: those are refused. Samples per step "
        "(num_prompts_per_step × num_generations_per_prompt) are "
        "batch.per_device_train_batch_size × batch.gradient_accumulation_steps, the latter "
        "derived when not given.",
    )

    @model_validator(mode="after")
    def _rules(self) -> UnslothTraining:
        problems: list[tuple[str, str]] = []
        if self.finetuning_type == "lora" and self.lora is None:
            object.__setattr__(self, "lora", UnslothLora())
        elif self.finetuning_type == "all_weights" and self.lora not in (None, UnslothLora()):
            problems.append(("lora", "only used with finetuning_type lora (got all_weights)"))
        elif self.finetuning_type == "all_weights":
            object.__setattr__(self, "lora", None)  # a block of pure defaults: harmless
        if settle_dpo(self, problems) is not None:
            problems += trl_dpo_problems(self.dpo)
        if settle_grpo(self, problems) is not None:
            problems += trl_grpo_problems(self.grpo)
        scores_with_head = {"dpo": "DPO", "grpo": "GRPO"}.get(self.training_type)
        if scores_with_head and self.lora is not None and "lm_head" in self.lora.target_modules:
            problems.append(
                (
                    "lora.target_modules",
                    f"lm_head: TRL's {scores_with_head} scores with lm_head's weight directly, so "
                    "an adapter there would never train; remove it",
                )
            )
        if problems:
            raise CrossFieldError(problems)
        return self


def trl_loss_type(dpo: DpoConfig) -> str | None:
    """TRL's name for the job's preference loss, or None where TRL has no equal of it.

    TRL's sigmoid, robust and hinge compare summed log-probabilities; its sigmoid_norm and ipo
    compare per-token averages (`preference_average_log_probs: true`). orpo is ORPOTrainer's,
    simpo CPOTrainer's loss_type simpo (both on averages, as the schema settles them); no TRL
    trainer computes kto_pair."""
    average = dpo.preference_average_log_probs
    if dpo.loss_type in ("orpo", "simpo", "kto_pair", "kto"):
        return None if dpo.loss_type in ("kto_pair", "kto") else dpo.loss_type
    if dpo.loss_type == "sigmoid" and dpo.label_smoothing:
        return None if average else "robust"
    if dpo.loss_type == "sigmoid":
        return "sigmoid_norm" if average else "sigmoid"
    if dpo.loss_type == "ipo":
        return "ipo" if average else None
    return None if average else "hinge"


def trl_dpo_problems(dpo: DpoConfig) -> list[tuple[str, str]]:
    """What TRL's trainers cannot compute, one line each (keys under `training`)."""
    problems = []
    if dpo.loss_type == "kto_pair":
        problems.append(
            (
                "dpo.loss_type",
                "kto_pair: no TRL trainer computes KTO on pairs (DPOTrainer dropped it, "
                "KTOTrainer takes unpaired rows); train it with --backend automodel",
            )
        )
    elif dpo.loss_type == "kto":
        problems.append(
            (
                "dpo.loss_type",
                "kto: not on this backend yet (TRL's KTOTrainer tokenizes its own rows and "
                "builds its KL pairs per batch, outside the pre-tokenized seam the other losses "
                "use); train it with --backend automodel",
            )
        )
    elif dpo.loss_type in ("orpo", "simpo") and dpo.preference_loss_weight != 1:
        trainer = "ORPOTrainer" if dpo.loss_type == "orpo" else "CPOTrainer"
        problems.append(
            (
                "dpo.preference_loss_weight",
                f"{dpo.preference_loss_weight:g}: TRL's {trainer} has no weight for its "
                "loss; set it to 1 (or train with --backend automodel)",
            )
        )
    elif trl_loss_type(dpo) is None and dpo.loss_type == "ipo":
        problems.append(
            (
                "dpo.preference_average_log_probs",
                "false: TRL's IPO compares per-token average log-probabilities; set it to true "
                "(or train with --backend automodel)",
            )
        )
    elif trl_loss_type(dpo) is None:
        what = "label_smoothing" if dpo.label_smoothing else f"loss_type {dpo.loss_type}"
        problems.append(
            (
                "dpo.preference_average_log_probs",
                f"true: TRL's {what} compares summed log-probabilities; set it to false "
                "(or train with --backend automodel)",
            )
        )
    if dpo.sft_average_log_probs and dpo.loss_type != "orpo":  # orpo: no SFT term of its own
        problems.append(
            (
                "dpo.sft_average_log_probs",
                "true: TRL's SFT term is the mean over the batch's chosen tokens; set it to "
                "false (or train with --backend automodel)",
            )
        )
    return problems


def trl_grpo_problems(grpo: GrpoConfig) -> list[tuple[str, str]]:
    """What TRL's GRPOTrainer cannot compute, one line each (keys under `training`)."""
    problems = []
    automodel = " (or train with --backend automodel)"
    if grpo.use_importance_sampling_correction:
        problems.append(
            (
                "grpo.use_importance_sampling_correction",
                "true: TRL generates with the trained model itself and keeps no generator "
                f"log-probabilities (its correction is for vLLM); set it to false{automodel}",
            )
        )
    if grpo.use_on_policy_kl_approximation and grpo.ref_policy_kl_penalty:
        problems.append(
            (
                "grpo.use_on_policy_kl_approximation",
                "true: TRL weights the KL by the importance ratio with its gradient "
                "(use_bias_correction_kl), not by the detached ratio this setting means; set it "
                f"to false{automodel}",
            )
        )
    c, high = grpo.ratio_clip_c, 1 + grpo.ratio_clip_max
    if c is not None and c <= high:
        problems.append(
            (
                "grpo.ratio_clip_c",
                f"{c}: TRL's dual clip (delta) equals this one only above 1 + ratio_clip_max "
                f"= {high:g}; raise it (typically 3) or set it to null{automodel}",
            )
        )
    if grpo.overlong_filtering and not grpo.token_level_loss:
        problems.append(
            (
                "grpo.overlong_filtering",
                "true with token_level_loss false: TRL's mean over completions (loss_type grpo) "
                "counts the filtered ones as zeros; set token_level_loss: true or "
                f"overlong_filtering: false{automodel}",
            )
        )
    return problems


def trl_grpo_loss_type(grpo: GrpoConfig) -> str:
    """TRL's name for the job's loss mean: dapo divides by every completion token of the step
    (token_level_loss), grpo averages the completions' own token means."""
    return "dapo" if grpo.token_level_loss else "grpo"


class UnslothSchedule(StrictModel):
    epochs: int = Field(default=1, ge=1, description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    warmup_steps: int = Field(
        default=0, ge=0, description="Linear warmup steps. Exclusive with warmup_ratio."
    )
    warmup_ratio: float | None = Field(
        default=None, ge=0, lt=1, description="Warmup as a fraction of the total steps."
    )
    lr_scheduler_type: Literal[
        "linear",
        "cosine",
        "constant",
        "constant_with_warmup",
        "cosine_with_restarts",
        "cosine_with_min_lr",
    ] = Field(
        default="linear",
        description="Learning-rate schedule after warmup (Hugging Face's): cosine decays to 0, "
        "cosine_with_min_lr to optimizer.min_learning_rate.",
    )
    logging_steps: int = Field(default=1, ge=1, description="Log metrics every N steps.")
    save_steps: int | None = Field(
        default=None, ge=1, description="Save a checkpoint every N steps; null: only at the end."
    )
    eval_steps: int | None = Field(
        default=None,
        ge=1,
        description="Evaluate every N steps (needs dataset.validation_path); null: at the end.",
    )
    seed: int = Field(default=3407, ge=0, description="Random seed.")

    @model_validator(mode="after")
    def _rules(self) -> UnslothSchedule:
        if self.warmup_ratio is not None and self.warmup_steps:
            raise CrossFieldError(
                [
                    (
                        "warmup_ratio",
                        f"warmup_steps ({self.warmup_steps}) and warmup_ratio "
                        f"({self.warmup_ratio}) are exclusive; set only one",
                    )
                ]
            )
        return self


class UnslothBatch(StrictModel):
    per_device_train_batch_size: int = Field(
        default=1, ge=1, description="Samples per forward/backward pass on the GPU."
    )
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, description="Passes accumulated before each optimizer step."
    )


class UnslothOptimizer(StrictModel):
    learning_rate: float = Field(default=2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="Decoupled weight decay.")
    optim: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd"] = (
        Field(
            default="adamw_8bit",
            description="Optimizer; the 8-bit ones keep optimizer state in 8 bits (less memory).",
        )
    )
    adam_beta1: float = Field(
        default=0.9,
        ge=0,
        lt=1,
        description="Adam's decay rate of the moving average of gradients (momentum); not "
        "used by sgd.",
    )
    adam_beta2: float = Field(
        default=0.999,
        ge=0,
        lt=1,
        description="Adam's decay rate of the moving average of squared gradients; not used by "
        "sgd.",
    )
    min_learning_rate: float | None = Field(
        default=None,
        ge=0,
        description="Where schedule.lr_scheduler_type cosine_with_min_lr ends; below "
        "learning_rate. null: 0.1 × learning_rate. Only with cosine_with_min_lr.",
    )
    max_grad_norm: float = max_grad_norm_field()

    @model_validator(mode="after")
    def _rules(self) -> UnslothOptimizer:
        problems = []
        low = self.min_learning_rate
        if low is not None and low >= self.learning_rate:
            problems.append(
                (
                    "min_learning_rate",
                    f"{low:g} must be below learning_rate ({self.learning_rate:g})",
                )
            )
        if self.optim == "sgd":
            for key in ("adam_beta1", "adam_beta2"):
                if getattr(self, key) != type(self).model_fields[key].default:
                    problems.append((key, "only used by the Adam optimizers (got optim sgd)"))
        if problems:
            raise CrossFieldError(problems)
        return self


def _gpus_to_text(value):
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


GpuList = Annotated[
    str,
    BeforeValidator(_gpus_to_text),
    WithJsonSchema(
        {"anyOf": [{"type": "string", "pattern": _GPUS_PATTERN}, {"type": "integer", "minimum": 0}]}
    ),
]


class UnslothHardware(StrictModel):
    gpus: GpuList | None = Field(
        default=None,
        description='Comma-separated GPU indices for CUDA_VISIBLE_DEVICES ("0" or "0,1"); '
        "null: leave CUDA_VISIBLE_DEVICES as it is.",
    )
    precision: Literal["bf16", "fp16"] = Field(
        default="bf16", description="Mixed-precision dtype; bf16 needs an Ampere or newer GPU."
    )

    @field_validator("gpus")
    @classmethod
    def _gpu_list(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = [p.strip() for p in value.split(",")]
        if not all(p.isdigit() for p in parts):
            raise ValueError(
                f"expected comma-separated GPU indices like '0' or '0,1' (got {value!r})"
            )
        dupes = sorted({p for p in parts if parts.count(p) > 1}, key=int)
        if dupes:
            raise ValueError(f"GPU index {', '.join(dupes)} listed twice (got {value!r})")
        return ",".join(str(int(p)) for p in parts)

    def gpu_indices(self) -> list[int]:
        return [int(p) for p in self.gpus.split(",")] if self.gpus else []


class UnslothOutput(StrictModel):
    dir: str | None = output_dir_field()
    save_method: Literal["lora", "merged_16bit", "merged_4bit"] = Field(
        default="lora",
        description="Shape of final/: lora = the adapter; merged_16bit / merged_4bit = the adapter "
        "merged into the base, saved in 16 or 4 bits (the adapter kept in final/adapter/). With "
        "all_weights the trained full model is saved (only lora is accepted there).",
    )
    keep_checkpoints: int | None = keep_checkpoints_field()


class UnslothJobInput(JobSchema):
    """A fine-tuning job for the unsloth backend (one GPU)."""

    backend_name = "unsloth"

    model: UnslothModel = Field(description="Base model and how it is loaded.")
    dataset: UnslothDataset = Field(description="Training and validation data.")
    training: UnslothTraining = Field(
        default_factory=UnslothTraining, description="Training method."
    )
    schedule: UnslothSchedule = Field(
        default_factory=UnslothSchedule, description="Length, warmup, logging and checkpoints."
    )
    batch: UnslothBatch = Field(default_factory=UnslothBatch, description="Batch sizes.")
    optimizer: UnslothOptimizer = Field(
        default_factory=UnslothOptimizer, description="Optimizer and learning rate."
    )
    hardware: UnslothHardware = Field(
        default_factory=UnslothHardware, description="GPU selection and precision."
    )
    output: UnslothOutput = Field(
        default_factory=UnslothOutput, description="Run directory and what is saved."
    )
    integrations: IntegrationsConfig = Field(
        default_factory=IntegrationsConfig, description="Experiment tracking."
    )

    @model_validator(mode="after")
    def _rules(self) -> UnslothJobInput:
        problems: list[tuple[str, str]] = []
        if self.training.finetuning_type == "all_weights":
            quantized = [k for k in ("load_in_4bit", "load_in_8bit") if getattr(self.model, k)]
            if quantized:
                problems.append(
                    (
                        f"model.{quantized[0]}",
                        "full-weight training (finetuning_type all_weights) cannot use quantized "
                        "loading; set model.load_in_4bit and model.load_in_8bit to false "
                        "(load_in_4bit defaults to true)",
                    )
                )
            if self.output.save_method != "lora":
                problems.append(
                    (
                        "output.save_method",
                        f"{self.output.save_method} merges an adapter, so it needs "
                        "finetuning_type lora (got all_weights)",
                    )
                )
        if self.training.training_type == "dpo" and self.dataset.packing:
            problems.append(
                (
                    "dataset.packing",
                    "true: dpo scores each pair's chosen and rejected sides unpacked; set it to "
                    "false",
                )
            )
        if self.training.grpo is not None:
            problems += self._grpo_problems()
        scheduler = self.schedule.lr_scheduler_type
        if self.optimizer.min_learning_rate is not None and scheduler != "cosine_with_min_lr":
            problems.append(
                (
                    "optimizer.min_learning_rate",
                    "only used with schedule.lr_scheduler_type cosine_with_min_lr "
                    f"(got {scheduler})",
                )
            )
        if self.schedule.eval_steps is not None and self.dataset.validation_path is None:
            problems.append(
                ("schedule.eval_steps", "needs dataset.validation_path (no validation data)")
            )
        if problems:
            raise CrossFieldError(problems)
        return self

    def _grpo_problems(self) -> list[tuple[str, str]]:
        """Samples per step from the batch settings (gradient accumulation derived when not
        given), and what grpo cannot use."""
        grpo, b, problems = self.training.grpo, self.batch, []
        samples, per = grpo.samples_per_step, b.per_device_train_batch_size
        product = (
            f"num_prompts_per_step × num_generations_per_prompt = {grpo.num_prompts_per_step} "
            f"× {grpo.num_generations_per_prompt} = {samples}"
        )
        if "gradient_accumulation_steps" in b.model_fields_set:
            ga = b.gradient_accumulation_steps
            if per * ga != samples:
                fix = (
                    f"leave it out (derived) or set it to {samples // per}"
                    if samples % per == 0
                    else f"set batch.per_device_train_batch_size to a divisor of {samples}"
                )
                problems.append(
                    (
                        "batch.gradient_accumulation_steps",
                        f"{ga}: per_device_train_batch_size × gradient_accumulation_steps = "
                        f"{per} × {ga} = {per * ga} contradicts training.grpo: {product}; {fix}",
                    )
                )
        elif samples % per:
            problems.append(
                (
                    "batch.per_device_train_batch_size",
                    f"{per} does not divide training.grpo's samples per step ({product}); use "
                    f"a divisor of {samples}",
                )
            )
        else:
            object.__setattr__(b, "gradient_accumulation_steps", samples // per)
        if self.dataset.packing:
            problems.append(
                (
                    "dataset.packing",
                    "true: grpo trains on the completions it generates, unpacked; set it to false",
                )
            )
        if self.dataset.validation_path is not None:
            problems.append(
                (
                    "dataset.validation_path",
                    "grpo on the unsloth backend has no validation in this version; remove it",
                )
            )
        if grpo.max_completion_length >= self.model.max_seq_length:
            problems.append(
                (
                    "training.grpo.max_completion_length",
                    f"{grpo.max_completion_length}: a prompt and its completion must fit in "
                    f"model.max_seq_length ({self.model.max_seq_length}); lower it or raise "
                    "model.max_seq_length",
                )
            )
        return problems
