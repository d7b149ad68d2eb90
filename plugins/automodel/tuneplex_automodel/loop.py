"""The automodel training loop, given the components the recipe (`trainer`) set up.

Each optimizer step takes `global_batch_size` items (the last step of an epoch the items left),
split into micro-batches; the loss is the mean over every counted token of the whole step, so
any split into micro-batches (or data-parallel ranks) gives the same gradient. What the loss
is, what it reports and how it is validated is the job's objective's (`objectives`): the loop
names none. It keeps what every objective shares: the plan, the learning rate, gradient sync
and scaling across micro-batches and ranks (`backward_micro_batches`), clipping, the
non-finite check, one host sync per step, the recorder, checkpoints and stops.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneplex.console import note
from tuneplex.data.collate import EMPTY_ROW, collate
from tuneplex.errors import Interrupted, Problem, TrainingStopped, UsageError
from tuneplex.runs import resume_checkpoint

from tuneplex_automodel.checkpoint import LAYOUT_KEY, Checkpointer, layout_of
from tuneplex_automodel.heap import release_freed
from tuneplex_automodel.model import compile_seconds
from tuneplex_automodel.parallel.mesh import clip_grad_norm
from tuneplex_automodel.plan import learning_rate

if TYPE_CHECKING:
    from tuneplex.runs import RunRecorder
    from tuneplex.signals import StopSignals

    from tuneplex_automodel.objectives import Objective, Table
    from tuneplex_automodel.parallel.mesh import Dist
    from tuneplex_automodel.parallel.parallelize import Parallelized
    from tuneplex_automodel.parallel.pp import Pipeline
    from tuneplex_automodel.plan import TrainPlan
    from tuneplex_automodel.schema import AutomodelJobInput
    from tuneplex_automodel.trainer import Runtime


# The loop's own keys in a checkpoint's trainer state (next to the recorder's)
EPOCH_KEY = "epoch"
STEP_IN_EPOCH_KEY = "step_in_epoch"
DATA_KEY = "data"
ROWS_KEY = "rows"
"""Under DATA_KEY: the training rows the run was planned for; a resume with other data would
replay a different order, so it is refused."""
SCHEDULE_KEY = "schedule"


@dataclass(frozen=True)
class Components:
    """Everything the loop works with, set up once by the recipe and never replaced."""

    job: AutomodelJobInput
    run_dir: Path
    runtime: Runtime
    dist: Dist
    model: Any
    optimizer: Any
    plan: TrainPlan
    objective: Objective
    train_rows: Table
    """The items the plan iterates: the objective's (`Objective.tables`)."""
    val_rows: Table | None
    pad_id: int
    loss: Callable[..., Any]
    """`loss(model, batch, autocast=...)`: this rank's part of the summed cross-entropy."""
    layout: Parallelized
    recorder: RunRecorder
    stop: StopSignals
    pipe: Pipeline | None = None


