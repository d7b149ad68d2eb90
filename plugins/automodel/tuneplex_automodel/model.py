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


def load_model(
    ref: str,
    *,
    dtype: Any,
    device: Any,
    trust_remote_code: bool,
    key: str = MODEL_KEY,
    hidden_dropout: float | None = None,
    attention_dropout: float | None = None,
):
    """AutoModelForCausalLM from a local directory or a Hub id, weights from safetensors only.

    Returns (model, the dtype the checkpoint declares or None): `final/` is saved in the
    latter, so a bf16 model trained with fp32 master weights comes back as bf16. The dropout
    overrides (`training.hidden_dropout` / `attention_dropout`; None: the model's own) are
    built into the modules; the config keeps the checkpoint's values, so `final/` does too.
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
    except Exception as exc:
        raise UsageError(
            Problem(key, f"{ref}: cannot load the model ({first_line(exc)})")
        ) from None
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    overrides = dropout_overrides(config, hidden=hidden_dropout, attention=attention_dropout)
    kept = {name: getattr(config, name) for name in overrides}
    for name, value in overrides.items():
        setattr(config, name, value)
    try:
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
    for name, value in kept.items():  # the modules took the override when they were built
        setattr(model.config, name, value)
    if hidden_dropout is not None and RESIDUAL_DROPOUT not in overrides:
        drop_residual_contributions(model, p=hidden_dropout)
    model.config.use_cache = False
    base_dtype = declared if isinstance(declared, torch.dtype) else None
    return model.to(device), base_dtype


RESIDUAL_DROPOUT = "resid_pdrop"
"""The config field of the families that drop out their attention and MLP outputs themselves
before the residual add (Phi-3, GPT-2): `training.hidden_dropout` sets it there."""


def dropout_overrides(config, *, hidden: float | None, attention: float | None) -> dict:
    """The config fields the dropout settings change; a family whose config has no
    `attention_dropout` cannot take that setting (one line)."""
    overrides = {}
    if attention is not None:
        if not hasattr(config, "attention_dropout"):
            raise UsageError(
                Problem(
                    "training.attention_dropout",
                    f"{attention}: {type(config).__name__} has no attention_dropout setting; "
                    "set it to null",
                )
            )
        overrides["attention_dropout"] = attention
    if hidden is not None and hasattr(config, RESIDUAL_DROPOUT):
        overrides[RESIDUAL_DROPOUT] = hidden
    return overrides


def drop_residual_contributions(model, *, p: float) -> None:
    """`training.hidden_dropout` for families without a config field for it: dropout on the
    output of each decoder layer's `self_attn` and `mlp` (what they add to the residual
    stream), by forward hooks that act in training mode only."""
    from tuneplex_automodel.parallel.parallelize import decoder_layers

    layers = decoder_layers(model)
    missing = [name for name in ("self_attn", "mlp") if not all(hasattr(m, name) for m in layers)]
    if not layers or missing:
        raise UsageError(
            Problem(
                "training.hidden_dropout",
                f"{p}: {type(model).__name__}'s decoder layers have no "
                f"{' and '.join(missing or ['self_attn', 'mlp'])} to drop out; set it to null",
            )
        )
    hook = _ResidualDropout(p)
    for layer in layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


class _ResidualDropout:
    """A forward hook: dropout on a module's output (its first element when a tuple)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, module, args, output):
        if not module.training or self.p == 0:
            return output
        from torch.nn.functional import dropout

        if isinstance(output, tuple):
            return (dropout(output[0], self.p, training=True), *output[1:])
        return dropout(output, self.p, training=True)


def lora_config(
    *,
    rank: int,
    alpha: float,
    target_modules: list[str] | None,
    dropout: float = 0.0,
    use_dora: bool = False,
):
    """The peft LoraConfig of `training.lora`; target_modules None = every linear layer but the
    output head."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_dora=use_dora,
        bias="none",
        target_modules=target_modules if target_modules is not None else "all-linear",
        task_type="CAUSAL_LM",
    )


def apply_lora(
    model,
    *,
    rank: int,
    alpha: float,
    target_modules: list[str] | None,
    dropout: float = 0.0,
    use_dora: bool = False,
):
    """A peft LoRA adapter (`lora_config`) on `model`."""
    from peft import get_peft_model

    config = lora_config(
        rank=rank, alpha=alpha, target_modules=target_modules, dropout=dropout, use_dora=use_dora
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        first = first_line(exc)
        for key, value, word in (
            ("dropout", dropout, "lora_dropout"),
            ("use_dora", use_dora, "dora"),
        ):
            if value and word in first.lower():  # peft's adapters on fused experts take neither
                raise UsageError(
                    Problem(
                        f"training.lora.{key}",
                        f"{value}: {first}; choose target_modules without the experts",
                    )
                ) from None
        linear = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, mod in model.named_modules()
                if type(mod).__name__ == "Linear" and "lm_head" not in name
            }
        )
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
