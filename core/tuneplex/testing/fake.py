"""A backend that trains nothing: it writes a plausible run directory, so the CLI's train path
can be tested without torch. This module is its plugin (`fake_entry_point`)."""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

from pydantic import Field

from tuneplex.backend import (
    NO_LAUNCH_OPTIONS,
    EnvironmentStatus,
    JobSettings,
    LaunchOptions,
    TrainedModel,
)
from tuneplex.data.spec import DataSpec
from tuneplex.hookspecs import hookimpl
from tuneplex.schema import IntegrationsConfig, JobSchema, StrictModel
from tuneplex.schema.common import output_dir_field


class FakeData(StrictModel):
    path: str = Field(min_length=1, description="Training data file.")


class FakeSchedule(StrictModel):
    steps: int = Field(default=3, ge=1, description="Steps to pretend to train.")
    crash: bool = Field(
        default=False, description="Fail inside train with an unexpected error (a defect)."
    )
    pause_s: float = Field(
        default=0.0, ge=0, description="Seconds to wait before training (a slow import)."
    )


class FakeOutput(StrictModel):
    dir: str | None = output_dir_field()


class FakeJobInput(JobSchema):
    """A job for the fake backend (tests only)."""

    backend_name = "fake"

    model: str = Field(min_length=1, description="Model reference.")
    dataset: FakeData = Field(description="Data.")
    schedule: FakeSchedule = Field(default_factory=FakeSchedule, description="Schedule.")
    output: FakeOutput = Field(default_factory=FakeOutput, description="Output.")
    integrations: IntegrationsConfig = Field(
        default_factory=IntegrationsConfig, description="Tracking."
    )


class FakeBackend:
    name = "fake"
    description = "Trains nothing; writes a run directory (for tests)."
    job_schema = FakeJobInput

    def __init__(self, ready: bool = True):
        self.ready = ready
        self.launches: list[LaunchOptions] = []
        """The launch options of every `train` call, in order (what the CLI handed over)."""

    def check_environment(self) -> EnvironmentStatus:
        return EnvironmentStatus(self.ready, "always" if self.ready else "switched off for a test")

    def derived(self, job: FakeJobInput) -> dict[str, int]:
        return {"total_gpus": 0, "steps": job.schedule.steps}

    def data_spec(self, job: FakeJobInput) -> DataSpec:
        return DataSpec(
            train=job.dataset.path, tokenizer=job.model, max_seq_length=64, train_key="dataset.path"
        )

    def check_launch(self, launch: LaunchOptions) -> None:
        """Takes every launch option (tests check what `train` is handed)."""

    def describe(self, job: FakeJobInput) -> JobSettings:
        return JobSettings(
            model=job.model,
            train_data=job.dataset.path,
            validation_data=None,
            training_type="sft",
            finetuning_type="all_weights",
            lora_rank=None,
            lora_alpha=None,
            max_seq_length=self.data_spec(job).max_seq_length,
            learning_rate=None,
            batch={},
            epochs=None,
            max_steps=job.schedule.steps,
            seed=None,
        )

    def trained_model(
        self, job: FakeJobInput, weights: Path, *, device: str, scratch: Path
    ) -> TrainedModel:
        return TrainedModel(path=weights, base=job.model, dtype=None, autocast=None)

    def train(
        self,
        job: FakeJobInput,
        run_dir: Path,
        *,
        resume: bool = False,
        launch: LaunchOptions = NO_LAUNCH_OPTIONS,
    ) -> None:
        self.launches.append(launch)
        if job.schedule.pause_s:
            import time

            time.sleep(job.schedule.pause_s)
        with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as fh:
            for step in range(1, job.schedule.steps + 1):
                row = {"step": step, "split": "train", "loss": 1.0 / step, "resumed": resume}
                fh.write(json.dumps(row) + "\n")
        (run_dir / "summary.json").write_text(
            json.dumps({"steps": job.schedule.steps, "model": job.model}), encoding="utf-8"
        )
        if job.schedule.crash:
            import warnings

            warnings.warn("a third-party library warns here", UserWarning, stacklevel=1)
            os.write(2, b"a C extension prints here\n")
            raise ZeroDivisionError("a defect deep inside the backend")


@hookimpl
def register_backends(register) -> None:
    register(FakeBackend())


def fake_entry_point(
    name: str = "fake", value: str = "tuneplex.testing.fake"
) -> metadata.EntryPoint:
    return metadata.EntryPoint(name=name, value=value, group="tuneplex")
