"""`tuneplex migrate`: a v1 hyperparameter file as the equivalent job (fast path: no torch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from tuneplex.cli.common import reported
from tuneplex.errors import Problem, UsageError


@reported
def migrate_cmd(
    v1_file: Annotated[
        Path, typer.Argument(help="v1 hyperparameter object (.json, or .yaml/.yml).")
    ],
    backend: Annotated[
        str, typer.Option("--backend", "-b", help="Backend whose job to write: automodel, unsloth.")
    ] = "automodel",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write the job here (the report goes to stdout); default: "
            "the job to stdout, the report to stderr.",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --output file.")
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Base model (local directory or Hugging Face id); default: a placeholder to fill.",
        ),
    ] = None,
    training_data: Annotated[
        str | None,
        typer.Option(
            "--training-data",
            help="Training data; default: a placeholder to fill. "
            "A local file also turns an integer val_check_interval into a fraction of an epoch.",
        ),
    ] = None,
    validation_data: Annotated[
        str | None, typer.Option("--validation-data", help="Validation data; default: none.")
    ] = None,
    strict: Annotated[
        bool,
        typer.Option("--strict", help="Exit 2, writing nothing, if any field cannot be carried."),
    ] = False,
) -> None:
    """Write the job that runs what a v1 hyperparameter object ran: one line per field says
    what it became, or why it has no equivalent. v1 defaults the file leaves out are written
    where tuneplex's differ."""
    from tuneplex.migrate import migrate, read_v1
    from tuneplex.plugins import registry

    schema = registry().get(backend).backend.job_schema
    if output is not None:
        _check_output(output, source=v1_file, overwrite=overwrite)
    result = migrate(
        read_v1(v1_file),
        backend=backend,
        schema=schema,
        model=model,
        training_data=training_data,
        validation_data=validation_data,
    )
    to_stderr = output is None
    typer.echo(f"{v1_file} -> {backend} job ({output or 'stdout'})", err=to_stderr)
    for line in result.report():
        typer.echo(line, err=to_stderr)
    if strict and result.lost:
        n = len(result.lost)
        typer.echo(
            f"--strict: {n} field{'s' if n > 1 else ''} not carried; nothing written", err=True
        )
        raise typer.Exit(2)
    text = result.yaml(source=v1_file.name)
    if output is None:
        typer.echo(text, nl=False)
    else:
        _write(output, text)


def _check_output(out: Path, *, source: Path, overwrite: bool) -> None:
    if not out.parent.is_dir():
        raise UsageError(Problem("--output", f"{out.parent}: no such directory"))
    if not (out.exists() or out.is_symlink()):
        return
    if source.exists() and out.resolve() == source.resolve():
        raise UsageError(Problem("--output", f"{out} is the v1 file being read"))
    if not overwrite:
        raise UsageError(Problem("--output", f"{out} exists; pass --overwrite to replace it"))
    if out.is_symlink() or not out.is_file():
        raise UsageError(Problem("--output", f"{out} exists and is not a regular file"))


def _write(out: Path, text: str) -> None:
    """Written aside and renamed into place: an existing file is never left half written."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
