"""Sections with the same meaning in every backend: experiment tracking."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from tuneplex.errors import CrossFieldError
from tuneplex.schema.base import StrictModel

OFF_WHEN_NULL = "x-off-when-null"
"""Marks a section whose null means off, although every field of it has a default (the job
template shows it commented out, not filled in)."""


class WandbConfig(StrictModel):
    """Weights & Biases logging. The API key is read from WANDB_API_KEY unless set here."""

    project: str = Field(min_length=1, description="W&B project the run is logged to.")
    entity: str | None = Field(
        default=None, description="W&B team or user; null: the API key's default entity."
    )
    name: str | None = Field(default=None, description="Run name; null: the run directory's name.")
    tags: list[str] = Field(default_factory=list, description="Tags attached to the run.")
    mode: Literal["online", "offline", "disabled"] = Field(
        default="online",
        description="online streams to the server; offline writes locally (`wandb sync` later).",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="API key; prefer the WANDB_API_KEY environment variable. Never printed.",
    )


class MlflowConfig(StrictModel):
    """MLflow tracking. Credentials come from MLFLOW_TRACKING_USERNAME/PASSWORD or a token."""

    tracking_uri: str = Field(
        min_length=1, description="Tracking server URI or a local path (file:./mlruns)."
    )
    experiment: str = Field(
        default="tuneplex", min_length=1, description="Experiment the run is logged under."
    )
    run_name: str | None = Field(
        default=None, description="Run name; null: the run directory's name."
    )
    tags: dict[str, str] = Field(default_factory=dict, description="Tags set on the run.")
    token: SecretStr | None = Field(
        default=None,
        description="Bearer token; prefer the MLFLOW_TRACKING_TOKEN environment variable. "
        "Never printed.",
    )


class TensorboardConfig(StrictModel):
    """TensorBoard event files, written locally: `tensorboard --logdir` reads them as they grow."""

    dir: str | None = Field(
        default=None,
        min_length=1,
        description="Directory the event files are written to; null: tensorboard/ inside the "
        "run directory.",
    )


class IntegrationsConfig(StrictModel):
    """Where metrics go besides the run directory's metrics.jsonl (always written)."""

    wandb: WandbConfig | None = Field(
        default=None, description="Log metrics to Weights & Biases; null: off."
    )
    mlflow: MlflowConfig | None = Field(
        default=None, description="Log metrics to MLflow; null: off."
    )
    tensorboard: TensorboardConfig | None = Field(
        default=None,
        description="Write TensorBoard event files; null: off ({} turns it on).",
        json_schema_extra={OFF_WHEN_NULL: True},
    )


def output_dir_field():
    """The run-directory field, worded once for every backend's output section."""
    return Field(
        default=None,
        min_length=1,
        description="Run directory (job.json, metrics.jsonl, checkpoints/, final/). "
        "`tuneplex train --output` takes precedence; null: runs/<job file name>-<UTC time>.",
    )


def keep_checkpoints_field():
    return Field(
        default=None,
        ge=1,
        description="Keep only the newest N step checkpoints (older ones are deleted once a newer "
        "one is complete); null: keep all.",
    )


DataFormatName = Literal["auto", "prompt_completion", "column_mapped", "chat", "text"]


def data_format_field():
    return Field(
        default="auto",
        description="Row format: auto (detected per row: messages -> chat, input/output or "
        "prompt/completion -> prompt_completion, column_mapping -> column_mapped, the text "
        "field -> text), or one of them forced.",
    )


def skip_invalid_rows_field():
    return Field(
        default=False,
        description="Leave out rows that cannot be read, rendered by the chat template or masked "
        "(counted in the data stats, summary.json and `tuneplex data inspect`); false: such rows "
        "stop the job, all of them listed.",
    )


class ColumnMapping(StrictModel):
    """Which columns of an instruction dataset hold the context, question and answer."""

    context: str | None = Field(
        default=None, min_length=1, description="Column with optional context (prepended)."
    )
    question: str = Field(min_length=1, description="Column with the instruction / question.")
    answer: str = Field(min_length=1, description="Column with the answer (the trained part).")


def column_mapping_field():
    return Field(
        default=None,
        description="Map your columns to context / question / answer (column_mapped format); "
        "null: use input/output, prompt/completion or messages as found.",
    )


def data_format_problems(fmt: str, mapping: ColumnMapping | None) -> list[tuple[str, str]]:
    """The rules between `format` and `column_mapping`, worded once for both backends."""
    if fmt == "column_mapped" and mapping is None:
        return [("column_mapping", "required when format is column_mapped")]
    if mapping is not None and fmt not in ("auto", "column_mapped"):
        return [("column_mapping", f"only used with format auto or column_mapped (got {fmt})")]
    return []


