"""What autograd keeps between forward and backward, per rank: the decoder layers' saved
tensors, and the loss head's chunk of logits."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tuneplex.memory.estimate import MemoryJob


def layer_bytes_per_token(job: MemoryJob) -> float:
    """Bytes one decoder layer saves for backward per token (no checkpointing)."""
    s, c = job.shape, job.compute_bytes
    h, i = s.hidden, (s.moe_intermediate or s.intermediate)
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    experts = max(s.experts_per_token, 1)
    attention = 4 * h * 2 + c * (h + q + 2 * kv + q) + 4 * s.heads
    mlp = 4 * h * 2 + c * (h + experts * 4 * i)
    return attention + mlp


def activation_bytes(job: MemoryJob, *, tokens: int) -> int:
    """The decoder layers' saved tensors over this rank's layers and share of the tokens."""
    s = job.shape
    layers = s.layers / job.pp
    per_token = layer_bytes_per_token(job) / job.tp
    boundary = 4 * s.hidden  # a checkpointed layer keeps its input only
    if job.checkpointing == "offload":
        total = per_token
    elif job.checkpointing == "full":
        total = layers * boundary + per_token  # one layer recomputed at a time
    elif job.checkpointing == "selective":
        total = layers / 2 * (boundary + per_token) + per_token
    else:
        total = layers * per_token
    return int(total * tokens / job.cp)


def logits_bytes(job: MemoryJob, *, tokens: int) -> int:
    """The loss head's logits: one fused chunk (fp32 logits and their low-precision copy), or
    the whole micro-batch's fp32 logits where the loss makes them all."""
    s = job.shape
    vocab = s.vocab / job.tp
    if job.loss == "logits":
        return int(tokens * vocab * (4 + job.compute_bytes) / job.cp)
    chunk = min(tokens / job.cp, max(1, job.head_chunk_elements // s.vocab))
    return int(chunk * vocab * (4 + job.compute_bytes))
