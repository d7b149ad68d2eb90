"""The peak memory of one training rank, from the job and the model's shape alone.

Each term models what the backend's code holds at its peak (see `MemoryJob` for the inputs a
backend fills in): the weights in the dtype they are stored in, LoRA's adapters, gradients and
optimizer states of what trains, the activations autograd keeps for backward, the loss's
logits chunk, a teacher, a reference copy, a generation KV cache and the runtime's fixed
overhead. Parallel sizes divide what each rank holds. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tuneplex.memory.activations import (
    activation_bytes,
    logits_bytes,
    recompute_bytes,
    uncheckpointed_layers,
)
from tuneplex.memory.shape import PROJECTIONS, ModelShape

GIB = 1 << 30
CUDA_OVERHEAD = 1 << 30
"""CUDA context, kernels and the caching allocator's slack: ~1 GiB whatever the model."""

Optimizer = Literal["adamw", "adam", "adamw_8bit", "paged_adamw_8bit", "sgd"]
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "sgd": 0}
"""Bytes of optimizer state per trained parameter: two fp32 moments, two 8-bit ones, none."""


@dataclass(frozen=True, kw_only=True)
class MemoryJob:
    """Every input of the estimate; a backend's `memory_job` fills it from a validated job."""

    shape: ModelShape
    trainable: Literal["full", "lora"] = "lora"
    weight_bytes: float = 2
    """Bytes per stored base weight: 4 fp32, 2 bf16/fp16; 4/8-bit loading: see quant_bits."""
    quant_bits: int | None = None
    """4 or 8: the decoder's projections loaded through bitsandbytes (embeddings stay 16-bit)."""
    compute_bytes: int = 2
    hidden_bytes: int = 2
    """Bytes per element of the hidden states between layers: the embeddings' dtype (fp32 with
    fp32 master weights under autocast)."""
    """Bytes per activation element: 2 under bf16/fp16 compute, 4 in fp32."""
    compute_copies: bool = False
    """Full weights stored in fp32 and computed in bf16 under autocast: a bf16 copy of each
    projection weight is cast in forward and kept for backward."""
    grad_bytes: int = 4
    lora_rank: int = 16
    lora_targets: tuple[str, ...] | None = None
    """Projection names LoRA adapts; None: every linear layer but the head."""
    lora_bytes: int = 4
    use_dora: bool = False
    optimizer: Optimizer = "adamw"
    optimizer_state_bytes: float | None = None
    """Bytes of state per trained parameter when not the optimizer's usual (moments kept in a
    16-bit parameter's own dtype)."""
    micro_batch: int = 1
    grad_accumulation: int = 1
    sequences_per_row: int = 1
    """Sequences one micro-batch row becomes (dpo: chosen and rejected)."""
    seq_len: int = 2048
    packing: bool = False
    checkpointing: Literal["none", "full", "selective", "offload"] = "none"
    """offload: each layer's input kept in CPU memory (unsloth's own)."""
    loss: Literal["chunked", "logits", "budget"] = "chunked"
    """chunked: the head and cross-entropy fused over chunks of tokens (automodel); logits: the
    micro-batch's full-vocabulary logits (context parallelism's loss); budget: unsloth's fused
    loss, its chunks sized to a memory budget."""
    head_chunk_elements: int = 1 << 24
    teacher: ModelShape | None = None
    teacher_bytes: int = 2
    reference: Literal["none", "adapter_off", "copy", "precomputed"] = "none"
    kv_sequences: int = 0
    """Sequences a rollout generates together (GRPO); 0: no generation."""
    kv_length: int = 0
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    fsdp: bool = False
    """Parameters, gradients and optimizer states sharded over the data(-and-context) ranks."""
    device: Literal["cuda", "cpu"] = "cuda"
    gpus: int = 1


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    breakdown: dict[str, int]
    """Bytes per rank by what holds them, in the order they are printed."""
    notes: tuple[str, ...] = ()
    gpus: int = 1

    @property
    def per_gpu(self) -> int:
        return sum(self.breakdown.values())


@dataclass(frozen=True)
class MemoryChange:
    """One candidate change a user can paste: `--set KEY=VALUE` per override."""

    overrides: tuple[tuple[str, str], ...]
    summary: str


def estimate(job: MemoryJob) -> MemoryEstimate:
    """Bytes per rank at the training step's peak, term by term: what lives throughout (weights,
    adapters, optimizer states) plus the larger of two moments -- the loss head at the end of
    the forward pass (every activation saved, the head's chunk in flight; with gradient
    accumulation the gradients of the earlier micro-batches too) and the end of backward (every
    gradient made; with checkpointing, a layer's activations made again)."""
    s, shard = job.shape, _model_shard(job)
    base, projections = s.parameters(), s.layers * _projection_parameters(s)
    lora = lora_parameters(job) if job.trainable == "lora" else 0
    trained = base if job.trainable == "full" else lora
    state_shard = _state_shard(job, shard)
    out: dict[str, int] = {}
    out["weights"] = int(_weight_bytes(job, base=base, projections=projections) / state_shard)
    if lora:
        out["lora weights"] = int(lora * job.lora_bytes / state_shard)
    state = job.optimizer_state_bytes
    state = OPTIMIZER_STATE_BYTES[job.optimizer] if state is None else state
    out["optimizer states"] = int(trained * state / state_shard)
    tokens = job.micro_batch * job.sequences_per_row * job.seq_len
    gradients = int(trained * job.grad_bytes / state_shard)
    head = s.vocab * s.hidden
    forward = {
        "gathered weights": _gathered(job, head=head),
        "compute copies": _compute_copies(job, projections=projections, head=head, lora=lora),
        "activations": activation_bytes(job, tokens=tokens),
        "logits chunk": logits_bytes(job, tokens=tokens),
        "gradients": _gradients_in_forward(job, trained=trained, head=head, shard=shard),
    }
    tied_temp = 4 * head // job.tp if job.trainable == "full" and s.tied_embeddings else 0
    backward = {
        "gathered weights": forward["gathered weights"],
        "activations": recompute_bytes(job, tokens=tokens),
        "gradients": gradients + tied_temp,  # a tied embedding's dense gradient, then added
    }
    at_head = sum(forward.values()) >= sum(backward.values())
    out |= {k: v for k, v in (forward if at_head else backward).items() if v}
    if job.teacher is not None:
        out["teacher"] = int(job.teacher.parameters() * job.teacher_bytes / shard)
    if job.reference == "copy":
        out["reference"] = int(_weight_bytes(job, base=base, projections=projections) / shard)
    if job.kv_sequences:
        out["kv cache"] = kv_cache_bytes(job)
    if job.device == "cuda":
        out["runtime overhead"] = CUDA_OVERHEAD
    moment = "at the loss head, end of forward" if at_head else "at the end of backward"
    return MemoryEstimate(breakdown=out, notes=(f"peak {moment}", *_notes(job)), gpus=job.gpus)


