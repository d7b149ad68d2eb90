"""What `generate`, `chat`, `eval` and `export` share: the TARGET argument, `--checkpoint`, and
resolving a TARGET for as long as a command uses it."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from tuneplex.inference.target import Target

TargetArg = Annotated[
    str,
    typer.Argument(
        help="A run directory (its final/), a model or adapter directory, or a Hugging Face id."
    ),
]
CheckpointOpt = Annotated[
    str | None,
    typer.Option("--checkpoint", help="With a run: best, latest or step_N instead of its final/."),
]


@contextlib.contextmanager
def resolved(target: str, *, checkpoint: str | None, device: str) -> Iterator[Target]:
    """The Target `target` names. A checkpoint's loadable copy lives in a temporary directory
    for as long as the block runs; a defect inside the block is one line (traceback logged)."""
    from tuneplex import console
    from tuneplex.inference.target import resolve
    from tuneplex.progress import quiet_third_party_logs

    quiet_third_party_logs()
    with (
        tempfile.TemporaryDirectory(prefix="tuneplex-weights-") as scratch,
        console.defects_as_one_line(),
    ):
        yield resolve(target, checkpoint=checkpoint, device=device, scratch=Path(scratch))
