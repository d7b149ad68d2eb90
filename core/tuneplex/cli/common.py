"""What every command shares: the job options, loading a job for its backend, and the error
wrapper that turns a TuneplexError into its lines on stderr and its exit code."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from tuneplex.errors import TuneplexError, UsageError, missing_package

BackendOpt = Annotated[
    str | None,
    typer.Option(
        "--backend",
        "-b",
        help="Backend that runs the job (see `tuneplex backends`). Default: the one whose "
        "schema the job fits, else the only one installed, else automodel.",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a job key: --set training.lora.rank=32 (value parsed as YAML). Repeatable.",
    ),
]
JobArg = Annotated[Path, typer.Argument(help="Job file (.yaml, .yml or .json).")]


def reported(fn):
    """Print a TuneplexError as its lines on stderr and exit with its code; no traceback. A
    missing optional package is one line naming the extra that installs it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TuneplexError as exc:
            echo_lines(exc)
            raise typer.Exit(exc.exit_code) from None
        except Exception as exc:
            missing = missing_package(exc)
            if missing is None:
                raise
            echo_lines(missing)
            raise typer.Exit(missing.exit_code) from None

    return wrapper


def echo_lines(exc: TuneplexError) -> None:
    """An error's lines on stderr."""
    for line in exc.lines():
        typer.echo(line, err=True)


def load_job_data_for(job: Path, backend: str | None, sets: list[str] | None):
    """The backend, the validated job, and the job's plain data as `--set` left it (what
    further overrides go on top of)."""
    from tuneplex.plugins import registry
    from tuneplex.schema.loading import apply_overrides, load_job_file, validate_job

    data = apply_overrides(load_job_file(job), sets or ())
    installed = registry().choose(backend, data)
    return installed, validate_job(installed.backend.job_schema, data), data


def load_job_for(job: Path, backend: str | None, sets: list[str] | None, *, trackers: bool = False):
    """The backend (`--backend`, else `Registry.choose`'s pick) and the validated job; with
    `trackers`, a tracker the job configures but whose package is missing is refused here,
    before anything heavy loads."""
    installed, parsed, _ = load_job_data_for(job, backend, sets)
    if trackers:
        from tuneplex.runs.trackers import missing_packages

        missing = missing_packages(getattr(parsed, "integrations", None))
        if missing:
            raise UsageError(missing)
    return installed, parsed
