"""Batches for the trainers: pad to the longest row, never attend across samples or padding.

No attention mask is produced. Every row carries position ids that restart at each sample
(packed rows) and again for the padding tail, so transformers' mask builder gives each sample,
and the padding, its own causal block. Call the model with `use_cache=False` (a KV cache turns
that detection off).

`targets` are the labels shifted by one (the token each position must predict), with the
last position of every sample masked (`tuneplex.data.targets`, the one home of that rule):
a sample never learns to predict the next sample's first token, and trainers need no shifting
of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tuneplex.data.targets import (
    IGNORE_INDEX,
    next_token_targets,
    target_counts,
    unshifted_labels,
)

EMPTY_ROW = {"input_ids": [0], "labels": [IGNORE_INDEX]}
"""A one-token row that counts for nothing: what a data-parallel rank with no rows left runs,
so that every rank takes part in the same collectives."""


def pad_rows(rows: Sequence[dict[str, Any]], *, length: int, pad_id: int, device=None):
    """{"input_ids", "labels", "position_ids"} LongTensors of shape (len(rows), length).

    The one padding rule of every layout: a row is followed by a padding tail that is a sample
    of its own (pad tokens, labels IGNORE_INDEX, position ids from 0), so no real token
    attends to padding, padding never becomes a target, and a row without position ids gets
    0, 1, ... Rows may be lists, numpy arrays or CPU tensors (e.g. the rows of a collated
    batch, padded further to a fixed shape: their tails then gain one more padding sample).
    """
    import numpy as np
    import torch

    n = len(rows)
    # filled in numpy and made a tensor once: per-row tensor writes cost more than the rows
    input_ids = np.full((n, length), pad_id, dtype=np.int64)
    labels = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.empty((n, length), dtype=np.int64)
    tail = np.arange(length, dtype=np.int64)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        if k > length:
            raise ValueError(f"a row of {k} tokens does not fit a length of {length}")
        input_ids[i, :k] = np.asarray(r["input_ids"])
        labels[i, :k] = np.asarray(r["labels"])
        pos = r.get("position_ids")
        position_ids[i, :k] = np.asarray(pos) if pos is not None else tail[:k]
        position_ids[i, k:] = tail[: length - k]
    out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    return {key: torch.from_numpy(v).to(device) for key, v in out.items()}


def collate(rows: Sequence[dict[str, Any]], *, pad_id: int, pad_to_multiple_of: int = 1):
    """{"input_ids", "labels", "position_ids", "targets"} LongTensors of shape (batch, longest)."""
    longest = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple_of > 1:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    batch = pad_rows(rows, length=longest, pad_id=pad_id)
    batch["targets"] = next_token_targets(
        labels=batch["labels"], position_ids=batch["position_ids"]
    )
    return batch


def collate_for_hf(rows: Sequence[dict[str, Any]], *, pad_id: int) -> dict[str, Any]:
    """A batch for a transformers model that shifts `labels` itself (Trainer, TRL): its labels
    are `unshifted_labels` of the targets, so the model's own shift yields exactly `targets`."""
    batch = collate(rows, pad_id=pad_id)
    batch["labels"] = unshifted_labels(batch.pop("targets"))
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
        self.values: dict[str, Any] = {}
        """Columns of one value per row (e.g. unpaired KTO data's `desirable`), as arrays."""
        for name in table.column_names:
            if name == "seq_lens":
                continue
            arr = table.column(name).combine_chunks()
            if not hasattr(arr, "offsets"):
                self.values[name] = arr.to_numpy(zero_copy_only=False)
                continue
            offsets = np.asarray(arr.offsets)
            values = np.asarray(arr.values)
            if offsets[0] != 0 or len(values) != offsets[-1]:
                values, offsets = values[offsets[0] : offsets[-1]], offsets - offsets[0]
            self._cols[name] = (values, offsets)
        values, offsets = self._cols["labels"]
        positions = self._cols.get("position_ids")
        self.lengths = np.diff(offsets)
        self.target_counts = target_counts(
            labels=values, offsets=offsets, position_ids=None if positions is None else positions[0]
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> dict[str, Any]:
        out = {}
        for name, (values, offsets) in self._cols.items():
            out[name] = values[offsets[i] : offsets[i + 1]]
        return out

    def take(self, indices) -> list[dict[str, Any]]:
        return [self.row(int(i)) for i in indices]
