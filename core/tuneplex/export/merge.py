"""One merged model from a Target, ready to be written in any format: an adapter merged into
its base, a whole model as it is, with the tokenizer, the chat template and the end-of-turn
tokens its training taught.

An adapter is merged one layer at a time in float32 (the layer's base weight, the adapter's
matrices and their product), and the sum is cast to the output dtype once: one rounding, and
never more than one layer in float32 at a time. Weights stored quantized (bitsandbytes, GPTQ,
...) are refused rather than dequantized: an export writes full-precision weights, and a
dequantized copy would differ from both the model that trained and its full-precision base.
An adapter trained on a base *loaded* in 4 or 8 bits (QLoRA) is merged into that base's
full-precision weights, as unsloth's merged_16bit does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneplex.errors import Problem, UsageError
from tuneplex.inference.target import Target

FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, kw_only=True)
class Source:
    """What an export starts from, read before any weight loads."""

    config: Any
    """The transformers config of the weights (the base's, for an adapter)."""
    dtype: str
    """The dtype they are stored in: their config's, else the run's, else float32."""


@dataclass(kw_only=True)
class Merged:
    """A model with no adapter left, and how it is prompted and stops."""

    model: Any
    """A transformers model in eval mode on the CPU; every parameter in `dtype`."""
    tokenizer: Any
    """The tokenizer training used; its chat template is `chat_template` when that is set."""
    chat_template: str | None
    """The Jinja template training rendered chats with (None: it rendered none)."""
    eos_ids: list[int]
    """Token ids that end generation: first the end-of-turn token(s) the template trains (the
    one that ends a turn first), then the tokenizer's eos, then any other the model's
    generation config named. Without a template, eos first."""
    stop_strings: tuple[str, ...]
    """An end of turn that is several tokens, as text: no single id stops on it."""
    model_type: str
    architecture: str
    source_dtype: str
    dtype: str
    adapter: bool
    """An adapter was merged (False: a whole model re-saved)."""
    target: Target


def source_of(target: Target) -> Source:
    """The config and dtype of the weights `target` starts from; weights stored quantized are
    refused in one line."""
    from tuneplex.inference.loading import weights_config

    config = weights_config(target)
    _refuse_quantized(target, config)
    return Source(config=config, dtype=declared_dtype(config) or target.dtype or "float32")


def declared_dtype(config: Any) -> str | None:
    """The float dtype a config says its weights are in (`dtype`, formerly `torch_dtype`)."""
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(found).removeprefix("torch.") if found is not None else None
    return name if name in FLOAT_DTYPES else None


def _refuse_quantized(target: Target, config: Any) -> None:
    quant = getattr(config, "quantization_config", None)
    if not quant:
        return
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    method = quant.get("quant_method", "quantized")
    bits = next((b for b in ("4bit", "8bit") if quant.get(f"load_in_{b}")), None)
    what = f"{method} {bits[0]}-bit" if bits else str(method)
    where = target.base if target.adapter else target.path
    adapter = Path(target.path) / "adapter"
    if not target.adapter and (adapter / "adapter_config.json").is_file():
        hint = f"export the adapter it was merged from: tuneplex export {adapter}"
    else:
        hint = "export needs full-precision weights (a base that is not stored quantized)"
    raise UsageError(
        Problem(target.label, f"{where} stores its weights quantized ({what}); {hint}")
    )


def merge(*, target: Target, source: Source, dtype: str) -> Merged:
    """`target` loaded on the CPU from `source`, its adapter merged, every parameter in
    `dtype` (one of FLOAT_DTYPES)."""
    import torch

    from tuneplex.inference.loading import load
    from tuneplex.inference.prompts import Prompter

    loaded = load(target, device="cpu", dtype=source.dtype)
    out = getattr(torch, dtype)
    model = (
        _merge_adapter(loaded.model, dtype=out, label=target.label)
        if target.adapter
        else loaded.model
    )
    for p in model.parameters():  # buffers (rotary frequencies) keep the dtype they compute in
        p.data = p.data.to(out)
    model.config.dtype = dtype
    model.eval()
    tokenizer = loaded.tokenizer
    prompter = Prompter(tokenizer, target.spec)
    template = prompter.encoder.template
    if template is not None:
        tokenizer.chat_template = template
    eos = tokenizer.eos_token_id
    turn = [i for i in prompter.stop.token_ids if i != eos]
    named = model.generation_config.eos_token_id if model.generation_config else None
    named = [named] if isinstance(named, int) else list(named or ())
    return Merged(
        model=model,
        tokenizer=tokenizer,
        chat_template=template,
        eos_ids=[i for i in dict.fromkeys([*turn, eos, *named]) if i is not None],
        stop_strings=prompter.stop.strings,
        model_type=model.config.model_type,
        architecture=type(model).__name__,
        source_dtype=source.dtype,
        dtype=dtype,
        adapter=target.adapter,
        target=target,
    )


def _merge_adapter(model: Any, *, dtype: Any, label: str) -> Any:
    """The peft model's base with every adapter layer merged: each layer in float32, its sum
    cast to `dtype` before the next layer is touched."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or module.merged:
            continue
        module.to(torch.float32)
        try:
            module.merge(safe_merge=True)
        except ValueError as exc:  # peft's check of the merged weights
            raise UsageError(Problem(label, f"{name}: {exc}")) from None
        module.get_base_layer().to(dtype)
    return model.unload()
