"""`tuneplex data`: what the data pipeline makes of a job's data."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from tuneplex.cli.common import BackendOpt, JobArg, SetOpt, load_job_for, reported

data_app = typer.Typer(
    help="Look at what the data pipeline makes of a job's data.", no_args_is_help=True
)


@data_app.command("inspect")
@reported
def data_inspect_cmd(
    job: JobArg,
    backend: BackendOpt = None,
    sets: SetOpt = None,
    n: Annotated[int, typer.Option("-n", min=0, help="How many examples to show.")] = 3,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print examples (input_ids, labels) and stats as JSON.")
    ] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Rebuild instead of reading the token cache.")
    ] = False,
) -> None:
    """Tokenize a job's data (tokenizer only, no weights); show examples with the trained tokens
    highlighted, and counts: rows, tokens, trained tokens, truncated, dropped, packing."""
    import os
    import sys

    from tuneplex.data import inspect as data_inspect
    from tuneplex.data.pipeline import prepare

    installed, parsed = load_job_for(job, backend, sets)
    from tuneplex.console import note

    prepared = prepare(installed.backend.data_spec(parsed), use_cache=not no_cache, report=note)
    if as_json:
        typer.echo(json.dumps(data_inspect.examples_json(prepared, n)))
        return
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    text = data_inspect.render(prepared, n, color=color)
    if color:
        from rich.console import Console

        Console(highlight=False).print(text)
    else:
        typer.echo(text)
