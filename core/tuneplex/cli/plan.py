"""`tuneplex plan`: will the job fit, and if not, the smallest change that does — from the
model's config alone, before anything loads (no torch, no weights)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tuneplex.cli.common import BackendOpt, JobArg, SetOpt, load_job_data_for, reported
from tuneplex.errors import Problem, TuneplexError, UsageError, first_line

if TYPE_CHECKING:
    from tuneplex.backend import Backend
    from tuneplex.memory.gpus import Gpu
    from tuneplex.memory.plan import Plan


@reported
def plan_cmd(
    job: JobArg,
    backend: BackendOpt = None,
    sets: SetOpt = None,
    gpu: Annotated[
        str | None,
        typer.Option(
            "--gpu",
            help="The card to plan for: h100, h200, a100-40gb, l40s, l4, a10g, rtx4090, t4... "
            "Default: the GPUs visible now, else no size (the job's GPU count only).",
        ),
    ] = None,
    gpu_memory: Annotated[
        float | None,
        typer.Option(
            "--gpu-memory", help="GiB per GPU (as the driver reports it), instead of --gpu."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Estimate peak memory per GPU and, when the job does not fit, the changes that do."""
    from tuneplex.memory.plan import make_plan

    card = _card(gpu, gpu_memory)
    # data: the job as --set left it; each suggestion's overrides go on top, as the user's would
    installed, parsed, data = load_job_data_for(job, backend, sets)
    plan = make_plan(
        backend=installed.backend, job=parsed, data=data, gpu=card, base_dir=Path.cwd()
    )
    if as_json:
        typer.echo(json.dumps(plan.as_dict(), indent=2))
        return
    for line in plan_lines(plan, job=job):
        typer.echo(line)


def _card(name: str | None, gib: float | None) -> Gpu | None:
    """The GPU to hold the estimate against: --gpu, --gpu-memory, else the smallest visible."""
    from tuneplex.memory.gpus import GIB, Gpu, find_gpu, visible_gpus

    if name is not None and gib is not None:
        raise UsageError(Problem("--gpu, --gpu-memory", "give one of them, not both"))
    if name is not None:
        return find_gpu(name)
    if gib is not None:
        if not 0 < gib < 1e6:
            raise UsageError(Problem("--gpu-memory", f"expected GiB > 0 (got {gib:g})"))
        return Gpu(name="", total=int(gib * GIB))  # a size, no card
    visible = visible_gpus()
    return min(visible, key=lambda g: g.total) if visible else None


def plan_lines(plan: Plan, *, job: Path) -> list[str]:
    """The report: breakdown aligned in GiB, notes, the card and the verdict, suggestions."""
    from tuneplex.memory.plan import gib

    est = plan.estimate
    gpus = f"{est.gpus} GPU" + ("s" if est.gpus != 1 else "")
    n = plan.parameters
    count = f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"
    lines = [f"{job}: {plan.backend} job, {plan.model} ({count} parameters), on {gpus}"]
    lines.append(f"estimated peak memory per GPU: {gib(est.per_gpu):.2f} GiB")
    width = max((len(name) for name in est.breakdown), default=0)
    lines += [f"  {name:<{width}}  {gib(size):>8.2f} GiB" for name, size in est.breakdown.items()]
    lines += [f"  note: {note}" for note in est.notes]
    lines.append(_verdict(plan))
    if plan.fits is False:
        lines += _suggestion_lines(plan)
    return lines


def _verdict(plan: Plan) -> str:
    from tuneplex.memory.plan import gib

    gpu = plan.gpu
    if gpu is None:
        return "GPU: none visible; give --gpu NAME or --gpu-memory GIB to see whether it fits"
    left = gpu.total - plan.estimate.per_gpu
    free = f", {gib(gpu.free):.2f} GiB free now" if gpu.free is not None else ""
    card = f"GPU: {gpu.name} ({gib(gpu.total):.2f} GiB{free})"
    if not gpu.name:
        card = f"GPU: {gib(gpu.total):.2f} GiB (--gpu-memory)"
    if left >= 0:
        tight = " (tight: under 10% left)" if left < 0.1 * gpu.total else ""
        return f"{card}: fits, {gib(left):.2f} GiB to spare{tight}"
    return f"{card}: does not fit, {gib(-left):.2f} GiB over"


