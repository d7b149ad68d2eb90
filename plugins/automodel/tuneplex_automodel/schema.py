"""`AutomodelJobInput`: the strict job schema of the automodel backend."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator
from tuneplex.data.spec import DataSpec
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
from tuneplex.schema.grpo import (
    GrpoConfig,
    grpo_batch_problems,
    reference_setting,
    settle_grpo,
)

from tuneplex_automodel.parallel.dims import ParallelDims


class AutomodelDataset(StrictModel):
    training: str = Field(
        min_length=1,
        description="Training data: a local .jsonl/.json/.parquet file, a directory of them, or a "
        "Hugging Face dataset id.",
    )
    validation: str | None = Field(
        default=None,
        min_length=1,
        description="Validation data, same forms as `training`; null: no validation.",
    )
    prompt_template: str | None = Field(
        default=None,
        min_length=1,
        description="Jinja chat template for custom dataset schemas; null: the tokenizer's own.",
    )
    format: DataFormatName = data_format_field()
    column_mapping: ColumnMapping | None = column_mapping_field()
    text_field: str = Field(
        default="text", min_length=1, description="Row field of the text format (all trained)."
    )
    skip_invalid_rows: bool = skip_invalid_rows_field()
    chat_template: Literal["tokenizer", "passthrough"] = Field(
        default="tokenizer",
        description="tokenizer: render chats with the tokenizer's template (or prompt_template); "
        "passthrough: concatenate message contents as they are (data already rendered).",
    )

    @model_validator(mode="after")
    def _rules(self) -> AutomodelDataset:
        problems = data_format_problems(self.format, self.column_mapping)
        if self.prompt_template is not None and self.chat_template == "passthrough":
            problems.append(
                ("prompt_template", "a template contradicts chat_template: passthrough")
            )
        if problems:
            raise CrossFieldError(problems)
        return self


class AutomodelLora(StrictModel):
    rank: int = Field(
        default=16, ge=1, description="LoRA rank (low-rank dimension); higher = more capacity."
    )
    alpha: float = Field(
        default=32, gt=0, description="LoRA scaling factor; updates are scaled by alpha / rank."
    )
    merge: bool = Field(
        default=False,
        description="Merge the adapter into the base model at the end of training.",
    )
    target_modules: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Module name patterns to adapt; null: all linear layers but the output head.",
    )
    dropout: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Dropout on the input of each LoRA layer, in training only (peft's "
        "lora_dropout).",
    )
    use_dora: bool = Field(
        default=False,
        description="DoRA (weight-decomposed LoRA): also trains a magnitude per output feature "
        "of each adapted layer (peft's use_dora; ~10-20% slower). Not with tensor "
        "parallelism.",
    )


class AutomodelTraining(StrictModel):
    training_type: Literal["sft", "distillation", "dpo", "grpo"] = Field(
        default="sft",
        description="Training method: sft, distillation (from a teacher model), dpo "
        "(preference tuning on chosen/rejected pairs), grpo (reinforcement learning from "
        "rewards on prompts).",
    )
    finetuning_type: Literal["lora", "lora_merged", "all_weights"] = Field(
        default="lora",
        description="lora trains an adapter; lora_merged trains one and merges it into the base "
        "weights; all_weights trains every weight.",
    )
    lora: AutomodelLora | None = Field(
        default=None,
        description="LoRA settings; filled with defaults when finetuning_type is lora or "
        "lora_merged, refused with all_weights.",
    )
    max_seq_length: int = Field(
        default=2048, ge=1, description="Maximum tokens per sample (longer ones are truncated)."
    )
    hidden_dropout: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="Dropout on what each decoder layer's attention and MLP add to the residual "
        "stream (Megatron's hidden_dropout), in training only. null: the model's own (none for "
        "most decoder models). Data parallelism only in this version.",
    )
    attention_dropout: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="Dropout on the attention probabilities (the model config's "
        "attention_dropout), in training only. null: the model's own. Data parallelism only in "
        "this version.",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto",
        description="Compute precision. bf16: mixed precision (bf16 matmuls under autocast, "
        "fp32 master weights and optimizer for full weights, a bf16 frozen base for LoRA). "
        "auto: bf16 where the device computes it natively (CUDA GPUs with bf16, CPUs with "
        "AVX512-BF16 or AMX), fp32 elsewhere. fp32: fp32 throughout.",
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        default="none",
        description="Recompute decoder layers' activations in backward instead of keeping them: "
        "full = every layer (least memory, ~1 extra forward), selective = every second layer; "
        "none keeps all (fastest). Same loss and gradients either way.",
    )
    compile: Literal[True, False, "auto"] = Field(
        default="auto",
        description="torch.compile each decoder layer (inductor; the first steps also compile, "
        "reported as compile_s). auto: on with a CUDA GPU, off on a CPU (measured there: no "
        "gain after ~20-40 s of compiling). Same loss and gradients either way. With tensor, "
        "context, pipeline or expert parallelism: auto means off, true is refused.",
    )
    dpo: DpoConfig | None = Field(
        default=None,
        description="Preference-tuning settings; filled with defaults when training_type is "
        "dpo, refused otherwise. The reference model is the starting model: its log-"
        "probabilities of every pair are computed once, before the first step (not for the "
        "reference-free orpo and simpo).",
    )
    grpo: GrpoConfig | None = Field(
        default=None,
        description="GRPO settings; required when training_type is grpo (its environment, the "
        "reward), refused otherwise. The reference of the KL penalty is the starting model: "
        "with LoRA the base with the adapter off; with full weights a frozen copy (only when "
        "ref_policy_kl_penalty > 0).",
    )
    teacher_model: str | None = Field(
        default=None,
        min_length=1,
        description="Teacher model (local directory or Hugging Face id); required for "
        "distillation. Must share the student's tokenizer and vocabulary.",
    )
    teacher_precision: Literal["bf16", "fp16", "fp32"] = Field(
        default="bf16", description="Precision the frozen teacher is loaded in."
    )
    distillation_ratio: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Weight of the distillation loss: 0.0 = cross-entropy only, 1.0 = KD only.",
    )
    distillation_temperature: float = Field(
        default=1.0, gt=0, description="Softmax temperature for KD; higher = softer distributions."
    )
    offload_teacher: bool = Field(
        default=False, description="Keep the teacher's weights off the GPU between uses."
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Run modelling and tokenizer code shipped with the model (and teacher) "
        "checkpoints; leave off unless you trust their source.",
    )

    @model_validator(mode="after")
    def _rules(self) -> AutomodelTraining:
        problems: list[tuple[str, str]] = []
        lora_variant = self.finetuning_type in ("lora", "lora_merged")
        if not lora_variant and self.lora not in (None, AutomodelLora()):
            problems.append(
                ("lora", "only used with finetuning_type lora or lora_merged (got all_weights)")
            )
        elif not lora_variant:
            object.__setattr__(self, "lora", None)  # a block of pure defaults: harmless
        elif lora_variant:
            lora = self.lora or AutomodelLora()
            if self.finetuning_type == "lora_merged" and not lora.merge:
                if "merge" in lora.model_fields_set:
                    problems.append(
                        ("lora.merge", "false contradicts finetuning_type lora_merged; drop one")
                    )
                lora = lora.model_copy(update={"merge": True})
            object.__setattr__(self, "lora", lora)
        if self.training_type == "distillation":
            if self.teacher_model is None:
                problems.append(("teacher_model", "required when training_type is distillation"))
            if self.finetuning_type != "all_weights":
                problems.append(
                    (
                        "finetuning_type",
                        "distillation trains full weights: set finetuning_type to all_weights "
                        f"(got {self.finetuning_type})",
                    )
                )
        else:
            for key in _DISTILLATION_FIELDS:
                if getattr(self, key) != type(self).model_fields[key].default:
                    problems.append((key, "only used when training_type is distillation"))
        settle_dpo(self, problems)
        settle_grpo(self, problems)
        if self.training_type == "grpo" and self.compile is True:
            problems.append(
                ("compile", "true: grpo generates with the trained layers eagerly; leave it auto")
            )
        if problems:
            raise CrossFieldError(problems)
        return self

    @property
    def merges_adapter(self) -> bool:
        """lora_merged and `lora.merge: true` both mean: merge the adapter at the end."""
        return bool(self.lora and self.lora.merge)


_DISTILLATION_FIELDS = (
    "teacher_model",
    "teacher_precision",
    "distillation_ratio",
    "distillation_temperature",
    "offload_teacher",
)


class AutomodelSchedule(StrictModel):
    epochs: int = Field(default=1, ge=1, description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None,
        ge=1,
        description="Stop after this many optimizer steps even if `epochs` is not reached.",
    )
    val_check_interval: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Validate every this fraction of an epoch (0.5 = twice per epoch), and at "
        "the end; null: only at the end. Needs dataset.validation.",
    )
    seed: int | None = Field(
        default=None, ge=0, description="Random seed; the same seed gives the same run. null: 42."
    )


GRPO_MICRO = 8
"""A grpo job's completions per forward and backward when micro_batch_size is not given."""


