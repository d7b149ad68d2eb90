"""Context parallelism for decoder-only Hugging Face models: one long row split across ranks.

Each rank of the CP group holds a contiguous slice of every row's sequence (`shard_batch`), runs
the whole model on it, and in every attention layer gathers the keys and values of the full
sequence from the other ranks. Its queries attend to them through a boolean mask built from the
full row's position ids: causal, never across packed samples, and with the layer's sliding window
if it has one. Everything else in a decoder (embeddings, norms, MLPs, RoPE at the shard's own
position ids, the loss) is per token, so the summed loss of the ranks is the one-process loss
and so is every gradient once summed over the group.

The attention runs as a function registered with transformers' `AttentionInterface`, around
transformers' own SDPA attention; the mask travels as the model's `attention_mask` argument,
which transformers passes through untouched when it is 4-D. A call without such a mask (plain
evaluation or generation on full rows) runs ordinary SDPA attention on the rows it was given;
pipeline stages, which build their own full-row masks, use the same function for its sliding
windows.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from tuneplex.data.targets import IGNORE_INDEX
from tuneplex.errors import Problem, UsageError, first_line
from tuneplex.nn.models import unwrap_peft

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup

ATTENTION = "tuneplex_cp"
"""The name the attention function is registered under, and the models' `_attn_implementation`."""

_KEY = "parallelism.context_parallel_size"
_NO_CUSTOM = "cannot run its attention through a custom function"

_GROUP: ProcessGroup | None = None
"""The CP group of this process, set by `enable` (one CP group per process)."""


def enable(model: Any, *, group: ProcessGroup | None) -> None:
    """Make every attention layer of `model` (a transformers model or a peft model wrapping one)
    exact under a sequence sharded across the ranks of `group` (None: the default group).

    Raises UsageError for a model whose attention cannot be switched to the CP function: it
    would otherwise attend within its own shard only and train on a silently wrong loss.
    """
    global _GROUP
    import torch.distributed as dist
    from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    base = unwrap_peft(model)
    name = type(base).__name__
    if not isinstance(base, PreTrainedModel) or not getattr(base, "_supports_sdpa", False):
        raise UsageError(Problem(_KEY, f"{name} has no SDPA attention to run sharded"))
    AttentionInterface.register(ATTENTION, _attention)
    # Unsharded calls build the mask SDPA would get (packed rows, sliding windows).
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    try:
        base.set_attn_implementation(ATTENTION)
    except (ValueError, ImportError) as exc:
        raise UsageError(Problem(_KEY, f"{name} {_NO_CUSTOM} ({first_line(exc)})")) from None
    # A class that does not dispatch through AttentionInterface keeps its old implementation
    # (transformers only logs a warning): refuse it rather than train on per-shard attention.
    stale = sorted(
        {
            type(m).__name__
            for m in base.modules()
            if getattr(getattr(m, "config", None), "_attn_implementation", ATTENTION) != ATTENTION
        }
        - {name}
    )
    if base.config._attn_implementation != ATTENTION or stale:
        where = f" ({', '.join(stale)})" if stale else ""
        raise UsageError(Problem(_KEY, f"{name} {_NO_CUSTOM}{where}"))
    if not dist.is_initialized():
        raise RuntimeError("parallel.cp.enable needs an initialised torch.distributed")
    _GROUP = group if group is not None else dist.group.WORLD


def shard_batch(batch: dict[str, Any], *, rank: int, size: int, pad_id: int) -> dict[str, Any]:
    """This rank's contiguous slice of a `collate`d batch, with the mask its attention needs.

    The sequence is first padded to a multiple of `size`: pad tokens, targets -100, position ids
    continuing the row's last sample (so the padding joins it, after every real token, and
    changes nothing). This is the one layout that does not pad with `collate.pad_rows` (padding
    as a sample of its own): it extends a batch whose targets are already fixed, and joining
    the last block keeps each row's samples, and so the mask's blocks, those of the collated
    batch (`tests/test_context_parallel.py` holds it to that). Every (batch, seq) tensor is
    sliced (`input_ids`, `position_ids`, `targets`, `labels`; any other one is padded with
    -100). `attention_mask` is a boolean (batch, 1, seq/size, seq) tensor: query i may see key
    j iff j <= i and both lie in the same sample, where a sample starts wherever position ids
    do not go up by one (transformers' own rule for packed rows). The diagonal is always
    allowed, so no row of it is empty.
    """
    import torch

    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in a context-parallel group of {size}")
    input_ids = batch["input_ids"]
    n, seq = input_ids.shape
    device = input_ids.device
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(seq, device=device).expand(n, seq)
    padded = -(-seq // size) * size
    extra = padded - seq
    local = padded // size
    lo, hi = rank * local, (rank + 1) * local

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, extra), value=value) if extra else t

    steps = torch.arange(1, extra + 1, device=device, dtype=positions.dtype)
    full_positions = torch.cat([positions, positions[:, -1:] + steps], dim=1)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key == "attention_mask":
            continue
        if not (isinstance(value, torch.Tensor) and tuple(value.shape) == (n, seq)):
            out[key] = value
        elif key == "position_ids":
            out[key] = full_positions[:, lo:hi]
        else:
            out[key] = pad(value, pad_id if key == "input_ids" else IGNORE_INDEX)[:, lo:hi]
    out.setdefault("position_ids", full_positions[:, lo:hi])

    out["attention_mask"] = block_causal_mask(full_positions, start=lo, stop=hi)
    return out


