"""How a stopped run ends: the one line that says what happened and the command that goes on.

Every backend and the CLI end a stopped run through `interrupted` (inside the training loop,
via `RunRecorder.stopped`) or `stopped_early` (while setting up). The resume command always
names the backend: which backend a bare `tuneplex train` picks depends on what is installed
and on the job, so a hint without it could resume on another one.
"""

from __future__ import annotations

import signal
from pathlib import Path

from tuneplex.errors import Interrupted
from tuneplex.runs.checkpoints import latest_checkpoint
from tuneplex.signals import exit_code, signal_name


def resume_command(backend: str) -> str:
    """The command that continues a run of `backend` (the job file and any --set elided)."""
    return f"tuneplex train ... --backend {backend} --resume"


def interrupted(
    event: str,
    *,
    backend: str,
    signum: int | None,
    continues_from: str | None,
    during: str | None = None,
) -> Interrupted:
    """The error a stopped run ends with: one line saying what happened and how to go on, and
    the signal's exit code (130 for a plain KeyboardInterrupt)."""
    by = f" by {signal_name(signum)}" if signum else ""
    while_ = f" while {during}" if during else ""
    where = continues_from or "the start (no checkpoint yet)"
    line = f"{event}{by}{while_}; `{resume_command(backend)}` continues from {where}"
    return Interrupted(line, exit_code=exit_code(signum or signal.SIGINT))


def stopped_early(run_dir: Path, *, backend: str, signum: int) -> Interrupted:
    """A stop outside the training loop (loading, setting up): nothing new is worth saving,
    and the run goes on from its newest checkpoint."""
    found = latest_checkpoint(run_dir)
    return interrupted(
        "interrupted", backend=backend, signum=signum, continues_from=found and str(found[1])
    )
