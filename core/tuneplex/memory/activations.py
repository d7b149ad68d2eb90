"""What autograd keeps between forward and backward, per rank: the decoder layers' saved
tensors, and the transient peak of the fused loss head.

Counted from the tensors a Llama-style decoder layer saves for backward (transformers' eager
layer with SDPA attention, peft's LoRA layers, under bf16 autocast or in fp32), with the hidden
states in the dtype of the embeddings (`MemoryJob.hidden_bytes`) and the matmuls in the compute
dtype (`compute_bytes`):

- attention: q and the attention output, k and v after rotary, SDPA's log-sum-exp per head
  (fp32) -- 2c(q + kv) + 4 heads;
- each RMSNorm: its fp32 input and normalised product (fp32 hidden states), or the fp32 upcast
  and its cast back (16-bit hidden states); its rsqrt per token -- 2 × (4h + 4h or h·hb) + 8;
- the projections' inputs: four hidden-sized in the compute dtype, one more where autocast
  casts fp32 hidden states (the attention and MLP inputs cast per op);
- in fp32 throughout (no autocast) nothing is cast: two hidden-sized tensors per norm in all
  (measured: 16h bytes per token fewer than the mixed-precision count);
- the MLP: gate, up, the activation and their product (down's input) -- 4c·i per routed
  expert;
- LoRA: each adapted projection's low-rank activation -- c·r each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuneplex.memory.shape import PROJECTIONS

if TYPE_CHECKING:
    from tuneplex.memory.estimate import MemoryJob


def layer_bytes_per_token(job: MemoryJob) -> float:
    """Bytes one decoder layer saves for backward per token (no checkpointing)."""
    s, c, hb = job.shape, job.compute_bytes, job.hidden_bytes
    h, i = s.hidden, (s.moe_intermediate or s.intermediate)
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    attention = 2 * c * (q + kv) + 4 * s.heads
    if c == 4:  # fp32 throughout: no casts; each norm's product is the projections' input
        norms, inputs = 2 * 4 * h + 8, 2 * 4 * h
    else:
        norms = 2 * (4 * h + (4 * h if hb == 4 else hb * h)) + 8
        inputs = c * h * (5 if hb != c else 4)
    mlp = 4 * c * i * max(s.experts_per_token, 1)
    lora = 0
    if job.trainable == "lora":
        targets = job.lora_targets if job.lora_targets is not None else PROJECTIONS
        lora = c * job.lora_rank * sum(1 for t in targets if t in PROJECTIONS)
    return attention + norms + inputs + mlp + lora


def activation_bytes(job: MemoryJob, *, tokens: int) -> int:
    """The decoder layers' saved tensors at the end of forward, over this rank's layers and
    share of the tokens: a checkpointed layer keeps its input only (unsloth's offloading not
    even that: it goes to CPU memory)."""
    s = job.shape
    layers = s.layers / job.pp
    per_token = layer_bytes_per_token(job) / job.tp
    boundary = job.hidden_bytes * s.hidden
    final_norm = 2 * 4 * s.hidden  # the final RMSNorm, as a layer's
    if job.checkpointing == "offload":
        total = 0.0
    elif job.checkpointing == "full":
        total = layers * boundary
    elif job.checkpointing == "selective":  # every second layer, the first included
        checkpointed = (layers + 1) // 2
        total = checkpointed * boundary + (layers - checkpointed) * per_token
    else:
        total = layers * per_token
    return int((total + final_norm) * tokens / job.cp)


def recompute_bytes(job: MemoryJob, *, tokens: int) -> int:
    """In backward, a checkpointed layer's activations made again (one layer at a time) and
    the gradients its MLP's backward makes (gate's and up's, intermediate-sized), beside the
    checkpointed inputs still held."""
    if job.checkpointing == "none":
        return 0
    s = job.shape
    i = (s.moe_intermediate or s.intermediate) * max(s.experts_per_token, 1)
    layer = layer_bytes_per_token(job) + 2 * job.compute_bytes * i
    return int(layer / job.tp * tokens / job.cp) + activation_bytes(job, tokens=tokens)


def uncheckpointed_layers(job: MemoryJob) -> float:
    """This rank's decoder layers that keep their activations (and weight casts) in forward."""
    layers = job.shape.layers / job.pp
    if job.checkpointing in ("full", "offload"):
        return 0.0
    if job.checkpointing == "selective":
        return layers - (layers + 1) // 2
    return layers


def chunk_tokens(job: MemoryJob, *, tokens: int) -> int:
    """Tokens per chunk of the fused head (at most `head_chunk_elements` logits)."""
    return int(min(tokens / job.cp, max(1, job.head_chunk_elements // job.shape.vocab)))


def logits_bytes(job: MemoryJob, *, tokens: int) -> int:
    """The loss head's transient peak. Fused (automodel's `linear_ce`): the counted hidden
    states gathered and their gradient (made in forward, held for backward); one chunk's
    logits in the compute dtype, then in fp32, its softmax cast back (each chunk's freed
    before the next is made); a trained head adds
    its compute copy (fp32 weights) and its weight gradient's slice of bf16 products and
    their fp32 cast. Unfused (TRL): the micro-batch's logits in the
    compute dtype and in fp32."""
    s, c = job.shape, job.compute_bytes
    vocab = s.vocab / job.tp
    if job.loss == "logits":
        return int(tokens * vocab * (4 + c) / job.cp)
    if job.loss == "budget":  # unsloth's fused loss: chunks sized to 16 bytes a logit, ≤ 4 GiB
        return int(min(16 * tokens * vocab, UNSLOTH_HEAD_BUDGET))
    chunk = chunk_tokens(job, tokens=tokens)
    per = (4 + (c if c != 4 else 0)) * chunk * vocab  # one chunk's logits and softmax
    states = 2 * job.hidden_bytes * s.hidden * tokens / job.cp
    if job.trainable != "full":
        return int(per + states)
    head = vocab * s.hidden
    copy = c * head if job.weight_bytes != c else 0
    # the weight gradient: in place in fp32, or bf16 products added over vocabulary slices
    grad = per + ((c + 4) * min(head, WEIGHT_GRAD_SLICE) if c != 4 else 0)
    return int(states + copy + grad)


UNSLOTH_HEAD_BUDGET = 4 << 30
"""unsloth_zoo's fused cross-entropy budget (`_CE_TARGET_GB_CAP`), the most its chunks take."""

WEIGHT_GRAD_SLICE = 1 << 22
"""Elements of the head's weight gradient `linear_ce` makes per matmul in a 16-bit compute
dtype."""
