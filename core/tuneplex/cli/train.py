"""`tuneplex train`: validate a job, check this machine can run it, open the run directory
and hand the job to its backend."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tuneplex import __version__
from tuneplex.cli.common import BackendOpt, JobArg, SetOpt, load_job_for, reported
from tuneplex.errors import EXIT_USAGE, EnvironmentNotReady, Problem, TuneplexError, UsageError

if TYPE_CHECKING:
    from tuneplex.backend import Backend, LaunchOptions


@reported
def train_cmd(
    job: JobArg,
    backend: BackendOpt = None,
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
    from tuneplex.cli.plan import warn_if_short
    from tuneplex.runs import resolve_run_dir

    launch = LaunchOptions(
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        rdzv_endpoint=rdzv_endpoint,
    )
    installed, parsed = load_job_for(job, backend, sets, trackers=True)
    installed.backend.check_launch(launch)  # before a run directory is opened (or cleared)
    status = installed.backend.check_environment()
    if not status.ready:
        raise EnvironmentNotReady(f"{installed.backend.name}: {status.detail}")
    if os.environ.get("LOCAL_RANK", "0") == "0":  # once per node, under torchrun too
        warn_if_short(backend=installed.backend, parsed=parsed, job=job, sets=sets or ())
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
    from tuneplex.runs import LOG_FILE, open_run, stopped_early
    from tuneplex.signals import Stop, StopSignals

    public = parsed.to_public_dict()
    with open_run(
        run_dir,
        job=public,
        job_file=job,
        backend=backend.name,
        resume=resume,
        overwrite=overwrite,
        note=console.note,
        may_change=type(parsed).resume_may_change,
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
                    raise stopped_early(run_dir, backend=backend.name, signum=signum) from None
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
