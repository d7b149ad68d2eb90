"""The contract a training backend fulfils. Backends implement it; nothing inherits from it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

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

    def train(self, job: JobSchema, run_dir: Path, *, resume: bool = False) -> None:
        """Train `job`, writing everything into `run_dir` (created and empty unless resuming)."""
        ...
