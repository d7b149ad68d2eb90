"""The unsloth job as the memory estimator's inputs, and the changes that make it smaller.

Mirrors what unsloth and TRL hold on one GPU: the base in 4-bit (NF4) / 8-bit through
bitsandbytes or 16-bit, fp32 LoRA adapters; full weights train the 16-bit weights themselves
(gradients and torch AdamW's moments in their dtype); 8-bit optimizers keep two 1-byte moments;
unsloth's own gradient checkpointing offloads each layer's input to CPU memory; its fused
loss sizes its chunks to a budget (unsloth_zoo). No torch here.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tuneplex.memory import MemoryChange, MemoryJob, read_model_shape

from tuneplex_unsloth.schema import UnslothJobInput

_BITS8_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")


def memory_job(job: UnslothJobInput, *, base_dir: Path) -> MemoryJob:
    """The estimator's view of `job` (one CUDA GPU: unsloth trains on nothing else)."""
    m, t, b = job.model, job.training, job.batch
    shape = read_model_shape(m.name, base_dir=base_dir)
    full = t.finetuning_type == "all_weights"
    dtype_bytes = 4 if m.dtype == "float32" else 2
    bits = None if full else 4 if m.load_in_4bit else 8 if m.load_in_8bit else None
    optim = job.optimizer.optim
    if optim in _BITS8_OPTIMIZERS:
        state = 2.0
    elif optim == "sgd":
        state = 0.0
    else:  # torch's AdamW keeps its moments in each parameter's dtype
        state = 2.0 * (dtype_bytes if full else 4)
    checkpointing = t.use_gradient_checkpointing
    out = MemoryJob(
        shape=shape,
        trainable="full" if full else "lora",
        weight_bytes=dtype_bytes,
        quant_bits=bits,
        compute_bytes=dtype_bytes,
        hidden_bytes=dtype_bytes,
        grad_bytes=dtype_bytes if full else 4,
        lora_rank=t.lora.rank if t.lora else 16,
        lora_targets=tuple(t.lora.target_modules) if t.lora else None,
        use_dora=bool(t.lora and t.lora.use_dora),
        optimizer="adamw_8bit"
        if optim in _BITS8_OPTIMIZERS
        else "sgd"
        if optim == "sgd"
        else "adamw",
        optimizer_state_bytes=state,
        micro_batch=b.per_device_train_batch_size,
        grad_accumulation=b.gradient_accumulation_steps,
        seq_len=m.max_seq_length,
        packing=job.dataset.packing,
        checkpointing="offload"
        if checkpointing == "unsloth"
        else "full"
        if checkpointing
        else "none",
        loss="budget",
        device="cuda",
        gpus=1,
    )
    return _objective_terms(job, out)


def _objective_terms(job: UnslothJobInput, out: MemoryJob) -> MemoryJob:
    """dpo: two sides per row; a full-weight reference loaded beside the policy (LoRA: the base
    with the adapter off); grpo: the rollout KV cache and the same reference rule."""
    t = job.training
    full = out.trainable == "full"
    if t.training_type == "dpo":
        free = t.dpo is not None and t.dpo.loss_type in ("orpo", "simpo")
        reference = "none" if free else "copy" if full else "adapter_off"
        return replace(out, sequences_per_row=2, reference=reference)
    if t.training_type == "grpo" and t.grpo is not None:
        g = t.grpo
        reference = "none"
        if g.ref_policy_kl_penalty > 0:
            reference = "copy" if full else "adapter_off"
        sequences = g.num_prompts_per_step * g.num_generations_per_prompt
        return replace(
            out,
            reference=reference,
            kv_sequences=sequences,
            kv_length=job.model.max_seq_length,
        )
    return out


def memory_changes(job: UnslothJobInput) -> list[MemoryChange]:
    """Changes that lower the peak, least disruptive first; only those that apply."""
    m, t, b, o = job.model, job.training, job.batch, job.optimizer
    out: list[MemoryChange] = []
    if t.use_gradient_checkpointing is not True and t.use_gradient_checkpointing != "unsloth":
        out.append(
            MemoryChange(
                (("training.use_gradient_checkpointing", "unsloth"),),
                "unsloth's gradient checkpointing (layer inputs offloaded to CPU memory)",
            )
        )
    if b.per_device_train_batch_size > 1:
        micro = b.per_device_train_batch_size // 2
        accum = b.gradient_accumulation_steps * 2
        out.append(
            MemoryChange(
                (
                    ("batch.per_device_train_batch_size", str(micro)),
                    ("batch.gradient_accumulation_steps", str(accum)),
                ),
                f"micro batch {micro} with {accum} accumulation steps (same effective batch)",
            )
        )
    if o.optim not in _BITS8_OPTIMIZERS and o.optim != "sgd":
        out.append(
            MemoryChange((("optimizer.optim", "adamw_8bit"),), "8-bit AdamW (1-byte moments)")
        )
    if t.finetuning_type == "all_weights":
        out.append(
            MemoryChange(
                (("training.finetuning_type", "lora"), ("model.load_in_4bit", "true")),
                "LoRA on a 4-bit base instead of full weights",
            )
        )
    elif not m.load_in_4bit:
        out.append(
            MemoryChange(
                (("model.load_in_4bit", "true"), ("model.load_in_8bit", "false")),
                "4-bit base (bitsandbytes NF4)",
            )
        )
    return out
