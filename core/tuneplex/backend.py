"""The contract a training backend fulfils. Backends implement it; nothing inherits from it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tuneplex.data.spec import DataSpec
    from tuneplex.schema.base import JobSchema


@dataclass(frozen=True)
class EnvironmentStatus:
    """Whether a backend can train on this machine; `detail` says why (or on what) either way."""

    ready: bool
    detail: str

    def __str__(self) -> str:
        return ("ready: " if self.ready else "not ready: ") + self.detail


@dataclass(frozen=True, kw_only=True)
class LaunchOptions:
    """Where this process sits in a multi-node run, as `tuneplex train` was told on the command
    line (None: not given). Passed to `Backend.train` as a value, never through the environment;
    a backend that cannot use them refuses them (a UsageError naming `given()`)."""

    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None

    def given(self) -> tuple[str, ...]:
        """The command-line flags of the options that are set: ("--node-rank", ...)."""
        return tuple(
            "--" + f.name.replace("_", "-")
            for f in fields(self)
            if getattr(self, f.name) is not None
        )


NO_LAUNCH_OPTIONS = LaunchOptions()
"""The default of `Backend.train`'s `launch`: no flag given (one node, or Slurm's variables)."""


@dataclass(frozen=True, kw_only=True)
class JobSettings:
    """The settings a user looks for first in a job, under the same names for every backend
    (what `tuneplex runs show` prints): `Backend.describe` reads them from its own validated
    job, so the core never guesses where a backend keeps its model or its data."""

    model: str
    train_data: str
    validation_data: str | None
    training_type: str
    """sft, dpo, distillation..."""
    finetuning_type: str
    """lora, all_weights..."""
    lora_rank: int | None
    """None: no adapter trained."""
    lora_alpha: float | None
    max_seq_length: int
    learning_rate: float | None
    """None: no single peak learning rate (a backend without an optimizer of its own)."""
    batch: Mapping[str, int | float | bool | str]
    """The backend's own batch keys and values, as the job names them."""
    epochs: int | None
    max_steps: int | None
    seed: int | None
    """None: the backend's default seed."""

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON data, in field order."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


@dataclass(frozen=True, kw_only=True)
class TrainedModel:
    """How a run's weights load again (generate, chat, eval, export): what transformers or peft
    take, and the precision the run computed in, so inference sees the numbers training saw."""

    path: Path
    """A directory `from_pretrained` loads: a peft adapter (adapter_config.json, loaded on
    `base`) or a whole model (config.json)."""
    base: str
    """The model the run started from (a local directory or a Hub id)."""
    dtype: str | None
    """Weights dtype to load in (`float32`, `bfloat16`, `float16`); None: the model's own."""
    autocast: str | None
    """Compute dtype under torch.autocast (`bfloat16`, `float16`), or None."""
    quantization: str | None = None
    """`4bit` / `8bit`: the base was loaded quantized (bitsandbytes; honoured on CUDA only)."""
    trust_remote_code: bool = False


@runtime_checkable
class Backend(Protocol):
    """A training backend.

    Every member but `train` must be cheap: the CLI calls them for `backends`, `schema` and
    `validate`, which must not import torch, transformers or any training library.
    """

    name: str
    """Short identifier used with `--backend` (lowercase, no spaces)."""
    description: str
    """One line shown by `tuneplex backends`."""
    job_schema: type[JobSchema]
    """The strict pydantic model a job for this backend must satisfy."""

    def check_environment(self) -> EnvironmentStatus:
        """Can this machine train? (e.g. a CUDA GPU is present). Must not import torch."""
        ...

    def derived(self, job: JobSchema) -> Mapping[str, int | float | str]:
        """Values computed from the validated job (data-parallel size, accumulation steps...)."""
        ...

    def data_spec(self, job: JobSchema) -> DataSpec:
        """What the shared data pipeline must build for this job (files, tokenizer, format)."""
        ...

    def check_launch(self, launch: LaunchOptions) -> None:
        """Refuse (UsageError) launch options this backend cannot use; the CLI calls it before
        a run directory is opened, so a refusal leaves nothing behind."""
        ...

    def describe(self, job: JobSchema) -> JobSettings:
        """The job's key settings under the shared names (`tuneplex runs show` asks the run's
        backend to describe its saved job). Reads the job only."""
        ...

    def trained_model(
        self, job: JobSchema, weights: Path, *, device: str, scratch: Path
    ) -> TrainedModel:
        """How `weights` (the run's final/, or one of its complete checkpoints) load for
        inference on `device` (`cpu`, `cuda`). A checkpoint in a format of the backend's own is
        written as a loadable directory under `scratch` (a fresh empty directory the caller
        owns); the run directory is only read. May import torch."""
        ...

    def train(
        self,
        job: JobSchema,
        run_dir: Path,
        *,
        resume: bool = False,
        launch: LaunchOptions = NO_LAUNCH_OPTIONS,
    ) -> None:
        """Train `job`, writing everything into `run_dir` (created and empty unless resuming).
        `launch` holds the multi-node flags; a backend that cannot honour them raises UsageError
        before loading anything."""
        ...
