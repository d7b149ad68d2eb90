"""The loss every backend reports: summed cross-entropy over counted targets, and the
validation loss as the mean over every counted token of the validation rows.

Computed the same way for every backend (one forward per micro-batch of `collate`d rows), so
validation losses compare across backends. Imports torch when called.
"""

from __future__ import annotations

import functools
from typing import Any

from tuneplex.data.collate import EMPTY_ROW, RowTable, collate
from tuneplex.data.targets import summed_cross_entropy


def loss_sum(model, batch: dict[str, Any], *, autocast=None):
    """Summed cross-entropy (float32) of `batch["targets"]`; no KV cache. The mask comes from the
    position ids, unless the batch carries a prepared 4-D `attention_mask` (context parallelism)."""
    with autocast_context(batch["input_ids"].device, autocast):
        out = model(**_inputs(batch))
    return summed_cross_entropy(logits=out.logits, targets=batch["targets"])


def autocast_context(device, dtype, *, cache: bool = True):
    """torch.autocast to `dtype` on `device`'s kind, or nothing when `dtype` is None: the one
    way every forward pass takes a runtime's compute dtype. `cache=False`: no weight cast is
    kept for the rest of the context (each is cast where it is used, as a plain forward does
    once per weight anyway)."""
    import contextlib

    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def _inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What a forward pass of `batch` takes (no KV cache)."""
    extra = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
    return {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "use_cache": False,
        **extra,
    }


def chunked_loss_sum(model, batch: dict[str, Any], *, autocast=None):
    """`loss_sum` without the full-vocabulary logits: the model's own forward asked for the
    logits of no position (`logits_to_keep`), the decoder's output taken as it passes, then the
    output head and the loss fused over chunks of the counted positions (`tuneplex.nn.linear_ce`).

    The same loss and gradients as `loss_sum` (fp32: within rounding), for any model whose
    forward is decoder, head, then `finish_logits`. Going through the model's forward keeps
    its hooks: FSDP2 gathers the embeddings and the head as for the plain loss, once per call
    on every rank. A model whose forward takes no `logits_to_keep` gets `loss_sum`.
    """
    from tuneplex.nn.linear_ce import linear_cross_entropy_sum

    return _through_head(model, batch, autocast, linear_cross_entropy_sum, fallback=loss_sum)


def sequence_log_probs(model, batch: dict[str, Any], *, autocast=None):
    """Float32 log-probability of each row's counted targets, summed per row (shape [rows]),
    without full-vocabulary logits (`tuneplex.nn.linear_ce.row_log_probs`)."""
    from tuneplex.nn.linear_ce import row_log_probs

    return _through_head(model, batch, autocast, row_log_probs, fallback=_row_log_probs_of_logits)


def token_log_probs(
    model,
    batch: dict[str, Any],
    *,
    autocast=None,
    temperature: float = 1.0,
    chunk: int | None = None,
):
    """Float32 log-probability of each counted target ([rows, positions], 0 elsewhere), without
    full-vocabulary logits (`tuneplex.nn.linear_ce.token_log_probs`); the logits divided by
    `temperature`, `chunk` positions through the head at a time."""
    from tuneplex.nn.linear_ce import token_log_probs as of_hidden

    return _through_head(
        model,
        batch,
        autocast,
        functools.partial(of_hidden, temperature=temperature, chunk=chunk),
        fallback=functools.partial(_token_log_probs_of_logits, temperature=temperature),
    )


def _token_log_probs_of_logits(model, batch: dict[str, Any], *, autocast=None, temperature=1.0):
    """`token_log_probs` from the model's full logits (a forward without `logits_to_keep`)."""
    import torch

    from tuneplex.data.targets import IGNORE_INDEX

    with autocast_context(batch["input_ids"].device, autocast):
        logits = model(**_inputs(batch)).logits.float() / temperature
    targets = batch["targets"]
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != IGNORE_INDEX, picked - logits.logsumexp(-1), 0.0)


def _through_head(model, batch: dict[str, Any], autocast, head_fn, *, fallback):
    """`head_fn(hidden, targets, head=, config=)` on the decoder's output of `batch`, or
    `fallback(model, batch, autocast=)` for a model whose forward takes no `logits_to_keep`."""
    from tuneplex.nn.models import unwrap_peft

    base = unwrap_peft(model)
    if not _keeps_logits(type(base)):
        return fallback(model, batch, autocast=autocast)
    device = batch["input_ids"].device
    # Uncached: the forward's head call on no position casts the (tied, trained) head weight
    # too, and autocast's cache would keep that copy through head_fn, beside head_fn's own.
    with autocast_context(device, autocast, cache=False):
        hidden = decoder_output(model, batch)
    with autocast_context(device, autocast):
        return head_fn(
            hidden, batch["targets"], head=base.get_output_embeddings(), config=base.config
        )


def _row_log_probs_of_logits(model, batch: dict[str, Any], *, autocast=None):
    """`sequence_log_probs` from the model's full logits (a forward without `logits_to_keep`)."""
    import torch

    from tuneplex.data.targets import IGNORE_INDEX

    with autocast_context(batch["input_ids"].device, autocast):
        logits = model(**_inputs(batch)).logits.float()
    targets = batch["targets"]
    counted = targets != IGNORE_INDEX
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logps = picked - logits.logsumexp(-1)
    return torch.where(counted, logps, 0.0).sum(-1)


def decoder_output(model, batch: dict[str, Any]):
    """The decoder's last hidden states of `batch`, through the model's own forward asked for
    the logits of no position (`logits_to_keep`), so the model's hooks (FSDP2's gathering of
    the embeddings and head) run as for the plain loss."""
    import torch

    from tuneplex.nn.models import unwrap_peft

    seen = []
    hook = (
        unwrap_peft(model)
        .get_decoder()
        .register_forward_hook(lambda _m, _a, out: seen.append(out[0]))
    )
    none = torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)
    try:
        model(**_inputs(batch), logits_to_keep=none)
    finally:
        hook.remove()
    return seen[-1]


@functools.cache
def _keeps_logits(cls) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(cls.forward).parameters


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
    import torch

    count = int(rows.target_counts.sum())
    total = torch.zeros((), dtype=torch.float32, device=device)
    for chunk in inference_passes(model, len(rows), micro=micro, shard=shard):
        data = rows.take(chunk) if chunk else [EMPTY_ROW]
        batch = {k: v.to(device) for k, v in collate(data, pad_id=pad_id).items()}
        total += loss(model, batch, autocast=autocast)
    if reduce is not None:
        total = reduce(total)
    return total.item() / max(count, 1)


def inference_passes(model, n: int, *, micro: int, shard: tuple[int, int]):
    """Items rank, rank+size, ... of `n`, `micro` at a time, in as many passes as every other
    rank makes ([] where this rank has none left: it still runs the forward and its
    collectives); meanwhile the model is in eval mode without gradients, then back as it was."""
    import math

    import torch

    rank, size = shard
    mine = list(range(rank, n, size))
    passes = math.ceil(math.ceil(n / size) / micro)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(passes):
                yield mine[i * micro : (i + 1) * micro]
    finally:
        model.train(was_training)


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
