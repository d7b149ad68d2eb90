"""The `tuneplex` command line.

`backends`, `schema` and `validate` stay on a fast path: no torch, transformers or training
library is imported. Every input problem is printed as `where: what` lines, exit code 2.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tuneplex import __version__
from tuneplex.errors import EXIT_USAGE, EnvironmentNotReady, Problem, TuneplexError, UsageError

if TYPE_CHECKING:
    from tuneplex.backend import Backend, LaunchOptions

app = typer.Typer(
    name="tuneplex",
    help="Fine-tune large language models from one strict job file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

DEFAULT_BACKEND = "automodel"

BackendOpt = Annotated[
    str,
    typer.Option("--backend", "-b", help="Backend that runs the job (see `tuneplex backends`)."),
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


def _reported(fn):
    """Print a TuneplexError as its lines on stderr and exit with its code; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TuneplexError as exc:
            for line in exc.lines():
                typer.echo(line, err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


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


@app.command("backends")
@_reported
def backends_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the installed backends, their versions and whether this machine can run them."""
    from tuneplex.plugins import registry

    reg = registry()
    rows = []
    for name in sorted(reg.backends):
        item = reg.backends[name]
        status = item.backend.check_environment()
        rows.append(
            {
                "name": name,
                "distribution": item.distribution,
                "version": item.version,
                "description": item.backend.description,
                "ready": status.ready,
                "environment": status.detail,
            }
        )
    if as_json:
        typer.echo(json.dumps({"backends": rows, "plugin_failures": reg.failures}, indent=2))
        return
    if not rows:
        typer.echo(
            "no backends installed; pip install 'tuneplex[automodel]' or 'tuneplex[unsloth]'"
        )
        return
    for row in rows:
        typer.echo(f"{row['name']}  ({row['distribution']} {row['version']})")
        typer.echo(f"  {row['description']}")
        typer.echo(f"  {'ready' if row['ready'] else 'not ready'}: {row['environment']}")


class SchemaFormat(str, Enum):
    json = "json"
    yaml = "yaml"
    markdown = "markdown"


@app.command("schema")
@_reported
def schema_cmd(
    backend: Annotated[str, typer.Argument(help="Backend whose job schema to print.")],
    fmt: Annotated[
        SchemaFormat,
        typer.Option(
            "--format",
            "-f",
            help="json: JSON Schema; yaml: a commented job template; markdown: a reference table.",
        ),
    ] = SchemaFormat.json,
) -> None:
    """Print a backend's live job schema (JSON Schema) or a YAML job template with every default."""
    from tuneplex.plugins import registry

    schema = registry().get(backend).backend.job_schema
    if fmt is SchemaFormat.json:
        typer.echo(json.dumps(schema.model_json_schema(), indent=2))
    elif fmt is SchemaFormat.yaml:
        from tuneplex.schema.template import yaml_template

        typer.echo(yaml_template(schema, backend=backend), nl=False)
    else:
        from tuneplex.schema.docs import markdown_reference

        typer.echo(markdown_reference(schema, backend=backend), nl=False)


def _load(job: Path, backend: str, sets: list[str] | None, *, trackers: bool = False):
    """The backend and the validated job; with `trackers`, a tracker the job configures but
    whose package is missing is refused here, before anything heavy loads."""
    from tuneplex.config_io import load_job
    from tuneplex.plugins import registry

    installed = registry().get(backend)
    parsed = load_job(installed.backend.job_schema, job, sets or ())
    if trackers:
        from tuneplex.runs.trackers import missing_packages

        missing = missing_packages(getattr(parsed, "integrations", None))
        if missing:
            raise UsageError(missing)
    return installed, parsed


@app.command("validate")
@_reported
def validate_cmd(
    job: JobArg,
    backend: BackendOpt = DEFAULT_BACKEND,
    sets: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check a job without running it; print the resolved job and the values derived from it."""
    installed, parsed = _load(job, backend, sets, trackers=True)
    resolved = parsed.to_public_dict()
    derived = dict(installed.backend.derived(parsed))
    if as_json:
        typer.echo(json.dumps({"backend": backend, "job": resolved, "derived": derived}, indent=2))
        return
    import yaml

    typer.echo(f"# {job}: valid {backend} job")
    typer.echo(yaml.safe_dump(resolved, sort_keys=False, default_flow_style=None).rstrip())
    typer.echo("# derived")
    typer.echo(yaml.safe_dump({"derived": derived}, sort_keys=False).rstrip())


@app.command("train")
@_reported
def train_cmd(
    job: JobArg,
    backend: BackendOpt = DEFAULT_BACKEND,
    sets: SetOpt = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Run directory (default: the job's output.dir)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in the output directory.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the run in the output directory.")
    ] = False,
    node_rank: Annotated[
        int | None,
        typer.Option("--node-rank", min=0, help="Multi-node: this node's rank (0 writes the run)."),
    ] = None,
    master_addr: Annotated[
        str | None, typer.Option("--master-addr", help="Multi-node: address of node 0.")
    ] = None,
    master_port: Annotated[
        int | None,
        typer.Option("--master-port", min=1, max=65535, help="Multi-node: port on node 0."),
    ] = None,
    rdzv_endpoint: Annotated[
        str | None,
        typer.Option("--rdzv-endpoint", help="Multi-node: a c10d rendezvous HOST:PORT instead."),
    ] = None,
) -> None:
    """Validate a job, check this machine can run it, and train."""
    from tuneplex.backend import LaunchOptions
    from tuneplex.runs import resolve_run_dir

    launch = LaunchOptions(
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        rdzv_endpoint=rdzv_endpoint,
    )
    installed, parsed = _load(job, backend, sets, trackers=True)
    check_launch = getattr(installed.backend, "check_launch", None)
    if check_launch is not None:  # before a run directory is opened (or --overwrite clears one)
        check_launch(launch)
    status = installed.backend.check_environment()
    if not status.ready:
        raise EnvironmentNotReady(f"{backend}: {status.detail}")
    run_dir = resolve_run_dir(flag=output, job_output_dir=parsed.output.dir, job_path=job)
    if not _writes_the_run_dir(launch):  # node 0, or rank 0 of the user's torchrun, writes it
        installed.backend.train(parsed, run_dir, resume=resume, launch=launch)
        return
    _train_into_run(
        installed.backend,
        parsed,
        job,
        run_dir,
        resume=resume,
        overwrite=overwrite,
        launch=launch,
    )


def _train_into_run(
    backend: Backend,
    parsed,
    job: Path,
    run_dir: Path,
    *,
    resume: bool,
    overwrite: bool,
    launch: LaunchOptions,
) -> None:
    """Open (and lock) the run directory, then train with third-party output in train.log;
    an unexpected error is one line here and its traceback in train.log. A backend's usage
    error (refused launch options, say) discards a new run: no directory is left behind."""
    from tuneplex import console
    from tuneplex.runs import LOG_FILE, open_run
    from tuneplex.signals import Stop, StopSignals, stopped_early

    public = parsed.to_public_dict()
    with open_run(
        run_dir, job=public, job_file=job, resume=resume, overwrite=overwrite, note=console.note
    ) as run:
        log = run_dir / LOG_FILE
        try:
            with console.capture(log, title=f"tuneplex {__version__} train {job}"):
                try:
                    # a signal before the backend installs its own handlers (while importing
                    # torch, say) is a stop too: one line, exit 130 / 143
                    with StopSignals(say=console.note), console.defects_as_one_line():
                        backend.train(parsed, run_dir, resume=run.resuming, launch=launch)
                except TuneplexError as exc:
                    if exc.exit_code == EXIT_USAGE:  # refused before training: leave no run
                        run.discard()
                    raise
                except KeyboardInterrupt as exc:  # Stop, or a Ctrl-C a backend let through
                    signum = exc.signum if isinstance(exc, Stop) else signal.SIGINT
                    raise stopped_early(run_dir, signum=signum) from None
        except OSError as exc:  # the log itself could not be opened
            raise UsageError(
                Problem(f"--output {run_dir}", f"cannot write there ({exc.strerror or exc})")
            ) from None


def _writes_the_run_dir(launch: LaunchOptions) -> bool:
    """One process prepares the run directory: node 0 of a multi-node run (--node-rank, else
    Slurm's node id), and rank 0 of the workers when each runs `tuneplex train` under torchrun."""
    if launch.node_rank is not None:
        node = str(launch.node_rank)
    else:
        node = os.environ.get("SLURM_NODEID") or "0"
    return node == "0" and os.environ.get("RANK", "0") == "0"


data_app = typer.Typer(
    help="Look at what the data pipeline makes of a job's data.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

from tuneplex.cli_runs import runs_app  # noqa: E402 (light: its commands import what they use)

app.add_typer(runs_app, name="runs")


@data_app.command("inspect")
@_reported
def data_inspect_cmd(
    job: JobArg,
    backend: BackendOpt = DEFAULT_BACKEND,
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

    installed, parsed = _load(job, backend, sets)
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


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Usage errors are one line, exit code 2."""
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="tuneplex", standalone_mode=False)
    except TuneplexError as exc:  # raised outside a command, e.g. while loading plugins
        for line in exc.lines():
            typer.echo(line, err=True)
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except Exception as exc:
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
