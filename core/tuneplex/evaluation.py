"""The loss every backend reports: summed cross-entropy over counted targets, and the
validation loss as the mean over every counted token of the validation rows.

Computed the same way for every backend (one forward per micro-batch of `collate`d rows), so
validation losses compare across backends. Imports torch when called.
"""

from __future__ import annotations

from typing import Any

from tuneplex.data.collate import EMPTY_ROW, RowTable, collate
from tuneplex.data.targets import summed_cross_entropy


def loss_sum(model, batch: dict[str, Any], *, autocast=None):
    """Summed cross-entropy (float32) of `batch["targets"]`; no KV cache. The mask comes from the
    position ids, unless the batch carries a prepared 4-D `attention_mask` (context parallelism)."""
    import contextlib

    import torch

    ctx = (
        torch.autocast(device_type=batch["input_ids"].device.type, dtype=autocast)
        if autocast is not None
        else contextlib.nullcontext()
    )
    with ctx:
        extra = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
        out = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            use_cache=False,
            **extra,
        )
    return summed_cross_entropy(logits=out.logits, targets=batch["targets"])


def evaluate(
    model,
    rows: RowTable,
    *,
    micro: int,
    pad_id: int,
    device,
    autocast=None,
    shard: tuple[int, int] = (0, 1),
    reduce=None,
    loss=loss_sum,
) -> float:
    """Mean loss over every counted token of `rows` (the model is left in its former mode).

    With `shard=(rank, size)` this rank evaluates rows rank, rank+size, ... in the same number
    of forward passes as every other rank, and `reduce` sums the partial loss over ranks.
    `loss(model, batch, autocast=...)` replaces `loss_sum` (e.g. this rank's share of a batch
    whose sequence is split across ranks).
    """
    import math

    import torch

    rank, size = shard
    mine = list(range(rank, len(rows), size))
    passes = math.ceil(math.ceil(len(rows) / size) / micro)
    count = int(rows.target_counts.sum())
    total = torch.zeros((), dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(passes):
            chunk = mine[i * micro : (i + 1) * micro]
            data = rows.take(chunk) if chunk else [EMPTY_ROW]
            batch = {k: v.to(device) for k, v in collate(data, pad_id=pad_id).items()}
            total += loss(model, batch, autocast=autocast)
    model.train(was_training)
    if reduce is not None:
        total = reduce(total)
    return total.item() / max(count, 1)


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
