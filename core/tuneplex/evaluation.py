"""The loss every backend reports: summed cross-entropy over counted targets, and the
validation loss as the mean over every counted token of the validation rows.

Computed the same way for every backend (one forward per micro-batch of `collate`d rows), so
validation losses compare across backends. Imports torch when called.
"""

from __future__ import annotations

from typing import Any

from tuneplex.data.collate import RowTable, collate
from tuneplex.data.templates import IGNORE_INDEX


def loss_sum(model, batch: dict[str, Any], *, autocast=None):
    """Summed cross-entropy (float32) of `batch["targets"]`; no attention mask, no KV cache."""
    import contextlib

    import torch
    import torch.nn.functional as F

    ctx = (
        torch.autocast(device_type=batch["input_ids"].device.type, dtype=autocast)
        if autocast is not None
        else contextlib.nullcontext()
    )
    with ctx:
        out = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        )
    logits = out.logits
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        batch["targets"].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def evaluate(model, rows: RowTable, *, micro: int, pad_id: int, device, autocast=None) -> float:
    """Mean loss over every counted token of `rows` (the model is left in its former mode)."""
    import torch

    count = int(rows.target_counts.sum())
    total = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), micro):
            chunk = rows.rows(range(start, min(start + micro, len(rows))))
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id=pad_id).items()}
            total += loss_sum(model, batch, autocast=autocast).double()
    model.train(was_training)
    return total.item() / max(count, 1)


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