class AutomodelBatch(StrictModel):
    global_batch_size: int = Field(
        default=8, ge=1, description="Samples per optimizer step, across all data-parallel ranks."
    )
    micro_batch_size: int = Field(
        default=1,
        ge=1,
        description="Samples per forward/backward pass on each device (grpo, when not given: "
        "8 completions, or the largest number that divides each rank's share).",
    )
    sequence_packing: bool = Field(
        default=False,
        description="Pack several samples into one sequence (no attention across samples).",
    )


class AutomodelOptimizer(StrictModel):
    name: Literal["adamw", "adam"] = Field(
        default="adamw",
        description="adamw: weight decay decoupled from the gradient (torch.optim.AdamW); adam: "
        "weight decay added to the gradient as an L2 term (torch.optim.Adam).",
    )
    learning_rate: float = Field(default=5e-6, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(
        default=0.01,
        ge=0,
        description="Weight decay (decoupled with adamw, L2 with adam); biases and norm "
        "weights are not decayed.",
    )
    warmup_steps: int = Field(
        default=0,
        ge=0,
        description="Linear warmup steps up to learning_rate, then the lr_schedule.",
    )
    lr_schedule: Literal["cosine", "linear", "flat"] = Field(
        default="cosine",
        description="After warmup: cosine (or linear) decay to min_learning_rate at the last "
        "step, or flat (learning_rate until the end).",
    )
    min_learning_rate: float | None = Field(
        default=None,
        ge=0,
        description="Where the cosine or linear decay ends; below learning_rate. null: 0.1 × "
        "learning_rate. Refused with lr_schedule flat.",
    )
    adam_beta1: float = Field(
        default=0.9,
        ge=0,
        lt=1,
        description="Decay rate of the moving average of gradients (momentum).",
    )
    adam_beta2: float = Field(
        default=0.999,
        ge=0,
        lt=1,
        description="Decay rate of the moving average of squared gradients.",
    )
    max_grad_norm: float = max_grad_norm_field()

    @model_validator(mode="after")
    def _rules(self) -> AutomodelOptimizer:
        low = self.min_learning_rate
        if low is not None and self.lr_schedule == "flat":
            raise CrossFieldError(
                [("min_learning_rate", "only used with lr_schedule cosine or linear (got flat)")]
            )
        if low is not None and low >= self.learning_rate:
            raise CrossFieldError(
                [
                    (
                        "min_learning_rate",
                        f"{low:g} must be below learning_rate ({self.learning_rate:g})",
                    )
                ]
            )
        return self


class AutomodelParallelism(StrictModel):
    num_nodes: int = Field(default=1, ge=1, description="Training nodes.")
    num_gpus_per_node: int = Field(
        default=1,
        ge=1,
        description="GPUs per node (worker processes per node on a machine without CUDA).",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="GPUs a layer is split across (tensor parallelism)."
    )
    pipeline_parallel_size: int = Field(
        default=1,
        ge=1,
        description="Pipeline stages the decoder layers are split into (1F1B schedule).",
    )
    context_parallel_size: int = Field(
        default=1,
        ge=1,
        description="GPUs each sequence is split across (long sequences); attention stays exact.",
    )
    expert_parallel_size: int | None = Field(
        default=None,
        ge=1,
        description="GPUs the experts of a mixture-of-experts model are split across, taken "
        "from the data-parallel ranks; must divide the number of experts and the data-parallel "
        "size. null: 1.",
    )


class AutomodelOutput(StrictModel):
    dir: str | None = output_dir_field()
    checkpoint_steps: int | None = Field(
        default=None,
        ge=1,
        description="Save a resumable checkpoint every N optimizer steps; null: at the end of "
        "each epoch.",
    )
    keep_checkpoints: int | None = keep_checkpoints_field()
    async_checkpoints: bool = Field(
        default=False,
        description="Write checkpoints in the background while the next steps train "
        "(torch.distributed.checkpoint's async save; costs a CPU copy of each rank's shards). "
        "A checkpoint counts once every rank's shards are on disk; off (torchtitan's default): "
        "the loop waits for each save.",
    )


def _regularisation_problems(
    training: AutomodelTraining, beyond: list[tuple[str, int]]
) -> list[tuple[str, str]]:
    """Dropout is proven with data parallelism only (its masks are drawn per rank); DoRA's
    magnitude needs each adapted layer's whole weight, which tensor parallelism splits."""
    problems = []
    if beyond:
        key, size = beyond[0]
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(training, name)
            if value is not None:
                problems.append(
                    (
                        f"training.{name}",
                        f"{value}: dropout overrides are proven with data parallelism only in "
                        f"this version (got {key} {size}); set it to null",
                    )
                )
    tp = dict(beyond).get("parallelism.tensor_parallel_size")
    if training.lora is not None and training.lora.use_dora and tp:
        problems.append(
            (
                "training.lora.use_dora",
                f"true: DoRA's magnitude needs each adapted layer's whole weight, which tensor "
                f"parallelism splits (got parallelism.tensor_parallel_size {tp}); set it to false",
            )
        )
    return problems


class AutomodelJobInput(JobSchema):
    """A fine-tuning job for the automodel backend."""

    backend_name = "automodel"
    resume_may_change = ("parallelism",)  # checkpoints are resharded onto the new layout

    model: str = Field(
        min_length=1,
        description="Base model to fine-tune: a local directory or a Hugging Face id.",
    )
    dataset: AutomodelDataset = Field(description="Training and validation data.")
    training: AutomodelTraining = Field(
        default_factory=AutomodelTraining, description="Training method."
    )
    schedule: AutomodelSchedule = Field(
        default_factory=AutomodelSchedule, description="How long to train, validate, seed."
    )
    batch: AutomodelBatch = Field(default_factory=AutomodelBatch, description="Batch sizes.")
    optimizer: AutomodelOptimizer = Field(
        default_factory=AutomodelOptimizer,
        description="Optimizer (AdamW or Adam) and learning-rate schedule.",
    )
    parallelism: AutomodelParallelism = Field(
        default_factory=AutomodelParallelism, description="GPUs, nodes and parallel layout."
    )
    output: AutomodelOutput = Field(
        default_factory=AutomodelOutput, description="Run directory and checkpoints."
    )
    integrations: IntegrationsConfig = Field(
        default_factory=IntegrationsConfig, description="Experiment tracking."
    )

    @model_validator(mode="after")
    def _rules(self) -> AutomodelJobInput:
        grpo = self.training.grpo
        problems: list[tuple[str, str]] = []
        if grpo is not None:
            given = "global_batch_size" in self.batch.model_fields_set
            problems += grpo_batch_problems(
                grpo,
                global_batch=self.batch.global_batch_size,
                given=given,
                key="batch.global_batch_size",
            )
            if not given:  # samples per step are prompts × generations
                object.__setattr__(self.batch, "global_batch_size", grpo.samples_per_step)
            if "micro_batch_size" not in self.batch.model_fields_set:
                # completions per forward: TRL's 8, or what divides each rank's share
                p = self.parallelism
                ranks = p.num_nodes * p.num_gpus_per_node
                per_rank = max(grpo.samples_per_step // max(ranks, 1), 1)
                object.__setattr__(self.batch, "micro_batch_size", math.gcd(GRPO_MICRO, per_rank))
        dims = self.parallel_dims()
        problems += dims.problems() if not problems else []
        beyond = [
            (f"parallelism.{key}", size)
            for key, size in (
                ("tensor_parallel_size", dims.tp),
                ("pipeline_parallel_size", dims.pp),
                ("context_parallel_size", dims.cp),
                ("expert_parallel_size", dims.ep),
            )
            if size > 1
        ]
        problems += _regularisation_problems(self.training, beyond)
        what, allowed = None, "data parallelism"
        if self.training.training_type == "distillation":
            what = "distillation runs"
        elif self.training.training_type == "dpo":
            what, allowed = "dpo runs", "data and tensor parallelism"
            beyond = [(k, n) for k, n in beyond if not k.endswith(".tensor_parallel_size")]
        elif self.training.training_type == "grpo":
            what = "grpo runs"
        elif self.training.compile is True:
            what = "training.compile: true is proven"
        for key, size in beyond if what else ():
            problems.append(
                (key, f"{size}: {what} with {allowed} only in this version; set it to 1")
            )
        if grpo is not None and not beyond and grpo.num_prompts_per_step % dims.dp:
            problems.append(
                (
                    "training.grpo.num_prompts_per_step",
                    f"{grpo.num_prompts_per_step} prompts cannot be shared evenly by "
                    f"{dims.dp} data-parallel ranks (each generates for its share); use a "
                    f"multiple of {dims.dp}",
                )
            )
        if grpo is not None and self.batch.sequence_packing:
            problems.append(
                (
                    "batch.sequence_packing",
                    "true: grpo trains on the completions it generates, unpacked; set it to false",
                )
            )
        if self.training.training_type == "dpo" and self.batch.sequence_packing:
            problems.append(
                (
                    "batch.sequence_packing",
                    "true: dpo batches each pair's chosen and rejected sides unpacked; set it "
                    "to false",
                )
            )
        if self.schedule.val_check_interval is not None and self.dataset.validation is None:
            problems.append(
                ("schedule.val_check_interval", "needs dataset.validation (no validation data)")
            )
        if problems:
            raise CrossFieldError(problems)
        return self

    def data_spec(self) -> DataSpec:
        """What the data pipeline is asked to do for this job (the backend's `data_spec`)."""
        d = self.dataset
        reference = reference_setting(self.training.grpo)
        return DataSpec(
            train=d.training,
            validation=d.validation,
            tokenizer=self.model,
            max_seq_length=self.training.max_seq_length,
            format=d.format,
            column_mapping=d.column_mapping.model_dump() if d.column_mapping else None,
            text_field=d.text_field,
            skip_invalid_rows=d.skip_invalid_rows,
            chat_template=d.prompt_template or d.chat_template,
            packing=self.batch.sequence_packing,
            preference=self.training.training_type == "dpo",
            unpaired=self.training.dpo is not None and self.training.dpo.loss_type == "kto",
            prompts=self.training.training_type == "grpo",
            reference_column=reference[0],
            reference_required=reference[1],
            trust_remote_code=self.training.trust_remote_code,
            train_key="dataset.training",
            validation_key="dataset.validation",
        )

    def parallel_dims(self) -> ParallelDims:
        p = self.parallelism
        return ParallelDims(
            num_nodes=p.num_nodes,
            gpus_per_node=p.num_gpus_per_node,
            tp=p.tensor_parallel_size,
            pp=p.pipeline_parallel_size,
            cp=p.context_parallel_size,
            ep=p.expert_parallel_size or 1,
            global_batch_size=self.batch.global_batch_size,
            micro_batch_size=self.batch.micro_batch_size,
        )