def _gradients_in_forward(job: MemoryJob, *, trained: int, head: int, shard: int) -> int:
    """Gradients alive at the loss head: the earlier micro-batches' with accumulation
    (this rank's shard under FSDP2, which reduce-scatters each micro-batch's), and the fused
    head's weight gradient, made in forward (fp32) beside them."""
    held = 0
    if job.grad_accumulation > 1:
        held = trained * job.grad_bytes / _state_shard(job, shard)
    if job.trainable == "full" and job.loss == "chunked":
        held += 4 * head / job.tp
    return int(held)


def _state_shard(job: MemoryJob, shard: int) -> int:
    return shard * (job.dp * job.cp if job.fsdp else 1)


def _projection_parameters(s: ModelShape) -> int:
    return sum(a * b * n for a, b, n in s.linears().values())


def _compute_copies(job: MemoryJob, *, projections: int, head: int, lora: int) -> int:
    """16-bit copies autocast makes of fp32 weights, kept for backward by each projection of a
    layer that is not checkpointed (a checkpointed layer casts them again in backward); LoRA's
    fp32 adapters likewise over a 16-bit base. The output head's copy is the loss head's."""
    c = job.compute_bytes
    kept = uncheckpointed_layers(job) / max(job.shape.layers / job.pp, 1)
    if job.trainable == "full" and job.compute_copies:
        return int(c * projections * kept / (job.tp * job.pp))
    if lora and job.lora_bytes != c:
        return int(c * lora * kept / (job.tp * job.pp))
    return 0


def _gathered(job: MemoryJob, *, head: int) -> int:
    """FSDP2's unsharded weights while they compute: the root (embeddings, head, final norm:
    kept gathered through the step) and two decoder layers (one computing, one prefetched), in
    the dtype they are gathered in (bf16 on CUDA, the stored dtype on a CPU)."""
    if not job.fsdp or job.dp * job.cp == 1:
        return 0
    s = job.shape
    gathered = job.compute_bytes if job.device == "cuda" else job.weight_bytes
    root = s.embedding_parameters()
    return int(gathered * (root + 2 * s.layer_parameters()) / (job.tp * job.pp))


def _model_shard(job: MemoryJob) -> int:
    """How many ways the model's weights are split by tensor and pipeline parallelism (expert
    parallelism splits the experts only: counted as a share of the whole)."""
    shard = job.tp * job.pp
    s = job.shape
    if job.ep > 1 and s.experts:
        experts = s.layers * sum(a * b * n for name, (a, b, n) in s.linears().items() if n > 1)
        whole = s.parameters()
        return max(1, round(shard * whole / (whole - experts + experts / job.ep)))
    return shard


def _weight_bytes(job: MemoryJob, *, base: int, projections: int) -> float:
    if job.quant_bits:
        # bitsandbytes: 4-bit NF4 with an fp32 absmax per 64 weights; 8-bit int8 with a scale row
        per = job.quant_bits / 8 + (4 / 64 if job.quant_bits == 4 else 0)
        return projections * per + (base - projections) * job.weight_bytes
    return base * job.weight_bytes


def lora_parameters(job: MemoryJob) -> int:
    """r × (in + out) per adapted projection (and DoRA's magnitude per output feature)."""
    s = job.shape
    targets = set(job.lora_targets) if job.lora_targets is not None else set(PROJECTIONS)
    total = 0
    for name, (a, b, n) in s.linears().items():
        if name in targets:
            total += n * (job.lora_rank * (a + b) + (b if job.use_dora else 0))
    return s.layers * total


def kv_cache_bytes(job: MemoryJob) -> int:
    """Keys and values of every layer for the sequences a rollout generates together."""
    s = job.shape
    per_token = 2 * s.layers * s.kv_heads * s.head_dim * job.compute_bytes
    return int(job.kv_sequences * job.kv_length * per_token / (job.tp * job.pp))


def _notes(job: MemoryJob) -> tuple[str, ...]:
    notes = [f"activation checkpointing: {job.checkpointing}"]
    notes.append(
        f"micro batch {job.micro_batch} × {job.seq_len} tokens (the longest a row can be)"
        + (", packed" if job.packing else "")
    )
    layout = [f"{k} {v}" for k, v in (("dp", job.dp), ("tp", job.tp), ("pp", job.pp)) if v > 1]
    layout += [f"{k} {v}" for k, v in (("cp", job.cp), ("ep", job.ep)) if v > 1]
    if layout:
        notes.append("per rank of " + ", ".join(layout) + (" (FSDP2)" if job.fsdp else ""))
    return tuple(notes)
