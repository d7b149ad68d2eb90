"""Supervised fine-tuning: the mean cross-entropy over every counted token of a step.

The only objective that runs under pipeline parallelism: a step is then one schedule step over
the step's micro-batches (`parallel.pp.Pipeline`), and validation runs through the stages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tuneplex.data.collate import RowTable
from tuneplex.nn.evaluation import evaluate

from tuneplex_automodel.loop import backward_micro_batches, device_batch, gradient_scale

if TYPE_CHECKING:
    from tuneplex.data.pipeline import Prepared

    from tuneplex_automodel.loop import Components
    from tuneplex_automodel.parallel.mesh import Dist
    from tuneplex_automodel.schema import AutomodelJobInput
    from tuneplex_automodel.trainer import Runtime


class Sft:
    """Rows in, cross-entropy out; nothing to set up, nothing to keep."""

    updates_per_step = 1
    unit = "rows"
    separate_head = False
    models: tuple[tuple[str, str], ...] = ()

    def __init__(self, job: AutomodelJobInput):
        del job  # nothing to read: the loss is the layout's (`Components.loss`)

    def tables(self, prepared: Prepared) -> tuple[RowTable, RowTable | None]:
        return row_tables(prepared)

    def setup_model(self, model: Any, *, tokenizer: Any, runtime: Runtime, dist: Dist) -> None:
        """Nothing: the model as loaded is the model trained."""

    def begin(self, parts: Components) -> None:
        """Nothing before the first step."""

    def gradients(
        self, parts: Components, *, micro_batches: list[list[int]], step_rows: list[int], **_: Any
    ) -> tuple[Any, None]:
        n_targets = max(int(parts.train_rows.target_counts[step_rows].sum()), 1)
        if parts.pipe is not None:
            return pipeline_gradients(parts, micro_batches, n_targets=n_targets), None

        def loss_of(indices: list[int]):
            batch = device_batch(
                parts.train_rows, indices, pad_id=parts.pad_id, device=parts.runtime.device
            )
            return parts.loss(parts.model, batch, autocast=parts.runtime.autocast) / n_targets, None

        total, _ = backward_micro_batches(parts, micro_batches, loss_of=loss_of)
        return total, None

    def figures(self, sums: list[float]) -> dict[str, float]:
        return {}

    def validate(self, parts: Components) -> tuple[float, dict[str, float]]:
        return token_mean_loss(parts), {}

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Nothing to take back."""


def row_tables(prepared: Prepared) -> tuple[RowTable, RowTable | None]:
    """One item per prepared row (packed rows when packing): the training and validation
    tables of every objective that trains on rows."""
    validation = prepared.validation
    return (
        RowTable(prepared.train.dataset),
        RowTable(validation.dataset) if validation is not None else None,
    )


def pipeline_gradients(parts: Components, micro_batches: list[list[int]], *, n_targets: int):
    """The step's micro-batches through the pipeline schedule (its micro-batches are the
    step's); this rank's share of the loss on the last stage, 0 on the others."""
    pipe, scale = parts.pipe, gradient_scale(parts.dist)
    batch = pipe.batch(
        [parts.train_rows.take(indices) for indices in micro_batches], device=parts.runtime.device
    )
    return pipe.train_step(batch, scale=scale / n_targets) / scale


def token_mean_loss(parts: Components) -> float:
    """The mean cross-entropy over every counted validation token (`evaluate`, through the
    stages under pipeline parallelism): every rank its share, summed over ranks and stages."""
    pipe, dist = parts.pipe, parts.dist
    return evaluate(
        parts.model if pipe is None else pipe.module,
        parts.val_rows,
        micro=parts.plan.micro_batch if pipe is None else pipe.rows_per_step,
        pad_id=parts.pad_id,
        device=parts.runtime.device,
        autocast=parts.runtime.autocast,
        shard=(dist.dp_rank, dist.dp_size),
        reduce=lambda t: dist.sum_over_stages(dist.sum_over_data(t)),
        loss=parts.loss if pipe is None else pipe.loss_sum,
    )
