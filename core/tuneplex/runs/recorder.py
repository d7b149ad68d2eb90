"""RunRecorder: everything about a run that is not training, the same for every backend.

A backend reports what happens (`begin`, `train_step`, `validated`, `checkpoint_saved`, and one
ending: `completed`, `stopped`, `diverged`, `failed`); the recorder writes metrics.jsonl and
summary.json, prints the progress, keeps the losses, the tokens and the elapsed time, feeds the
experiment trackers and draws the run's curves. In a multi-process run every rank keeps the
numbers (a checkpoint carries them), and only the main one writes, prints or logs anything.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from tuneplex.errors import Interrupted, TrainingStopped
from tuneplex.runs.records import (
    FINAL_DIR,
    ROLLOUTS_FILE,
    MetricsLog,
    RunHeader,
    run_summary,
    write_summary,
)

STATE_KEYS = ("tokens_seen", "elapsed_s", "train_loss", "val_loss", "best_val_loss")
"""What a checkpoint must carry for a resumed run to go on with the same numbers."""


class RunRecorder:
    def __init__(
        self,
        run_dir: Path,
        *,
        backend: str,
        job: Any = None,
        main: bool = True,
        device_type: str = "cpu",
        header: RunHeader | None = None,
        warn: Any = None,
    ):
        self.run_dir, self.backend, self.job, self.main = Path(run_dir), backend, job, main
        self.device_type = device_type
        self.header = header
        """What summary.json says about the model, the device and the data."""
        self.total_steps = 0
        self.steps_per_epoch = 1.0
        self.step = 0
        self.tokens_seen = 0
        self.train_loss: float | None = None
        self.val_loss: float | None = None
        self.best_val_loss: float | None = None
        self.last_checkpoint: str | None = None
        self.resumed_from: int | None = None
        self._elapsed_before = 0.0
        self._t0 = time.perf_counter()
        self._last_report = self._t0
        self._metrics: MetricsLog | None = None
        self._rollouts: MetricsLog | None = None
        self._progress = None
        self._trackers = None
        self._warn = warn
        self._ended = False

    # -- setting up ------------------------------------------------------------------------
    def restore(self, state: dict[str, Any], *, step: int, checkpoint: str) -> None:
        """Go on from a checkpoint: its step and the numbers `state()` put into it."""
        self.step = self.resumed_from = step
        self.last_checkpoint = checkpoint
        self.tokens_seen = int(state.get("tokens_seen") or 0)
        self._elapsed_before = float(state.get("elapsed_s") or 0.0)
        self.train_loss = state.get("train_loss")
        self.val_loss = state.get("val_loss")
        self.best_val_loss = state.get("best_val_loss")

    def state(self) -> dict[str, Any]:
        """The numbers a checkpoint carries (see `restore`)."""
        return {
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed(),
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "best_val_loss": self.best_val_loss,
        }

    def begin(self, *, total_steps: int, steps_per_epoch: float) -> None:
        """Training starts (or resumes): the files, the progress display and the trackers."""
        from tuneplex.progress import Progress

        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch or 1.0
        self._last_report = time.perf_counter()
        if not self.main:
            return
        self._metrics = MetricsLog(self.run_dir, resume_step=self.resumed_from)
        self._progress = Progress(total=total_steps, start=self.step)
        self._open_trackers()
        if self.resumed_from is not None:
            self.say(f"resuming from {self.last_checkpoint} (step {self.step})")

    def _open_trackers(self) -> None:
        from tuneplex.runs.trackers import Trackers, configured

        integrations = getattr(self.job, "integrations", None)
        if not configured(integrations):
            return
        from tuneplex.errors import redact

        self._trackers = Trackers.open(
            integrations,
            run_dir=self.run_dir,
            run_name=self.run_dir.name,
            config=redact(self.job.to_public_dict()),  # secrets never revealed, shown as ***
            resume=self.resumed_from is not None,
            warn=self._say_warning,
        )

    # -- what happens ----------------------------------------------------------------------
    def say(self, text: str) -> None:
        """A line for the user (above the progress bar on a terminal); rank 0 only."""
        if not self.main:
            return
        if self._progress is None:
            print(text, flush=True)
        else:
            self._progress.line(text)

    def _say_warning(self, text: str) -> None:
        (self._warn or self.say)(text)

    def elapsed(self) -> float:
        return self._elapsed_before + time.perf_counter() - self._t0

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    def train_step(
        self,
        *,
        step: int,
        loss: float,
        lr: float | None,
        grad_norm: float | None,
        tokens: int,
        seconds: float | None = None,
        epoch: float | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """An optimizer step (or, for a trainer that logs every n steps, the last of them):
        `tokens` since the previous report, taking `seconds` (default: the time since it)."""
        now = time.perf_counter()
        dt = seconds if seconds is not None else now - self._last_report
        self._last_report = now
        self.step = step
        self.tokens_seen += tokens
        self.train_loss = loss
        event = {
            "step": step,
            "epoch": round(self.epoch_of(step) if epoch is None else epoch, 4),
            "split": "train",
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "tokens_per_s": round(tokens / dt, 1) if dt > 0 else None,
            "elapsed_s": round(self.elapsed(), 3),
            **extra,
        }
        self._record(event)
        if self._progress is not None:
            self._progress.train(step, event)
        return event

    def validated(
        self, *, step: int, loss: float, tokens: int, epoch: float | None = None, **extra: Any
    ) -> None:
        self.val_loss = loss
        if self.best_val_loss is None or loss < self.best_val_loss:
            self.best_val_loss = loss
        epoch = self.epoch_of(step) if epoch is None else epoch
        event = {
            "step": step,
            "epoch": round(epoch, 4),
            "split": "val",
            "loss": loss,
            "tokens": tokens,
            "elapsed_s": round(self.elapsed(), 3),
            **extra,
        }
        self._record(event)
        if self._progress is not None:
            self._progress.val(step, epoch, loss, extra.get("reward"))
        self._last_report = time.perf_counter()  # validation time is not training throughput

    def checkpoint_saved(self, path: Path | str, *, step: int) -> None:
        self.last_checkpoint = str(path)
        self._last_report = time.perf_counter()

    def adopt_checkpoint(self, written: Path, *, step: int, keep: int | None) -> None:
        """A checkpoint a library wrote in its own place (HF's checkpoint-N): completed with
        tuneplex_complete.json, moved to checkpoints/step_N, older ones pruned to `keep`."""
        from tuneplex.runs.checkpoints import (
            checkpoint_path,
            mark_complete,
            prune_checkpoints,
            remove_checkpoint,
        )

        target = checkpoint_path(self.run_dir, step)
        mark_complete(written, step=step)  # last, after the library's own files
        if target.exists():
            remove_checkpoint(target)
        os.replace(written, target)
        self.checkpoint_saved(target, step=step)
        prune_checkpoints(self.run_dir, keep)

    def rollouts(self, *, step: int, records: list[dict[str, Any]]) -> None:
        """Samples of what the model generated at `step` (prompt, completion, reward, ...), one
        line each in rollouts.jsonl (a resumed run drops the lines after its checkpoint)."""
        if not self.main:
            return
        if self._rollouts is None:
            self._rollouts = MetricsLog(
                self.run_dir, resume_step=self.resumed_from, name=ROLLOUTS_FILE
            )
        for record in records:
            self._rollouts.write(step=step, **record)

    def _record(self, event: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.write(**event)
        if self._trackers is not None:
            from tuneplex.runs.trackers import tracker_metrics

            self._trackers.log(tracker_metrics(event), step=event["step"])

    # -- endings ---------------------------------------------------------------------------
    def summary(self, status: str, **extra: Any) -> dict[str, Any]:
        return run_summary(
            status,
            backend=self.backend,
            header=self.header,
            steps=self.step,
            total_steps=self.total_steps,
            epochs=self.epoch_of(self.step),
            train_loss=self.train_loss,
            val_loss=self.val_loss,
            best_val_loss=self.best_val_loss,
            tokens=self.tokens_seen,
            elapsed_s=self.elapsed(),
            device_type=self.device_type,
            last_checkpoint=self.last_checkpoint,
            **extra,
        )

    def completed(self, *, final: str | None = None) -> dict[str, Any] | None:
        """Training finished and final/ is written (`final`: what it holds)."""
        summary = self._end("completed")
        if final:
            self.say(f"final: {self.run_dir / FINAL_DIR} ({final})")
        return summary

    def stopped(self, signum: int | None, *, during: str | None = None) -> Interrupted:
        """A stop by a signal (or Ctrl-C): recorded, and the error that says how to go on."""
        from tuneplex.runs.endings import interrupted

        self._end("interrupted")
        return interrupted(
            f"interrupted at step {self.step}",
            backend=self.backend,
            signum=signum,
            during=during,
            continues_from=self.last_checkpoint,
        )

    def diverged(self, *, step: int, what: str, value: float) -> TrainingStopped:
        """A non-finite loss or gradient norm: recorded, and the error that ends the run."""
        self._end("diverged", failed_step=step)
        return TrainingStopped(
            f"step {step}: {what} is {value}; training stopped, nothing of this step was saved "
            f"(last good checkpoint: {self.last_checkpoint or 'none yet'}); lower "
            "optimizer.learning_rate or check the data"
        )

    def failed(self, error: TrainingStopped) -> TrainingStopped:
        """Training stopped by the job's own code (a reward that raised, say): recorded as
        failed at the step in progress, with the error's line; the error is passed on."""
        self._end("failed", failed_step=self.step + 1, error=str(error))
        return error

    def _end(self, status: str, **extra: Any) -> dict[str, Any] | None:
        self._close_progress()
        if not self.main or self._ended:
            return None
        self._ended = True
        summary = self.summary(status, **extra)
        write_summary(self.run_dir, summary)
        if self._metrics is not None:
            self._metrics.close()
        if self._trackers is not None:
            self._trackers.finish(status=status, summary=_finite(summary))
        self._draw()
        return summary

    def _draw(self) -> None:
        """The run's curves as run_dir/curves.png (nothing if matplotlib is not installed)."""
        from importlib.util import find_spec

        if find_spec("matplotlib") is None:
            return
        try:
            from tuneplex.runs.plots import plot_run

            plot_run(self.run_dir)
        except Exception as exc:  # a picture is never worth a failed run
            from tuneplex.errors import first_line

            self._say_warning(f"curves.png not drawn: {first_line(exc)}")

    def _close_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def close(self) -> None:
        """Release files and displays without an ending (a failure handled elsewhere)."""
        self._close_progress()
        for log in (self._metrics, self._rollouts):
            if log is not None:
                log.close()
        self._metrics = self._rollouts = None


def _finite(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if not (isinstance(v, float) and not math.isfinite(v))}
