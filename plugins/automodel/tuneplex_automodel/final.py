"""`final/` in the Hugging Face formats users load, and a checkpoint seen as such a directory.

With several processes the full weights meet on rank 0 (pipeline stages merged there) and are
loaded into a CPU copy of the model, which transformers / peft save as they always do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneplex.runs import AtomicDir


def _options(*, every_rank: bool = False, **kw):
    """Full tensors, on CPU on rank 0 only; or, `every_rank`, on every rank (pipeline stages
    other than rank 0's need their own full state to send it on)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=not every_rank, **kw)


def _cpu(tree):
    import torch

    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_cpu(v) for v in tree]
    return tree


def full_model_state(model, *, merge=None, **kw) -> dict[str, Any] | None:
    """The whole model's full state dict on rank 0 (CPU tensors); None on ranks that hold no
    whole copy. `merge(state) -> [state of each stage] | None` joins pipeline stages."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if merge is None:
        return get_model_state_dict(model, options=_options(**kw))
    parts = merge(_cpu(get_model_state_dict(model, options=_options(every_rank=True, **kw))))
    return None if parts is None else {k: v for part in parts for k, v in part.items()}


def export_final(
    target: Path, *, model, tokenizer, merge: bool, lora: bool, dtype: Any | None
) -> str:
    """Write `final/` in the ecosystem's formats; returns a phrase saying what it holds.

    LoRA: adapter_config.json + adapter_model.safetensors (peft). Merged LoRA: the merged
    model (config.json + safetensors) and, under adapter/, the adapter it was made from.
    Full weights: the model. Weights are cast to `dtype` (the base checkpoint's) when given.
    """
    with AtomicDir(target) as tmp:
        if lora and not merge:
            model.save_pretrained(str(tmp))
            what = "LoRA adapter: peft.PeftModel.from_pretrained(base, path)"
        else:
            if lora:
                model.save_pretrained(str(tmp / "adapter"))
                model = model.merge_and_unload()
                what = "merged model (adapter in adapter/): AutoModelForCausalLM.from_pretrained"
            else:
                what = "full model: AutoModelForCausalLM.from_pretrained(path)"
            if dtype is not None:
                model = model.to(dtype)
            model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return what


def export_run(target: Path, *, job, model, tokenizer, dist, load_dtype, dtype) -> str | None:
    """final/ from rank 0. With several processes the full weights are gathered to rank 0
    first and loaded into a CPU copy of the model (weights in `load_dtype`), which is what gets
    saved; `dtype` is the one final/ is written in (None: as trained)."""
    from tuneplex_automodel.model import apply_lora, load_model

    lora = job.training.lora
    if dist.world_size > 1:
        full = full_model_state(model, merge=stage_merger(dist))
        if not dist.is_main:
            return None
        model, _ = load_model(
            job.model,
            dtype=load_dtype,
            device="cpu",
            trust_remote_code=job.training.trust_remote_code,
        )
        if lora is not None:
            model = apply_lora(
                model, rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules
            )
        model.load_state_dict(full, strict=True)
    return export_final(
        target,
        model=model,
        tokenizer=tokenizer,
        merge=job.training.merges_adapter,
        lora=lora is not None,
        dtype=dtype,
    )


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
        from tuneplex_automodel.model import lora_config

        config = lora_config(rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules)
        config.base_model_name_or_path = job.model
        config.save_pretrained(str(scratch))
        tensors = {_peft_name(n): t for n, t in tensors.items()}
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


def _peft_name(name: str) -> str:
    """A LoRA parameter's name in the model (`...lora_A.default.weight`) as peft saves it in an
    adapter file (`...lora_A.weight`)."""
    for part in (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B."):
        head, sep, tail = name.partition(part)
        if sep and "." in tail:
            return head + part + tail.split(".", 1)[1]
    return name


def stage_merger(dist):
    """How state dicts of pipeline stages meet on rank 0 (None: no pipeline)."""
    if dist.dims.pp == 1:
        return None
    from tuneplex_automodel.parallel.pp import merge_stages

    return lambda state: merge_stages(state, dist=dist)
