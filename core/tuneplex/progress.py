"""What a training run prints: a progress bar on a terminal, plain log lines otherwise.

Validation results and notes are always printed as lines (above the bar on a terminal), so
they stay in the scrollback and in captured logs.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


def format_train(step: int, total: int, event: dict[str, Any]) -> str:
    parts = [f"step {step}/{total}", f"epoch {event['epoch']:.2f}", f"loss {event['loss']:.4f}"]
    if event.get("reward") is not None:  # reinforcement learning: what it is after
        parts.append(f"reward {event['reward']:.4f}")
    if "lr" in event:
        parts.append(f"lr {event['lr']:.3g}")
    if event.get("grad_norm") is not None:
        parts.append(f"grad_norm {event['grad_norm']:.3f}")
    if event.get("tokens_per_s") is not None:
        parts.append(f"{event['tokens_per_s']:,.0f} tok/s")
    return "[train] " + " | ".join(parts)


def format_val(step: int, epoch: float, loss: float, reward: float | None = None) -> str:
    line = f"[val] step {step} | epoch {epoch:.2f} | loss {loss:.4f}"
    return line + (f" | reward {reward:.4f}" if reward is not None else "")


class Progress:
    """`bar=None` picks: a rich bar when `stream` is a terminal, lines otherwise."""

    def __init__(
        self, *, total: int, start: int = 0, stream: TextIO | None = None, bar: bool | None = None
    ):
        self.total = total
        self.start = start
        self.every = max(1, -(-total // 100))
        """Plain mode prints about 100 train lines per run (metrics.jsonl has every step)."""
        self.stream = stream or sys.stdout
        use_bar = self.stream.isatty() if bar is None else bar
        self._bar = None
        if use_bar:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(file=self.stream),
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def train(self, step: int, event: dict[str, Any]) -> None:
        if self._bar is None:
            if step % self.every == 0 or step in (self.start + 1, self.total):
                self.line(format_train(step, self.total, event))
            return
        info = f"loss {event['loss']:.4f}  lr {event.get('lr', 0):.3g}"
        if event.get("reward") is not None:
            info += f"  reward {event['reward']:.4f}"
        if event.get("tokens_per_s") is not None:
            info += f"  {event['tokens_per_s']:,.0f} tok/s"
        self._bar.update(self._task, completed=step, info=info)

    def val(self, step: int, epoch: float, loss: float, reward: float | None = None) -> None:
        self.line(format_val(step, epoch, loss, reward))

    def line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


NOISY_LOGGERS = ("torch.utils._pytree", "bitsandbytes.backends.cpu.ops")
"""Loggers that warn at import time about other libraries' code (e.g. torchao registering enums
with torch's pytree), nothing a user of a training run can act on."""


def quiet_third_party_logs() -> None:
    import logging

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
