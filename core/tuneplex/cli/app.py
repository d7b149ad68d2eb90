"""The `tuneplex` command line, assembled from one module per command group.

`backends`, `schema`, `validate` and `plan` stay on a fast path: no torch, transformers or
training library is imported. Every input problem is printed as `where: what` lines, exit code 2.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from tuneplex import __version__
from tuneplex.cli import data, export, jobs, migrate, plan, runs, train, use
from tuneplex.cli.common import echo_lines
from tuneplex.errors import EXIT_USAGE, TuneplexError, missing_package

app = typer.Typer(
    name="tuneplex",
    help="Fine-tune large language models from one strict job file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tuneplex {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Fine-tune large language models from one strict job file."""


app.command("backends")(jobs.backends_cmd)
app.command("schema")(jobs.schema_cmd)
app.command("validate")(jobs.validate_cmd)
app.command("plan")(plan.plan_cmd)
app.command("migrate")(migrate.migrate_cmd)
app.command("train")(train.train_cmd)
app.command("generate")(use.generate_cmd)
app.command("chat")(use.chat_cmd)
app.command("eval")(use.eval_cmd)
app.command("export")(export.export_cmd)
app.add_typer(data.data_app, name="data")
app.add_typer(runs.runs_app, name="runs")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Usage errors are one line, exit code 2."""
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="tuneplex", standalone_mode=False)
    except TuneplexError as exc:  # raised outside a command, e.g. while loading plugins
        echo_lines(exc)
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except Exception as exc:
        missing = missing_package(exc)  # an optional package imported outside a command
        if missing is not None:
            echo_lines(missing)
            return missing.exit_code
        # click's UsageError family (vendored inside newer typer): bad flag, missing argument
        if not (hasattr(exc, "format_message") and getattr(exc, "exit_code", None) == EXIT_USAGE):
            raise
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            return 0
        where = ctx.command_path if ctx is not None else "tuneplex"
        msg = exc.format_message().replace("Value error, ", "").replace("\n", " ")
        typer.echo(f"{where}: {msg} (see --help)", err=True)
        return EXIT_USAGE
    return rv if isinstance(rv, int) else 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
