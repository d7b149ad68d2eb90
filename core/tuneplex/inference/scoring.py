"""`tuneplex eval`: a model's loss on a data file, with the training pipeline's masks and the
validation loss's own rule, and its answers scored against each row's reference.

A run's validation loss is the mean cross-entropy over every trained token of its validation
rows (`tuneplex.nn.evaluation.evaluate`); the same function on the same rows, tokenized by the
same pipeline with the run's data settings, gives the same number here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tuneplex.inference.engine import Completion, Sampling
from tuneplex.inference.loading import Loaded
from tuneplex.inference.prompts import Prompt

DATA_KEY = "--data"


@dataclass(frozen=True)
class Scores:
    """One model's figures on one data file, and what it answered."""

    figures: dict[str, float | int | None]
    """loss, perplexity, n (rows), then each metric's mean."""
    prompts: list[Prompt]
    completions: list[Completion]


def data_loss(loaded: Loaded, path: str | Path, rows: list, *, batch_size: int):
    """(mean loss over every trained token of the file's `rows`, rows kept): the training
    pipeline's tokens and masks (the run's template, format and max_seq_length), unpacked."""
    from tuneplex.data.collate import RowTable
    from tuneplex.data.pipeline import build
    from tuneplex.nn.evaluation import evaluate, pad_id_of

    target = loaded.target
    spec = replace(
        target.spec,
        train=str(path),
        train_key=DATA_KEY,
        packing=False,
        preference=False,
        skip_invalid_rows=False,
    )
    if target.run is None:  # a model's own limit, not a run's
        limit = getattr(loaded.model.config, "max_position_embeddings", None) or 1 << 20
        spec = replace(spec, max_seq_length=int(limit))
    split = build(rows, spec, loaded.tokenizer, key=DATA_KEY)
    table = RowTable(split.examples)
    loss = evaluate(
        loaded.model,
        table,
        micro=batch_size,
        pad_id=pad_id_of(loaded.tokenizer),
        device=loaded.device,
        autocast=loaded.autocast,
    )
    return loss, len(table)


def score(
    loaded: Loaded,
    path: str | Path,
    rows: list,
    *,
    metrics: tuple[str, ...],
    sampling: Sampling,
    batch_size: int,
    progress=None,
) -> Scores:
    """Loss and perplexity on the file's `rows` (`prompts.read_file_rows`), and (with
    `metrics`) the greedy answers to their prompts scored against their references."""
    from tuneplex.inference.metrics import score_all

    loss, n = data_loss(loaded, path, rows, batch_size=batch_size)
    figures: dict[str, float | int | None] = {
        "loss": loss,
        "perplexity": _perplexity(loss),
        "n": n,
    }
    prompts: list[Prompt] = []
    completions: list[Completion] = []
    if metrics:
        prompter, generator = loaded.engine()
        prompts = prompter.from_rows(path, rows, key=DATA_KEY)
        prompts = [p for p in prompts if p.reference is not None]
        completions = generator.generate(
            [p.ids for p in prompts], sampling, batch_size=batch_size, progress=progress
        )
        found = score_all(
            names=metrics,
            predictions=[c.text for c in completions],
            references=[p.reference for p in prompts],
        )
        figures.update({name: found.means.get(name) for name in metrics})
    return Scores(figures=figures, prompts=prompts, completions=completions)


def _perplexity(loss: float) -> float | None:
    try:
        return math.exp(loss)
    except OverflowError:
        return None


def side_by_side(model: dict[str, Any], baseline: dict[str, Any] | None) -> list[str]:
    """The figures as aligned lines: name, (base,) tuned, (change)."""
    names = list(model)
    width = max(len(n) for n in names)
    head = f"{'':<{width}}  " + (
        f"{'base':>10}  {'tuned':>10}  {'change':>10}" if baseline else f"{'value':>10}"
    )
    lines = [head.rstrip()]
    for name in names:
        tuned = model[name]
        if baseline is None:
            lines.append(f"{name:<{width}}  {_fmt(tuned):>10}")
            continue
        base = baseline.get(name)
        change = (
            tuned - base
            if isinstance(tuned, int | float) and isinstance(base, int | float) and name != "n"
            else None
        )
        sign = "+" if change is not None and change >= 0 else ""
        shown = f"{sign}{_fmt(change)}" if change is not None else ""
        lines.append(f"{name:<{width}}  {_fmt(base):>10}  {_fmt(tuned):>10}  {shown:>10}")
    return lines


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)