class DpoConfig(StrictModel):
    """`training.dpo`: preference tuning (names from the hyperparameter object's dpo section)."""

    ref_policy_kl_penalty: float = Field(
        default=0.05,
        gt=0,
        description="β, the preference strength of every loss_type (TRL's beta): for sigmoid, "
        "ipo, hinge, kto_pair and kto how strongly the policy is held to the reference model "
        "(higher = closer); for orpo the weight λ of the odds-ratio term against the NLL "
        "term; for simpo the reward scale.",
    )
    preference_loss_weight: float = Field(
        default=1.0,
        ge=0,
        description="Weight of the preference loss in the objective (for orpo: of its whole "
        "loss, NLL term included).",
    )
    preference_average_log_probs: bool = Field(
        default=False,
        description="The preference loss on per-token average log-probabilities (length-"
        "independent) instead of their sums. orpo and simpo are length-normalised by "
        "definition: true for them (left out, it is set; false is refused).",
    )
    sft_loss_weight: float = Field(
        default=0.0,
        ge=0,
        description="Weight of the SFT loss on the chosen responses (0: none). orpo's loss "
        "holds its own NLL term (the chosen response's mean over its tokens, weight 1): 0 "
        "with orpo.",
    )
    sft_average_log_probs: bool = Field(
        default=False,
        description="The SFT loss as each chosen response's per-token average (every pair "
        "weighs the same) instead of the mean over all chosen tokens.",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "kto_pair", "orpo", "simpo", "kto"] = Field(
        default="sigmoid",
        description="sigmoid: DPO (robust DPO with label_smoothing > 0); ipo: IPO; hinge: SLiC; "
        "kto_pair: KTO on the pairs (TRL's former kto_pair); orpo: ORPO, the chosen NLL plus "
        "an odds-ratio term, no reference model; simpo: SimPO, length-normalised with a "
        "target margin (simpo_gamma), no reference model; kto: KTO on unpaired rows "
        "(prompt, completion, label true/false), TRL's KTOTrainer loss.",
    )
    label_smoothing: float = Field(
        default=0.0,
        ge=0,
        lt=0.5,
        description="Robust DPO: the assumed fraction of flipped preference labels (sigmoid only).",
    )
    simpo_gamma: float = Field(
        default=0.5,
        gt=0,
        description="SimPO's target reward margin γ: the loss is −log σ(β (chosen − rejected "
        "average log-prob) − γ) (simpo only).",
    )

    desirable_weight: float = Field(
        default=1.0,
        gt=0,
        description="KTO's weight of the desirable rows' losses (TRL's desirable_weight; raise "
        "it when desirable rows are fewer) (kto only).",
    )
    undesirable_weight: float = Field(
        default=1.0,
        gt=0,
        description="KTO's weight of the undesirable rows' losses (TRL's undesirable_weight) "
        "(kto only).",
    )

    @model_validator(mode="after")
    def _rules(self) -> DpoConfig:
        problems = []
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) != 1.0 and self.loss_type != "kto":
                problems.append((name, f"only used with loss_type kto (got {self.loss_type})"))
        if self.loss_type == "kto" and self.sft_loss_weight:
            problems.append(
                (
                    "sft_loss_weight",
                    f"{self.sft_loss_weight:g}: kto rows are not pairs and its loss has no "
                    "SFT part (TRL's KTOTrainer has none); set it to 0",
                )
            )
        if self.label_smoothing and self.loss_type != "sigmoid":
            problems.append(
                ("label_smoothing", f"only used with loss_type sigmoid (got {self.loss_type})")
            )
        gamma_default = DpoConfig.model_fields["simpo_gamma"].default
        if self.simpo_gamma != gamma_default and self.loss_type != "simpo":
            problems.append(
                ("simpo_gamma", f"only used with loss_type simpo (got {self.loss_type})")
            )
        if self.loss_type in ("orpo", "simpo"):
            if "preference_average_log_probs" not in self.model_fields_set:
                object.__setattr__(self, "preference_average_log_probs", True)
            elif not self.preference_average_log_probs:
                problems.append(
                    (
                        "preference_average_log_probs",
                        f"false: {self.loss_type} compares per-token average log-probabilities "
                        "by definition; set it to true or leave it out",
                    )
                )
        if self.loss_type == "orpo" and self.sft_loss_weight:
            problems.append(
                (
                    "sft_loss_weight",
                    f"{self.sft_loss_weight:g}: orpo's loss holds the chosen responses' NLL "
                    "already (ref_policy_kl_penalty weighs its odds-ratio term against it); set "
                    "it to 0",
                )
            )
        if problems:
            raise CrossFieldError(problems)
        return self


def settle_dpo(training, problems: list[tuple[str, str]]) -> DpoConfig | None:
    """`training.dpo` for `training.training_type`: filled with defaults (and returned) for dpo;
    for any other type a block of settings is refused and a block of pure defaults dropped."""
    if training.training_type == "dpo":
        object.__setattr__(training, "dpo", training.dpo or DpoConfig())
        return training.dpo
    if training.dpo not in (None, DpoConfig()):
        problems.append(("dpo", "only used when training_type is dpo"))
    else:
        object.__setattr__(training, "dpo", None)  # a block of pure defaults: harmless
    return None


def max_grad_norm_field():
    return Field(
        default=1.0,
        gt=0,
        description="Gradients are clipped to this global norm before each optimizer step.",
    )