class Loop:
    """Steps from the recorded position to the plan's end; the step count is its only state."""

    def __init__(self, parts: Components):
        self.parts = parts
        self.params = [p for p in parts.model.parameters() if p.requires_grad]
        self.step = 0
        self.checkpoints = Checkpointer(
            run_dir=parts.run_dir,
            dist=parts.dist,
            asynchronous=parts.job.output.async_checkpoints,
            keep=parts.job.output.keep_checkpoints,
            on_saved=lambda path, step: parts.recorder.checkpoint_saved(path, step=step),
        )

    # -- resume ----------------------------------------------------------------------------
    def restore(self) -> None:
        p = self.parts
        found = resume_checkpoint(p.run_dir, warn=note if p.dist.is_main else _silent)
        if found is None:
            return
        step, path = found
        state = self.checkpoints.load(
            path, model=p.model, optimizer=p.optimizer, partial=p.pipe is not None
        )
        if state[DATA_KEY][ROWS_KEY] != p.plan.n_rows:
            raise UsageError(
                Problem(
                    "--resume",
                    f"the training data has {p.plan.n_rows} rows, the checkpoint was made with "
                    f"{state[DATA_KEY][ROWS_KEY]}; start a new run",
                )
            )
        self._say_layout(state.get(LAYOUT_KEY), path=path)
        self.step = step
        p.objective.restore(state)
        p.recorder.restore(state, step=step, checkpoint=str(path))

    def _say_layout(self, was: dict[str, Any] | None, *, path: Path) -> None:
        """A checkpoint resharded onto another layout says so, both layouts named."""
        dist = self.parts.dist
        now = layout_of(dist)
        if not dist.is_main or was is None or _shown(was) == _shown(now):
            return
        name = f"{path.parent.name}/{path.name}"
        note(f"tuneplex: {name} was written by {_shown(was)}; resharded onto {_shown(now)}")

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        p, plan = self.parts, self.parts.plan
        p.recorder.begin(total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch)
        p.objective.begin(p)
        if p.recorder.resumed_from is None and p.val_rows is not None:
            self._validate()  # the starting point, so the curve shows what training changed
        try:
            while self.step < plan.total_steps:
                epoch, within = plan.position(self.step)
                micro_plan = plan.epoch_steps(epoch, dp_rank=p.dist.dp_rank)
                step_rows = plan.step_rows(epoch)
                for i in range(within, len(micro_plan)):
                    if self.step >= plan.total_steps:
                        break
                    self._stop_if_asked()
                    self._train_step(micro_plan[i], step_rows[i])
            self._stop_if_asked()  # a signal during the last step
            self.checkpoints.wait()
        except KeyboardInterrupt:  # raised in the step, not by a signal handler of ours
            self.checkpoints.wait()
            raise self.stopped(None) from None
        finally:
            self.checkpoints.settle()

    def _stop_if_asked(self) -> None:
        """Between steps: stop if any rank was told to (every rank takes the same answer, so
        none waits in a collective), with a checkpoint at the last completed step."""
        p = self.parts
        self.checkpoints.poll()
        signum = p.dist.max_over_ranks(p.stop.signum)
        if not signum:
            return
        self._save_unsaved()
        raise self.stopped(signum)

    def _failed(self, error: TrainingStopped) -> TrainingStopped:
        """The step in progress is dropped; the last completed one is saved (if it was not), so
        that the run resumes once the cause is fixed; recorded as failed."""
        p = self.parts
        p.optimizer.zero_grad(set_to_none=True)
        self._save_unsaved()
        return p.recorder.failed(error)

    def _save_unsaved(self) -> None:
        """The last completed step saved (if it was not) and any save in flight finished, so
        that what the run says it can resume from is on disk."""
        if self.step and self.checkpoints.saved_step != self.step:
            self._checkpoint()
        self.checkpoints.wait()

    def stopped(self, signum: int | None, *, during: str | None = None) -> Interrupted:
        """Record the stop (rank 0); the error that says how to resume."""
        return self.parts.recorder.stopped(signum, during=during)

    def _train_step(self, micro_batches: list[list[int]], step_rows: list[int]) -> None:
        """One optimizer step: this rank's `micro_batches` of the step's rows `step_rows`
        (every rank's, which the loss is normalised by)."""
        p = self.parts
        tokens = int(p.train_rows.lengths[step_rows].sum())
        t0, compiling = time.perf_counter(), compile_seconds()
        o = p.job.optimizer
        lr = learning_rate(
            self.step,
            peak=o.learning_rate,
            warmup_steps=o.warmup_steps,
            total_steps=p.plan.total_steps,
            schedule=o.lr_schedule,
            min_lr=o.min_learning_rate,
        )
        for group in p.optimizer.param_groups:
            group["lr"] = lr
        step = self.step + 1
        for update in range(p.objective.updates_per_step):
            try:
                loss_value, *figures, norm_value = self._gradients(
                    micro_batches, step_rows, update=update
                )
            except TrainingStopped as exc:  # the job's own code failed: on every rank
                raise self._failed(exc) from exc
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                p.optimizer.zero_grad(set_to_none=True)
                what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                value = loss_value if what == "loss" else norm_value
                self.checkpoints.wait()  # the last good checkpoint, in place before the record
                raise p.recorder.diverged(step=step, what=what, value=value)
            p.optimizer.step()
            p.optimizer.zero_grad(set_to_none=True)
            release_freed(p.runtime.device)  # the step's temporaries, before the next forward
        self.step = step
        extra = p.objective.figures(figures)
        tokens = extra.pop("tokens", tokens)
        compiling = compile_seconds() - compiling
        if compiling > 0:  # part of this step's seconds, said apart from steady-state speed
            extra["compile_s"] = round(compiling, 3)
        p.recorder.train_step(
            step=step,
            loss=loss_value,
            lr=lr,
            grad_norm=norm_value,
            tokens=tokens,
            seconds=time.perf_counter() - t0,
            **extra,
        )
        if p.val_rows is not None and p.plan.validate_after(step):
            self._validate()
        if p.plan.checkpoint_after(step):
            self._checkpoint()

    def _gradients(self, micro_batches, step_rows: list[int], *, update: int) -> list[float]:
        """Forward and backward of the step (the objective's), gradients finished and clipped;
        the step's loss, the objective's figures and the gradient norm, the same on every
        rank, in one host sync."""
        import torch

        p = self.parts
        total, figures = p.objective.gradients(
            p, micro_batches=micro_batches, step_rows=step_rows, update=update, step=self.step
        )
        p.layout.finish_grads()
        grad_norm = clip_grad_norm(
            self.params,
            p.job.optimizer.max_grad_norm,
            device=p.runtime.device,
            sum_over_stages=p.dist.sum_over_stages,
        )
        sums = [total.reshape(1)] + ([figures] if figures is not None else [])
        # non-last pipeline stages hold 0: the sum over stages is the last stage's loss
        reduced = p.dist.sum_over_stages(p.dist.sum_over_data(torch.cat(sums)))
        return torch.cat([reduced, grad_norm.float().reshape(1)]).tolist()

    def _validate(self) -> None:
        p = self.parts
        loss, figures = p.objective.validate(p)
        tokens = int(p.val_rows.lengths.sum())
        p.recorder.validated(step=self.step, loss=loss, tokens=tokens, **figures)

    def _checkpoint(self) -> None:
        p = self.parts
        self.checkpoints.save(self.step, model=p.model, optimizer=p.optimizer, state=self._state())

    def _state(self) -> dict[str, Any]:
        """The trainer state saved with a checkpoint: where the loop is, the recorder's
        counters, and what `restore` checks the resumed run against."""
        p, o = self.parts, self.parts.job.optimizer
        epoch, step_in_epoch = p.plan.position(self.step)
        return {
            **p.objective.state(),
            EPOCH_KEY: epoch,
            STEP_IN_EPOCH_KEY: step_in_epoch,
            **p.recorder.state(),
            DATA_KEY: {ROWS_KEY: p.plan.n_rows},
            SCHEDULE_KEY: {
                "kind": f"linear warmup, then {o.lr_schedule}",
                "peak_lr": o.learning_rate,
                "min_lr": o.min_learning_rate,
                "warmup_steps": o.warmup_steps,
                "total_steps": p.plan.total_steps,
            },
        }

    def close(self) -> None:
        self.parts.recorder.close()


