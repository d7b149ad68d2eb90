"""Batches for the trainers: pad to the longest row, never attend across samples or padding.

No attention mask is produced. Every row carries position ids that restart at each sample
(packed rows) and again for the padding tail, so transformers' mask builder gives each sample,
and the padding, its own causal block. Call the model with `use_cache=False` (a KV cache turns
that detection off).

`targets` are the labels shifted by one (the token each position must predict), with the
last position of every sample masked: a sample never learns to predict the next sample's
first token, and trainers need no shifting of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tuneplex.data.templates import IGNORE_INDEX

EMPTY_ROW = {"input_ids": [0], "labels": [IGNORE_INDEX]}
"""A one-token row that counts for nothing: what a data-parallel rank with no rows left runs,
so that every rank takes part in the same collectives."""


def collate(rows: Sequence[dict[str, Any]], *, pad_id: int, pad_to_multiple_of: int = 1):
    """{"input_ids", "labels", "position_ids", "targets"} LongTensors of shape (batch, longest)."""
    import torch

    longest = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple_of > 1:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    n = len(rows)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, longest), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        input_ids[i, :k] = torch.tensor(r["input_ids"])
        labels[i, :k] = torch.tensor(r["labels"])
        pos = r.get("position_ids")
        position_ids[i, :k] = torch.tensor(pos) if pos is not None else torch.arange(k)
        position_ids[i, k:] = torch.arange(longest - k)
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:].masked_fill(position_ids[:, 1:] == 0, IGNORE_INDEX)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "targets": targets,
    }


def collate_for_hf(rows: Sequence[dict[str, Any]], *, pad_id: int) -> dict[str, Any]:
    """A batch for a transformers model that shifts `labels` itself (Trainer, TRL): the labels
    are `targets` moved back one place, so the model's own shift yields exactly `targets`,
    and its count of labels != -100 is the count of trained predictions."""
    import torch

    batch = collate(rows, pad_id=pad_id)
    targets = batch.pop("targets")
    labels = torch.full_like(targets, IGNORE_INDEX)
    labels[:, 1:] = targets[:, :-1]
    batch["labels"] = labels
    return batch


class RowTable:
    """Rows of a prepared split as numpy views over its Arrow columns (no per-row copies).

    `target_counts[i]` is how many tokens of row i count in the loss once shifted (what
    `collate` puts in `targets`), known before any forward pass: trainers normalise a step's
    loss by the step's total without a device sync.
    """

    def __init__(self, dataset):
        import numpy as np

        table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
        indices = getattr(dataset, "_indices", None)
        if indices is not None:  # a selected/shuffled view: materialise it once
            dataset = dataset.flatten_indices()
            table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
        self._cols: dict[str, tuple[Any, Any]] = {}
        for name in table.column_names:
            if name == "seq_lens":
                continue
            arr = table.column(name).combine_chunks()
            offsets = np.asarray(arr.offsets)
            values = np.asarray(arr.values)
            if offsets[0] != 0 or len(values) != offsets[-1]:
                values, offsets = values[offsets[0] : offsets[-1]], offsets - offsets[0]
            self._cols[name] = (values, offsets)
        values, offsets = self._cols["labels"]
        counted = values != IGNORE_INDEX
        if "position_ids" in self._cols:
            starts = self._cols["position_ids"][0] == 0
        else:
            starts = np.zeros(len(values), dtype=bool)
            starts[offsets[:-1]] = True
        counted &= ~starts  # a sample's first token is never a prediction target
        lengths = np.diff(offsets)
        self.lengths = lengths
        self.target_counts = np.add.reduceat(counted.astype(np.int64), offsets[:-1])
        self.target_counts[lengths == 0] = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> dict[str, Any]:
        out = {}
        for name, (values, offsets) in self._cols.items():
            out[name] = values[offsets[i] : offsets[i + 1]]
        return out

    def rows(self, indices) -> list[dict[str, Any]]:
        return [self.row(int(i)) for i in indices]