def _suggestion_lines(plan: Plan) -> list[str]:
    from tuneplex.memory.plan import gib

    if not plan.suggestions:
        return ["no change tuneplex knows of fits this GPU (try a larger card or more GPUs)"]
    lines = ["changes that fit, fewest first:"]
    for n, s in enumerate(plan.suggestions, 1):
        gpus = f" on {s.estimate.gpus} GPUs" if s.estimate.gpus != plan.estimate.gpus else ""
        lines.append(f"  {n}. {s.summary}: {gib(s.estimate.per_gpu):.2f} GiB per GPU{gpus}")
        lines.append(f"     {s.flags}")
    return lines


def validate_memory(*, backend: Backend, parsed, job: Path, sets: Sequence[str]) -> dict:
    """`validate`'s estimate: {"per_gpu_gib", "gpus", "line"}, or {"not_estimated": why} in a
    few words. Never fails, never fetches: a Hub id is estimated from the local cache only, so
    validate stays fast and offline."""
    from tuneplex.memory.plan import estimate_job, gib

    try:
        with _hub_offline():
            est = estimate_job(backend=backend, job=parsed, base_dir=Path.cwd())
    except TuneplexError as exc:
        return {"not_estimated": exc.lines()[0]}
    except Exception as exc:  # a defect in an estimate never fails validate; said, not hidden
        return {"not_estimated": f"estimate failed: {type(exc).__name__}: {first_line(exc)}"}
    on = f" on {est.gpus} GPUs" if est.gpus != 1 else ""
    hint = " ".join(["tuneplex plan", shlex.quote(str(job)), *_set_flags(sets)])
    line = f"memory: ~{gib(est.per_gpu):.1f} GiB per GPU{on} (details: {hint})"
    return {"per_gpu_gib": gib(est.per_gpu), "gpus": est.gpus, "line": line}


def validate_line(memory: dict) -> str:
    """The one line `validate` prints (a YAML comment, so its output stays YAML)."""
    if "line" in memory:
        return f"# {memory['line']}"
    return f"# memory: not estimated ({memory['not_estimated']})"


def _set_flags(sets: Sequence[str]) -> list[str]:
    return [f"--set {shlex.quote(s)}" for s in sets]


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    before = os.environ.get(OFFLINE)
    os.environ[OFFLINE] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[OFFLINE]
        else:
            os.environ[OFFLINE] = before


OFFLINE = "HF_HUB_OFFLINE"


def warn_if_short(*, backend: Backend, parsed, job: Path, sets: Sequence[str]) -> None:
    """`train`'s warning, before anything loads: the estimate is over the free memory of a GPU
    visible now (nvidia-smi). No GPU, no estimate: nothing said; training goes on either way."""
    from tuneplex.memory.gpus import visible_gpus
    from tuneplex.memory.plan import estimate_job, gib

    gpus = [g for g in visible_gpus() if g.free is not None]
    if not gpus:
        return
    try:
        est = estimate_job(backend=backend, job=parsed, base_dir=Path.cwd())
    except TuneplexError:
        return  # the backend says what is wrong when it loads
    tightest = min(gpus, key=lambda g: g.free or 0)
    if est.per_gpu <= (tightest.free or 0):
        return
    hint = " ".join(["tuneplex plan", shlex.quote(str(job)), *_set_flags(sets)])
    typer.echo(
        f"warning: estimated peak ~{gib(est.per_gpu):.1f} GiB per GPU is more than the "
        f"{gib(tightest.free or 0):.1f} GiB free on {tightest.name}; `{hint}` shows what fits",
        err=True,
    )
