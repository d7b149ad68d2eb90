"""`tuneplex plan`'s answer: the job's estimate against a GPU, and when it does not fit, the
fewest changes that do — each tried the way `--set` applies it and validated by the backend's
own schema, so a suggestion is always a job the backend accepts."""

from __future__ import annotations

import itertools
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneplex.errors import TuneplexError, UsageError
from tuneplex.memory.gpus import GIB, Gpu

if TYPE_CHECKING:
    from tuneplex.backend import Backend
    from tuneplex.memory.estimate import MemoryChange, MemoryEstimate, MemoryJob

MAX_SUGGESTIONS = 5
MAX_COMBINED = 3
"""Changes combined at most in one suggestion."""


@dataclass(frozen=True, kw_only=True)
class Suggestion:
    """Changes that together make the job fit, with the estimate they give."""

    changes: tuple[MemoryChange, ...]
    estimate: MemoryEstimate

    @property
    def overrides(self) -> tuple[tuple[str, str], ...]:
        return tuple(pair for change in self.changes for pair in change.overrides)

    @property
    def flags(self) -> str:
        """The overrides as `--set KEY=VALUE` flags to paste."""
        return " ".join(f"--set {shlex.quote(f'{k}={v}')}" for k, v in self.overrides)

    @property
    def summary(self) -> str:
        return "; ".join(change.summary for change in self.changes)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The estimate of a job, the GPU it was held against (None: no size known) and, when it
    does not fit, the suggestions, fewest changes first."""

    backend: str
    model: str
    parameters: int
    estimate: MemoryEstimate
    gpu: Gpu | None
    suggestions: tuple[Suggestion, ...] = ()

    @property
    def fits(self) -> bool | None:
        return None if self.gpu is None else fits(self.estimate, self.gpu)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON data (sizes in GiB)."""
        est, gpu = self.estimate, self.gpu
        return {
            "backend": self.backend,
            "model": self.model,
            "parameters": self.parameters,
            "per_gpu_gib": gib(est.per_gpu),
            "gpus": est.gpus,
            "gpu_name": gpu.name if gpu and gpu.name else None,
            "gpu_gib": gib(gpu.total) if gpu else None,
            "gpu_free_gib": gib(gpu.free) if gpu and gpu.free is not None else None,
            "fits": self.fits,
            "breakdown": {name: gib(size) for name, size in est.breakdown.items()},
            "notes": list(est.notes),
            "suggestions": [s.flags for s in self.suggestions],
            "suggested_changes": [
                {
                    "overrides": dict(s.overrides),
                    "summary": s.summary,
                    "per_gpu_gib": gib(s.estimate.per_gpu),
                    "gpus": s.estimate.gpus,
                }
                for s in self.suggestions
            ],
        }


def gib(size: int) -> float:
    """Bytes as GiB, two decimals (what `--json` and the text show)."""
    return round(size / GIB, 2)


def fits(estimate: MemoryEstimate, gpu: Gpu) -> bool:
    """Whether the estimated peak per GPU is within the card's capacity."""
    return estimate.per_gpu <= gpu.total


def cannot_estimate(backend: Backend) -> UsageError:
    return UsageError(f"backend {backend.name} cannot estimate memory")


def memory_job(*, backend: Backend, job: Any, base_dir: Path) -> MemoryJob:
    """The backend's estimator inputs for a validated job; a UsageError (one line) when the
    backend has no estimate or the model's config cannot be read."""
    member = getattr(backend, "memory_job", None)
    if member is None:
        raise cannot_estimate(backend)
    return member(job, base_dir=base_dir)


def estimate_job(*, backend: Backend, job: Any, base_dir: Path) -> MemoryEstimate:
    """The backend's estimate of a validated job (errors as `memory_job`'s)."""
    from tuneplex.memory.estimate import estimate

    return estimate(memory_job(backend=backend, job=job, base_dir=base_dir))


def make_plan(
    *,
    backend: Backend,
    job: Any,
    data: Mapping[str, Any],
    gpu: Gpu | None,
    base_dir: Path,
    limit: int = MAX_SUGGESTIONS,
) -> Plan:
    """Estimate `job` (validated from `data`, the job file with its `--set` overrides applied)
    and, when it does not fit `gpu`, search the backend's candidate changes for the fewest that
    do: single changes first, pairs only when no single one fits, then triples."""
    from tuneplex.memory.estimate import estimate

    inputs = memory_job(backend=backend, job=job, base_dir=base_dir)
    shape = inputs.shape
    plan = Plan(
        backend=backend.name,
        model=shape.source,
        parameters=shape.parameters(),
        estimate=estimate(inputs),
        gpu=gpu,
    )
    if gpu is None or fits(plan.estimate, gpu):
        return plan
    changes = getattr(backend, "memory_changes", None)
    candidates = list(changes(job)) if changes is not None else []
    for size in range(1, min(MAX_COMBINED, len(candidates)) + 1):
        found = [
            s
            for combo in itertools.combinations(candidates, size)
            if (s := _try(backend, data, combo, base_dir=base_dir)) is not None
            and fits(s.estimate, gpu)
        ]
        if found:  # combinations keep the backend's order: least disruptive first
            return replace(plan, suggestions=tuple(found[:limit]))
    return plan


def _try(
    backend: Backend, data: Mapping[str, Any], combo: Sequence[MemoryChange], *, base_dir: Path
) -> Suggestion | None:
    """The suggestion `combo` makes, or None when its changes touch the same key twice or the
    job they give is refused by the backend's schema (or cannot be estimated)."""
    from tuneplex.schema.loading import apply_overrides, validate_job

    pairs = [pair for change in combo for pair in change.overrides]
    if len({key for key, _ in pairs}) < len(pairs):
        return None
    try:
        changed = apply_overrides(data, [f"{key}={value}" for key, value in pairs])
        job = validate_job(backend.job_schema, changed)
        estimate = estimate_job(backend=backend, job=job, base_dir=base_dir)
    except TuneplexError:
        return None
    return Suggestion(changes=tuple(combo), estimate=estimate)
