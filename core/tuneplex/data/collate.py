"""Batches for the trainers: pad to the longest row, never attend across samples or padding.

No attention mask is produced. Every row carries position ids that restart at each sample
(packed rows) and again for the padding tail, so transformers' mask builder gives each sample,
and the padding, its own causal block. Call the model with `use_cache=False` (a KV cache turns
that detection off).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tuneplex.data.templates import IGNORE_INDEX


def collate(rows: Sequence[dict[str, Any]], *, pad_id: int, pad_to_multiple_of: int = 1):
    """{"input_ids", "labels", "position_ids"} LongTensors of shape (batch, longest)."""
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
        input_ids[i, :k] = torch.as_tensor(r["input_ids"])
        labels[i, :k] = torch.as_tensor(r["labels"])
        pos = r.get("position_ids")
        position_ids[i, :k] = torch.as_tensor(pos) if pos is not None else torch.arange(k)
        position_ids[i, k:] = torch.arange(longest - k)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
