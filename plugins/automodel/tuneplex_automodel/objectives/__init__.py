"""Training objectives: what differs between SFT, distillation and preference tuning.

An objective owns where its micro-batches come from, what it sets up on the model side, what it
does before the first step, its loss and the figures it reports, its validation and the state
it keeps in a checkpoint (torchtune's recipe-per-objective and TRL's trainer-per-loss, as one
small protocol). The recipe (`trainer`) and the loop (`loop`) ask the objective of the job and
name none; adding one is a module here and an entry in `OBJECTIVES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from tuneplex_automodel.objectives.distill import Distillation
from tuneplex_automodel.objectives.dpo import Dpo
from tuneplex_automodel.objectives.grpo import Grpo
from tuneplex_automodel.objectives.sft import Sft

if TYPE_CHECKING:
    from tuneplex.data.pipeline import Prepared

    from tuneplex_automodel.loop import Components
    from tuneplex_automodel.parallel.mesh import Dist
    from tuneplex_automodel.schema import AutomodelJobInput
    from tuneplex_automodel.trainer import Runtime


class Table(Protocol):
    """The items a plan iterates (a row, a pair of rows, ...), as the loop reads them: sizes
    known before any forward pass, so a step's loss is normalised without a device sync."""

    lengths: Any
    """Tokens of each item (numpy): the step's `tokens` figure."""
    target_counts: Any
    """Tokens of each item that count in the loss (numpy)."""

    def __len__(self) -> int: ...

    def take(self, indices: Any) -> list[dict[str, Any]]:
        """The rows of `indices`, ready for `collate`."""
        ...


@runtime_checkable
class Objective(Protocol):
    """One training objective, as the recipe and the loop use it."""

    unit: str
    """What one item of its tables is called in the opening line ("rows", "pairs")."""
    updates_per_step: int
    """Optimizer updates per step of the plan (GRPO's μ: several on one batch of rollouts; 1
    for the others): `gradients` is called once per update, `update` counting them."""
    separate_head: bool
    """Whether it calls the output head apart from the decoder: the parallel layer then keeps
    the head an FSDP unit of its own (`parallelize(separate_head=...)`)."""
    models: tuple[tuple[str, str], ...]
    """Checkpoints it loads besides the model, as (job key, reference): the recipe checks them
    before any data work, in one line each."""

    def tables(self, prepared: Prepared) -> tuple[Table, Table | None]:
        """The training and validation items from the prepared data (a source that generates
        its items, such as rollouts, starts from the prompts it holds)."""
        ...

    def setup_model(self, model: Any, *, tokenizer: Any, runtime: Runtime, dist: Dist) -> None:
        """Its own model-side setup, before parallelism is applied (a teacher loaded and
        checked against the student); the checks that refuse come before wasted work."""
        ...

    def begin(self, parts: Components) -> None:
        """Before this process's first step (after `restore` on a resumed run)."""
        ...

    def gradients(
        self,
        parts: Components,
        *,
        micro_batches: list[list[int]],
        step_rows: list[int],
        update: int,
        step: int,
    ) -> tuple[Any, Any | None]:
        """Forward and backward of this rank's `micro_batches` of the step whose items (every
        rank's) are `step_rows` (0-based plan step `step`, its update `update`): this rank's
        share of the step's loss (a scalar tensor) and of its figures (a float32 vector, or
        None), which the loop sums over ranks. `loop.backward_micro_batches` does the gradient
        sync and scaling for a loss per micro-batch."""
        ...

    def figures(self, sums: list[float]) -> dict[str, float]:
        """The step's metrics (names as metrics.jsonl keeps them) from its summed figures; a
        `tokens` entry replaces the step's tokens (items' lengths) where the objective
        processes others (generated completions)."""
        ...

    def validate(self, parts: Components) -> tuple[float, dict[str, float]]:
        """The validation loss over every validation item, and figures to record with it."""
        ...

    def state(self) -> dict[str, Any]:
        """What it keeps in a checkpoint's trainer state (JSON values, keys of its own)."""
        ...

    def restore(self, state: dict[str, Any]) -> None:
        """Take back what `state` saved, from a checkpoint's trainer state."""
        ...


# Optional members: `plan_sizes(dims) -> (items per step, items per rank and micro-batch)`
# where a step's items are not the job's batch sizes (GRPO's prompts); `batch_text(dims) ->
# str` to say the step's make-up in the opening line; `generates = True` for an objective that
# generates with the trained layers (they are then never compiled).

OBJECTIVES: dict[str, Callable[[AutomodelJobInput], Objective]] = {
    "sft": Sft,
    "distillation": Distillation,
    "dpo": Dpo,
    "grpo": Grpo,
}
"""`training.training_type` -> a factory of its objective, given the job."""


def objective_for(job: AutomodelJobInput) -> Objective:
    """The objective of `job` (cheap: nothing is loaded until `setup_model`)."""
    return OBJECTIVES[job.training.training_type](job)
