"""Loading the base model (safetensors only) and wrapping it with a LoRA adapter."""

from __future__ import annotations

from typing import Any

from tuneplex.data.sources import hub_offline
from tuneplex.errors import Problem, UsageError, first_line
from tuneplex.nn.models import resolve_model_ref

MODEL_KEY = "model"


def check_model_ref(ref: str, *, key: str = MODEL_KEY) -> None:
    """Fail early, in one line, on a model reference that cannot load (before data work)."""
    resolve_model_ref(ref, key=key)


def load_model(ref: str, *, dtype: Any, device: Any, trust_remote_code: bool, key: str = MODEL_KEY):
    """AutoModelForCausalLM from a local directory or a Hub id, weights from safetensors only.

    Returns (model, the dtype the checkpoint declares or None): `final/` is saved in the
    latter, so a bf16 model trained with fp32 master weights comes back as bf16.
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    where, local = resolve_model_ref(ref, key=key)
    offline = local or hub_offline()
    try:
        config = AutoConfig.from_pretrained(
            where, local_files_only=offline, trust_remote_code=trust_remote_code
        )
        declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(declared, str):
            declared = getattr(torch, declared, None)
        model = AutoModelForCausalLM.from_pretrained(
            where,
            config=config,
            dtype=dtype,
            local_files_only=offline,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except Exception as exc:
        raise UsageError(
            Problem(key, f"{ref}: cannot load the model ({first_line(exc)})")
        ) from None
    model.config.use_cache = False
    base_dtype = declared if isinstance(declared, torch.dtype) else None
    return model.to(device), base_dtype


def lora_config(*, rank: int, alpha: float, target_modules: list[str] | None):
    """The peft LoraConfig of `training.lora`; target_modules None = every linear layer but the
    output head."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=target_modules if target_modules is not None else "all-linear",
        task_type="CAUSAL_LM",
    )


def apply_lora(model, *, rank: int, alpha: float, target_modules: list[str] | None):
    """A peft LoRA adapter (`lora_config`) on `model`."""
    from peft import get_peft_model

    config = lora_config(rank=rank, alpha=alpha, target_modules=target_modules)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        linear = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, mod in model.named_modules()
                if type(mod).__name__ == "Linear" and "lm_head" not in name
            }
        )
        first = first_line(exc)
        raise UsageError(
            Problem(
                "training.lora.target_modules",
                f"{target_modules} does not fit {type(model).__name__} ({first}); its linear "
                f"layers: {', '.join(linear)}",
            )
        ) from None


def checkpoint_activations(model, *, mode: str) -> None:
    """Activation checkpointing of the decoder layers (transformers' own, non-reentrant, so it
    composes with LoRA, FSDP2, tensor parallelism and pipeline stages): `full` every layer,
    `selective` every second one, `none` nothing."""
    if mode == "none":
        return
    from tuneplex.nn.models import unwrap_peft

    base = unwrap_peft(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise UsageError(
            Problem(
                "training.activation_checkpointing",
                f"{mode}: {type(base).__name__} does not support activation checkpointing; "
                "set it to none",
            )
        )
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "selective":
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i % 2 == 0


def compile_layers(model, *, setting: bool | str, device, data_parallel_only: bool) -> bool:
    """`training.compile`: torch.compile each decoder layer's forward (inductor); whether it
    did. auto = on with CUDA only (on a CPU it was measured to gain nothing). The module
    hooks stay outside the compiled code, so FSDP2 and activation checkpointing wrap it as
    they wrap an eager layer; parameters and state-dict keys are the layer's own."""
    if setting is False or not data_parallel_only:  # true with other layouts: refused earlier
        return False
    if setting == "auto" and device.type != "cuda":
        return False
    import torch

    from tuneplex_automodel.parallel.parallelize import decoder_layers

    for layer in decoder_layers(model):
        layer.forward = torch.compile(layer.forward)
    return True


def compile_seconds() -> float:
    """Seconds this process has spent compiling with torch.compile so far (Dynamo's frames,
    AOT autograd and inductor, forward and backward)."""
    import sys

    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return 0.0
    metrics = utils.compilation_time_metrics
    return sum(sum(metrics.get(k, ())) for k in COMPILE_TIMERS)


COMPILE_TIMERS = ("_compile.compile_inner", "backward._backward_impl")
"""Dynamo's timers that together cover a compile without overlap: a frame (its forward graph,
and its backward graph when shapes are dynamic) and a backward graph compiled lazily at the
first backward."""
