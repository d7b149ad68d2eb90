"""Stopping a run on a signal: Ctrl-C (SIGINT) and SIGTERM, which Slurm, Kubernetes and cloud
preemption send some seconds before SIGKILL (Slurm's KillWait: 30 s by default).

One rule for every backend. A training loop is never cut inside an optimizer step or a
checkpoint: while it runs (`StopSignals.defer`) a signal only records itself, and the loop
asks once per step whether to stop — with several processes every rank takes the same answer,
so none is left waiting in a collective — then writes a checkpoint at the last completed step,
records the run as interrupted and says how to resume. Outside the loop (loading, the final
export, which is written atomically) nothing is worth finishing: the signal raises `Stop` at
once. Signals after the first are ignored, never a traceback (a second Ctrl-C gets one line).
The exit code is the shell's for the signal: 128 + its number (130 for SIGINT, 143 for SIGTERM).

Worker processes are tied to the process that started them (`tie_to_parent`): when it dies,
even by SIGKILL, they get SIGTERM and stop the same way, and are gone at the latest
`STOP_GRACE_S` later.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_GRACE_S = 30
"""Seconds a stopping worker may take to finish its step and write its checkpoint before it
is killed: torch elastic's shutdown timeout for the workers of a launcher that was signalled,
and the deadline of workers whose launcher died. Slurm's default KillWait is the same."""

_PR_SET_PDEATHSIG = 1


def exit_code(signum: int) -> int:
    """The shell's exit status for a process stopped by `signum`."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Stop(KeyboardInterrupt):
    """A stop signal where nothing needs finishing first. A KeyboardInterrupt, so library code
    that catches `Exception` lets it through."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


def _stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class StopSignals:
    """SIGINT and SIGTERM as a stop request, installed in the main thread while in use.

    At first a signal raises `error(signum)` (`Stop`) at once; after `defer()` it only sets
    `signum`, which the caller polls at safe points. Later signals are ignored; the first later
    Ctrl-C says so through `say` (None: silently). After a stop, the context leaves the signals
    ignored: the process is about to exit. In another thread nothing is installed and Ctrl-C
    stays a KeyboardInterrupt.
    """

    def __init__(
        self,
        *,
        say: Callable[[str], None] | None = _stderr_line,
        error: Callable[[int], BaseException] = Stop,
    ):
        self.signum = 0
        self.say, self.error = say, error
        self._defer = False
        self._raised = False
        self._told = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            # stopped (here, or by a StopSignals nested inside), the process is on its way
            # out: ignore the signals for good (Python resets its own handlers during the
            # second or so of teardown, SIG_IGN it keeps)
            stopped = self.signum or signal.getsignal(sig) is signal.SIG_IGN
            signal.signal(sig, signal.SIG_IGN if stopped else handler)
        self._previous.clear()

    def defer(self) -> None:
        """From now on a signal only records itself."""
        self._defer = True

    def expedite(self) -> None:
        """From now on a signal raises at once; one recorded and not yet acted on raises here."""
        self._defer = False
        if self.signum and not self._raised:
            self._raised = True
            raise self.error(self.signum)

    def _handle(self, signum: int, _frame) -> None:
        if self.signum:
            # a person pressing Ctrl-C again hears back; SIGTERM comes again from machinery
            # (Slurm signals every process and the launcher forwards; a parent's threads)
            if signum == signal.SIGINT and not self._told and self.say is not None:
                self._told = True
                self.say(
                    f"tuneplex: already stopping ({signal_name(self.signum)}); finishing the "
                    "step and writing its checkpoint"
                )
            return
        self.signum = signum
        if not self._defer:
            self._raised = True
            raise self.error(signum)


def tie_to_parent(parent_pid: int, *, grace_s: float = STOP_GRACE_S) -> None:
    """Stop this process when `parent_pid`, the process that started it, ends — however it
    ends, SIGKILL and the OOM killer included: SIGTERM at once, and exit regardless `grace_s`
    seconds later.

    Linux sends the SIGTERM itself (prctl PR_SET_PDEATHSIG); elsewhere a watchdog thread that
    polls the parent id sends it, and the watchdog keeps the deadline in both cases. The
    parent-death signal follows the parent *thread* that started this process, which must
    therefore live as long as its process (the launcher starts its workers from its main
    thread). A parent already gone ends this process now.
    """
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:  # inherited: it must reach us
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        kernel_tells = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        kernel_tells = False
    if os.getppid() != parent_pid:  # it died before the request took effect
        os._exit(exit_code(signal.SIGTERM))
    watchdog = threading.Thread(
        target=_watch_parent,
        args=(parent_pid, grace_s, not kernel_tells),
        name="tuneplex-parent",
        daemon=True,
    )
    watchdog.start()


def _watch_parent(parent_pid: int, grace_s: float, tell: bool) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    if tell:
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os._exit(exit_code(signal.SIGTERM))
