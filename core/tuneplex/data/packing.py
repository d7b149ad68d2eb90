"""Best-fit packing of tokenized examples into rows of at most `max_len` tokens.

A packed row carries `position_ids` restarting at 0 for every sample. Given position ids and no
attention mask, transformers' causal-mask builder (and flash-attention's varlen path) keeps
attention inside each sample, so packing never leaks context between samples.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of example indices; best-fit decreasing (each example into the fullest bin it fits).

    O(n log n) via a sorted list of (free space, bin id). Longest examples go first, so bins
    fill well; within equal lengths the original order is kept (deterministic).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # sorted (remaining, bin id)
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the pack size {capacity}")
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            remaining, b = free.pop(pos)
            bins[b].append(i)
            remaining -= n
        else:
            b = len(bins)
            bins.append([i])
            remaining = capacity - n
        if remaining > 0:
            bisect.insort(free, (remaining, b))
    return bins


def pack(examples: Sequence[tuple[Any, Any]], capacity: int) -> list[dict[str, Any]]:
    """Concatenate (ids, labels) arrays bin by bin; position ids restart at each sample."""
    import numpy as np

    bins = best_fit([len(ids) for ids, _ in examples], capacity)
    rows = []
    for members in bins:
        members = sorted(members)
        lens = [len(examples[i][0]) for i in members]
        rows.append(
            {
                "input_ids": np.concatenate([examples[i][0] for i in members]).astype(np.int32),
                "labels": np.concatenate([examples[i][1] for i in members]).astype(np.int32),
                "position_ids": np.concatenate([np.arange(n, dtype=np.int32) for n in lens]),
                "seq_lens": np.asarray(lens, dtype=np.int32),
            }
        )
    return rows