def block_causal_mask(positions, *, start: int = 0, stop: int | None = None):
    """(batch, 1, stop - start, seq) boolean mask of the queries start..stop over every key of
    rows with these position ids: j <= i, within one sample, where a sample starts wherever
    the position ids do not go up by one (transformers' rule for packed rows)."""
    import torch

    stop = positions.shape[1] if stop is None else stop
    first = positions[:, :1] - 1
    sample = (torch.diff(positions, prepend=first, dim=1) != 1).cumsum(dim=1)
    query = torch.arange(start, stop, device=positions.device)
    key = torch.arange(positions.shape[1], device=positions.device)
    causal = key[None, :] <= query[:, None]
    same = sample[:, start:stop, None] == sample[:, None, :]
    return (causal[None] & same)[:, None]


def loss_sum(
    model: Any,
    batch: dict[str, Any],
    *,
    rank: int,
    size: int,
    pad_id: int,
    autocast: torch.dtype | None = None,
) -> torch.Tensor:
    """This rank's part of the summed float32 cross-entropy of `batch`: the ranks' parts add up
    to `tuneplex.nn.evaluation.loss_sum` of the whole batch on one process."""
    from tuneplex.nn.evaluation import loss_sum as full_loss_sum

    shard = shard_batch(batch, rank=rank, size=size, pad_id=pad_id)
    return full_loss_sum(model, shard, autocast=autocast)


def _attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA over the keys and values of the whole sequence when the mask spans all shards."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    local = key.shape[-2]
    offset = None  # the global index of this shard's first query, when the mask is full-row
    if attention_mask is not None and attention_mask.shape[-1] != local:
        size = _group_size()
        if attention_mask.shape[-1] != size * local or query.shape[-2] != local:
            raise ValueError(
                f"context parallel: a mask over {attention_mask.shape[-1]} keys does not fit "
                f"{size} shards of {local} tokens; build it with shard_batch"
            )
        key = _gather_function().apply(key, _GROUP)
        value = _gather_function().apply(value, _GROUP)
        offset = _group_rank() * local
    elif attention_mask is not None and query.shape[-2] == local:
        offset = 0  # whole rows on this rank (a CP group of one, or no sharding)
    window = kwargs.get("sliding_window")
    if window is not None and offset is not None:
        # A 4-D mask skips transformers' own sliding-window masking: add the band here. Within
        # a sample, index distances are position distances, as transformers measures them.
        q = torch.arange(offset, offset + query.shape[-2], device=query.device)
        band = torch.arange(key.shape[-2], device=query.device)[None, :] > q[:, None] - window
        if attention_mask.dtype == torch.bool:
            attention_mask = attention_mask & band
        else:
            attention_mask = attention_mask.masked_fill(
                ~band, torch.finfo(attention_mask.dtype).min
            )
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _group_size() -> int:
    import torch.distributed as dist

    if _GROUP is None:
        raise RuntimeError("context parallel: enable() was not called in this process")
    return dist.get_world_size(_GROUP)


def _group_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank(_GROUP)


def _fast_backward(group) -> bool:
    """Whether the backward may reduce-scatter (NCCL); gloo may lack it, so it all-reduces."""
    import torch.distributed as dist

    return dist.get_backend(group) in ("nccl", "xccl")


def _gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """(B, H, S, D) -> (B, H, S * ranks, D), rank r's slice at [r*S, (r+1)*S)."""
    import torch.distributed as dist

    size = dist.get_world_size(group)
    parts = x.movedim(2, 0).contiguous()
    out = parts.new_empty((size * parts.shape[0], *parts.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, parts, group=group)
    return out.movedim(0, 2)


def _reduce_sequence(grad: torch.Tensor, group, *, scatter: bool) -> torch.Tensor:
    """The gradient of `_gather_sequence`: every rank's gradient summed, this rank's slice."""
    import torch
    import torch.distributed as dist

    size, rank = dist.get_world_size(group), dist.get_rank(group)
    full = grad.movedim(2, 0)
    if scatter:
        full = full.contiguous()
        mine = full.new_empty((full.shape[0] // size, *full.shape[1:]))
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        reduce_scatter(mine, full, group=group)
    else:
        full = full.clone(memory_format=torch.contiguous_format)  # never reduce `grad` in place
        dist.all_reduce(full, group=group)
        mine = full.chunk(size)[rank]
    return mine.movedim(0, 2)


@functools.cache
def _gather_function():
    import torch

    class GatherSequence(torch.autograd.Function):
        """All-gather along the sequence; backward sums the ranks' gradients (each rank's
        queries used every rank's keys) and keeps this rank's slice."""

        @staticmethod
        def forward(ctx, x, group, scatter=None):
            ctx.group = group
            ctx.scatter = _fast_backward(group) if scatter is None else scatter
            return _gather_sequence(x, group)

        @staticmethod
        def backward(ctx, grad):
            return _reduce_sequence(grad, ctx.group, scatter=ctx.scatter), None, None

    return GatherSequence
