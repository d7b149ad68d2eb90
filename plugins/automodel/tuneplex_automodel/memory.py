"""The automodel job as the memory estimator's inputs, and the changes that make it smaller.

Mirrors what the recipe holds (`trainer.pick_runtime`, `parallel.fsdp`, the objectives): with
bf16 compute, full weights keep fp32 master weights and gradients and are cast to bf16 for
the matmuls (autocast on one process and on CPUs; FSDP2 gathers them in bf16 on CUDA); LoRA
keeps a bf16 frozen base and fp32 adapters. No torch here: `tuneplex plan` and `validate`
call it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tuneplex.memory import MemoryChange, MemoryJob, read_model_shape

from tuneplex_automodel.schema import AutomodelJobInput


def memory_job(
    job: AutomodelJobInput, *, base_dir: Path, device: str = "cuda", bf16: bool = True
) -> MemoryJob:
    """The estimator's view of `job` on `device` (`bf16`: whether the device computes bf16
    natively, which `training.precision: auto` asks)."""
    t, dims = job.training, job.parallel_dims()
    shape = read_model_shape(job.model, base_dir=base_dir)
    mixed = t.precision == "bf16" or (t.precision == "auto" and bf16)
    full = t.finetuning_type == "all_weights"
    cuda = device == "cuda"
    fsdp = dims.dp * dims.cp > 1
    out = MemoryJob(
        shape=shape,
        trainable="full" if full else "lora",
        weight_bytes=2 if mixed and not full else 4,
        compute_bytes=2 if mixed else 4,
        hidden_bytes=2 if mixed and not full else 4,
        # FSDP2 on CUDA gathers bf16 weights: no autocast copies of fp32 ones
        compute_copies=mixed and full and not (fsdp and cuda),
        # (peft keeps LoRA's adapters in fp32 over a bf16 base)
        grad_bytes=4,
        lora_rank=t.lora.rank if t.lora else 16,
        lora_targets=tuple(t.lora.target_modules) if t.lora and t.lora.target_modules else None,
        use_dora=bool(t.lora and t.lora.use_dora),
        optimizer=job.optimizer.name,
        micro_batch=job.batch.micro_batch_size,
        grad_accumulation=dims.grad_accum_steps,
        seq_len=t.max_seq_length,
        packing=job.batch.sequence_packing,
        checkpointing=t.activation_checkpointing,
        loss="logits" if dims.cp > 1 else "chunked",
        dp=dims.dp,
        tp=dims.tp,
        pp=dims.pp,
        cp=dims.cp,
        ep=dims.ep,
        fsdp=fsdp,
        device="cuda" if cuda else "cpu",
        gpus=dims.world_size,
    )
    return _objective_terms(job, out, base_dir=base_dir)


def _objective_terms(job: AutomodelJobInput, out: MemoryJob, *, base_dir: Path) -> MemoryJob:
    """What each objective adds: distillation's teacher, dpo's two sides per row, grpo's
    reference copy and rollout KV cache (dpo's reference is log-probabilities computed
    once before training: no second model)."""
    t = job.training
    if t.training_type == "distillation" and t.teacher_model:
        teacher = read_model_shape(t.teacher_model, base_dir=base_dir)
        return replace(
            out, teacher=teacher, teacher_bytes=4 if t.teacher_precision == "fp32" else 2
        )
    if t.training_type == "dpo":
        free = t.dpo is not None and t.dpo.loss_type in ("orpo", "simpo")
        return replace(out, sequences_per_row=2, reference="none" if free else "precomputed")
    if t.training_type == "grpo" and t.grpo is not None:
        g = t.grpo
        reference = "none"
        if g.ref_policy_kl_penalty > 0:
            reference = "copy" if out.trainable == "full" else "adapter_off"
        per_rank = max(g.num_prompts_per_step * g.num_generations_per_prompt // out.dp, 1)
        return replace(
            out,
            reference=reference,
            kv_sequences=min(g.generation_batch_size, per_rank),
            kv_length=t.max_seq_length,
        )
    return out


def memory_changes(job: AutomodelJobInput) -> list[MemoryChange]:
    """Changes that lower the peak, least disruptive first; only those that apply."""
    t, b, p = job.training, job.batch, job.parallelism
    out: list[MemoryChange] = []
    if t.activation_checkpointing != "full":
        out.append(
            MemoryChange(
                (("training.activation_checkpointing", "full"),),
                "activation checkpointing (recomputes each layer in backward)",
            )
        )
    for micro in sorted({b.micro_batch_size // 2, 1} - {0, b.micro_batch_size}, reverse=True):
        out.append(
            MemoryChange(
                (("batch.micro_batch_size", str(micro)),),
                f"micro batch {micro} (more gradient accumulation, same global batch)",
            )
        )
    if t.finetuning_type == "all_weights" and t.training_type != "distillation":
        out.append(
            MemoryChange(
                (("training.finetuning_type", "lora"),),
                "LoRA instead of full weights (frozen bf16 base, small adapters)",
            )
        )
    if t.training_type not in ("sft", "dpo"):
        return out
    for gpus in (n for n in (2, 4, 8) if n > p.num_gpus_per_node):
        out.append(
            MemoryChange(
                (("parallelism.num_gpus_per_node", str(gpus)),),
                f"{gpus} GPUs per node (FSDP2 shards weights, gradients and optimizer states)",
            )
        )
    gpus = p.num_gpus_per_node * 2
    if gpus <= 8 and p.tensor_parallel_size == 1:
        out.append(
            MemoryChange(
                (
                    ("parallelism.num_gpus_per_node", str(gpus)),
                    ("parallelism.tensor_parallel_size", "2"),
                ),
                f"{gpus} GPUs per node with tensor parallelism 2 (each layer split in two)",
            )
        )
    return out