# -- what objectives share -------------------------------------------------------------------
MicroLoss = Callable[[list[int]], tuple[Any, Any | None]]
"""`loss_of(indices)`: a micro-batch's share of the step's loss (a scalar tensor with its
graph), and its share of the step's figures (a detached float32 vector) or None."""


def gradient_scale(dist: Dist) -> int:
    """What a loss is multiplied by before its backward: FSDP averages gradients over the
    data(-and-context)-parallel ranks, and each rank's loss is already its share of the step's
    mean, so the average is scaled back to the sum."""
    return dist.dp_cp_size


def backward_micro_batches(
    parts: Components, micro_batches: list[list[int]], *, loss_of: MicroLoss
) -> tuple[Any, Any | None]:
    """Forward (`loss_of`) and backward of each of this rank's micro-batches; returns this
    rank's summed loss and figures. Under FSDP2 each micro-batch's gradients are
    reduce-scattered as its backward makes them (FSDP2's default, as torchtitan keeps it), so
    a rank accumulates only its shard: skipping the sync until the last micro-batch would hold
    every parameter's unsharded fp32 gradient on every rank (52 GB for a 13B model). A rank
    with no rows left in a short last step gets `[]`, and still runs the forward and its
    collectives."""
    import torch

    p = parts
    scale = gradient_scale(p.dist)
    total = torch.zeros((), dtype=torch.float32, device=p.runtime.device)
    figures = None
    for indices in micro_batches:
        loss, share = loss_of(indices)
        (loss * scale if scale > 1 else loss).backward()
        release_freed(p.runtime.device)  # this pass's activations, before the next one's
        total += loss.detach()
        if share is not None:
            if figures is None:
                figures = torch.zeros(share.shape, dtype=torch.float32, device=total.device)
            figures += share
    return total, figures


def device_batch(table: Table, indices, *, pad_id: int, device) -> dict[str, Any]:
    """The collated micro-batch of `indices` on `device` (the one-token row that counts for
    nothing where `indices` is empty: a rank with no rows still runs the forward)."""
    rows = table.take(indices) if len(indices) else [EMPTY_ROW]
    batch = collate(rows, pad_id=pad_id)
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


def _shown(layout: dict[str, Any]) -> str:
    n = layout["processes"]
    return f"{n} process{'es' if n > 1 else ''} ({layout['shown']})"


def _silent(_: str) -> None:
    """Ranks other than 0 say nothing."""
