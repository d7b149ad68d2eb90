"""How many steps, which rows in which micro-batch, the learning rate at each step, when to
validate and save. Pure functions of the job and the data size, so a resumed run, and every
data-parallel rank, compute exactly the same plan. No torch here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_LR_RATIO = 0.1
"""Where decay ends when `optimizer.min_learning_rate` is not given: 10% of the peak."""


@dataclass(frozen=True)
class TrainPlan:
    n_rows: int
    global_batch: int
    micro_batch: int
    epochs: int
    max_steps: int | None
    seed: int
    val_check_interval: float | None
    checkpoint_steps: int | None
    dp_size: int = 1

    @property
    def steps_per_epoch(self) -> int:
        """The last step of an epoch takes the rows left over (nothing is dropped)."""
        return math.ceil(self.n_rows / self.global_batch)

    @property
    def total_steps(self) -> int:
        full = self.epochs * self.steps_per_epoch
        return min(full, self.max_steps) if self.max_steps else full

    def unreached_cap(self) -> str | None:
        """What to say first when max_steps caps nothing (the epochs end first): it is a cap,
        where Automodel and Hugging Face users expect it to override the epochs."""
        full = self.epochs * self.steps_per_epoch
        if not self.max_steps or self.max_steps <= full:
            return None
        unit = "epoch" if self.epochs == 1 else "epochs"
        return (
            f"max_steps {self.max_steps} > {self.epochs} {unit} × {self.steps_per_epoch} steps: "
            f"stopping after {full}; raise schedule.epochs"
        )

    def epoch_of(self, step: int) -> float:
        """Epochs completed after optimizer step `step` (1-based), as a fraction."""
        return step / self.steps_per_epoch

    def position(self, step: int) -> tuple[int, int]:
        """(epoch index, step index within the epoch) of 0-based optimizer step `step`."""
        return divmod(step, self.steps_per_epoch)

    def epoch_steps(self, epoch: int, *, dp_rank: int = 0) -> list[list[list[int]]]:
        """The micro-batches (lists of row indices) of each step of `epoch`, for one DP rank.

        The order is a permutation seeded by (seed, epoch); a step's rows are split evenly
        across data-parallel ranks, then into micro-batches of at most `micro_batch` rows.
        """
        import numpy as np

        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
        steps = []
        for start in range(0, self.n_rows, self.global_batch):
            chunk = order[start : start + self.global_batch]
            mine = np.array_split(chunk, self.dp_size)[dp_rank]
            micro_steps = math.ceil(len(chunk) / (self.micro_batch * self.dp_size))
            steps.append([m.tolist() for m in np.array_split(mine, micro_steps)])
        return steps

    def step_rows(self, epoch: int) -> list[list[int]]:
        """All rows of each step of `epoch` (every rank's), for the loss normaliser."""
        import numpy as np

        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
        size = self.global_batch
        return [order[s : s + size].tolist() for s in range(0, self.n_rows, size)]

    def validate_after(self, step: int) -> bool:
        """Validate after 1-based optimizer step `step`? Every `val_check_interval` of an epoch
        (rounded up to whole steps; the epoch's end included) and at the last step."""
        if step == self.total_steps:
            return True
        if self.val_check_interval is None:
            return False
        within = (step - 1) % self.steps_per_epoch + 1
        return within in self._val_points()

    def _val_points(self) -> set[int]:
        spe, v = self.steps_per_epoch, self.val_check_interval
        count = math.floor(1 / v + 1e-9)
        points = {min(spe, max(1, math.ceil(k * v * spe - 1e-9))) for k in range(1, count + 1)}
        if count * v >= 1 - 1e-9:
            points.add(spe)
        return points

    def checkpoint_after(self, step: int) -> bool:
        """Every `checkpoint_steps` steps (null: at each epoch's end), and at the last step."""
        if step == self.total_steps:
            return True
        if self.checkpoint_steps is not None:
            return step % self.checkpoint_steps == 0
        return step % self.steps_per_epoch == 0


def learning_rate(
    step: int,
    *,
    peak: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "cosine",
    min_lr: float | None = None,
) -> float:
    """Rate for 0-based optimizer step `step`: linear warmup over `warmup_steps` (the first
    step already moves), then `schedule` — cosine or linear decay to `min_lr` (None:
    MIN_LR_RATIO × peak) at the last step, or flat (the peak until the end)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if schedule == "flat" or decay_steps <= 1:
        return peak
    progress = min(1.0, (step - warmup_steps) / (decay_steps - 1))
    floor = MIN_LR_RATIO * peak if min_lr is None else min_lr
    if schedule == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
