"""`final/` in the Hugging Face formats users load, and a checkpoint seen as such a directory.

final/ is streamed: one whole tensor at a time reaches rank 0 (`final_stream`) and goes straight
into its place in a safetensors file, so no rank ever holds the whole model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneplex.runs import AtomicDir


def export_run(
    target: Path, *, job, model, tokenizer, dist, dtype=None, max_bytes=None
) -> str | None:
    """Write `final/` (on every rank; rank 0 writes): a phrase saying what it holds on rank 0,
    None elsewhere. Weights are streamed (`final_stream`), never gathered whole on one rank.

    LoRA: adapter_config.json + adapter_model.safetensors (peft). Merged LoRA: the merged
    model (config.json + safetensors) and, under adapter/, the adapter it was made from.
    Full weights: the model. Weights are cast to `dtype` (the base checkpoint's) when given,
    else streamed in their own dtype."""
    from tuneplex_automodel.final_stream import stream_final

    lora = job.training.lora is not None
    merge = job.training.merges_adapter
    kw = {} if max_bytes is None else {"max_bytes": max_bytes}
    if not dist.is_main:
        stream_final(None, model=model, dist=dist, lora=lora, merge=merge, dtype=dtype, **kw)
        return None
    with AtomicDir(target) as tmp:
        stream_final(tmp, model=model, dist=dist, lora=lora, merge=merge, dtype=dtype, **kw)
        tokenizer.save_pretrained(str(tmp))
    if lora and not merge:
        return "LoRA adapter: peft.PeftModel.from_pretrained(base, path)"
    if lora:
        return "merged model (adapter in adapter/): AutoModelForCausalLM.from_pretrained"
    return "full model: AutoModelForCausalLM.from_pretrained(path)"


def as_pretrained(weights: Path, *, job, scratch: Path) -> Path:
    """`weights` as a directory transformers / peft load: final/ as it is; a checkpoint written
    under `scratch` — a LoRA checkpoint as a peft adapter (its config and weights, names as
    peft saves them), a full-weight one as the base's config beside its weights."""
    from safetensors.torch import save_file

    from tuneplex_automodel.checkpoint import STATE_FILE, model_tensors

    if not (weights / STATE_FILE).is_file():
        return weights
    tensors = model_tensors(weights)
    scratch.mkdir(parents=True, exist_ok=True)
    lora = job.training.lora
    if lora is not None:
        from tuneplex_automodel.final_stream import peft_name
        from tuneplex_automodel.model import lora_config

        config = lora_config(
            rank=lora.rank,
            alpha=lora.alpha,
            target_modules=lora.target_modules,
            dropout=lora.dropout,
            use_dora=lora.use_dora,
        )
        config.base_model_name_or_path = job.model
        config.save_pretrained(str(scratch))
        tensors = {peft_name(n): t for n, t in tensors.items()}
        save_file(tensors, str(scratch / "adapter_model.safetensors"))
        return scratch
    from transformers import AutoConfig
    from tuneplex.nn.models import resolve_model_ref

    where, local = resolve_model_ref(job.model, key="model")
    config = AutoConfig.from_pretrained(
        where, local_files_only=local, trust_remote_code=job.training.trust_remote_code
    )
    config.save_pretrained(str(scratch))
    save_file(_dedupe(tensors), str(scratch / "model.safetensors"))
    return scratch


def _dedupe(tensors: dict[str, Any]) -> dict[str, Any]:
    """safetensors refuses shared storage (tied embeddings): keep the first name of each."""
    seen, out = set(), {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.contiguous()
    return out
