"""What a training process shows on the terminal: tuneplex's own lines, nothing else.

While `capture(log)` is active, everything written to this process's standard error by
anyone — Python warnings, library loggers, C++ extensions, worker processes it starts — goes
to the run's log file (`run_dir/train.log`), and tuneplex's own notes reach the terminal
through `note`. Errors are printed after the capture ends, so they also reach the terminal.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

_console: TextIO | None = None
_log_path: Path | None = None
_log: TextIO | None = None


def note(text: str) -> None:
    """One line for the user, on the terminal even while third-party output is captured."""
    stream = _console or sys.stderr
    print(text, file=stream, flush=True)


def log_path() -> Path | None:
    """The log file output is captured into, if any."""
    return _log_path


def log_traceback() -> None:
    """The exception being handled, in full, into the log (or stderr without a capture)."""
    import traceback

    traceback.print_exc(file=_log or sys.stderr)
    (_log or sys.stderr).flush()


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


@contextlib.contextmanager
def defects_as_one_line() -> Iterator[None]:
    """An unexpected exception (a defect, not bad input) becomes one `InternalError` line; its
    traceback goes to the log. A missing optional package is the line naming its extra (exit
    2). What tuneplex reports itself passes through unchanged."""
    from tuneplex.errors import InternalError, TuneplexError, first_line, missing_package

    try:
        yield
    except TuneplexError:
        raise
    except Exception as exc:
        missing = missing_package(exc)
        if missing is not None:
            raise missing from None
        log_traceback()
        raise InternalError(
            f"internal error: {type(exc).__name__}: {first_line(exc)[:300]} "
            f"(traceback in {_log_path or 'stderr'})"
        ) from None


@contextlib.contextmanager
def capture(log: Path, *, title: str) -> Iterator[Path]:
    """Send file descriptor 2 (and so sys.stderr when it is that descriptor) to `log`,
    appending, headed by `title`; restore it on exit."""
    global _console, _log_path, _log
    previous = (_console, _log_path, _log)
    sys.stderr.flush()
    fh = open(log, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed in finally)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    fh.write(f"==== {stamp} {title} (pid {os.getpid()}) ====\n")
    saved = os.dup(2)
    terminal = None
    if _stderr_fd() == 2:  # sys.stderr is the descriptor we redirect: notes need their own
        terminal = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
    _console = terminal or previous[0] or sys.stderr
    _log_path, _log = Path(log), fh
    os.dup2(fh.fileno(), 2)
    handler = logging.StreamHandler(fh)  # else logging's last resort writes to sys.stderr
    logging.getLogger().addHandler(handler)
    showwarning = warnings.showwarning
    warnings.showwarning = _to(fh)
    try:
        yield Path(log)
    finally:
        warnings.showwarning = showwarning
        logging.getLogger().removeHandler(handler)
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if terminal is not None:
            terminal.close()
        fh.close()
        _console, _log_path, _log = previous


def _to(fh: TextIO):
    def showwarning(message, category, filename, lineno, file=None, line=None):
        fh.write(warnings.formatwarning(message, category, filename, lineno, line))

    return showwarning


@contextlib.contextmanager
def released() -> Iterator[None]:
    """Give file descriptor 2 back to the terminal for a while (e.g. for worker processes,
    which inherit it and capture their own output)."""
    if _log_path is None or _console is None:
        yield
        return
    try:
        terminal_fd = _console.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        yield
        return
    sys.stderr.flush()
    captured = os.dup(2)
    os.dup2(terminal_fd, 2)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(captured, 2)
        os.close(captured)
