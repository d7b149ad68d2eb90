"""The model families written to GGUF, as data: one entry per transformers `model_type`.

Facts come from llama.cpp (its converter and its model loaders): which GGUF architecture reads
the family, how its rotary layout differs from transformers', what its norms store, which
hyperparameters it reads and which shapes it cannot hold. Adding a family is one entry here
and one test model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ROPE_TYPES = ("default", "linear", "llama3")
"""Rotary scalings written: llama.cpp reads them from keys (linear) or a factors tensor (llama3)."""


@dataclass(frozen=True)
class Family:
    label: str
    arch: str
    """A `gguf.MODEL_ARCH` member's name."""
    interleaved_rope: bool = False
    """llama.cpp rotates adjacent pairs (its NORM rope) where transformers rotates halves: the
    q/k rows are permuted so both compute the same thing."""
    norm_offset: float = 0.0
    """Gemma's RMSNorm multiplies by (1 + w); llama.cpp by w: stored as w + 1."""
    head_required_tied: bool = False
    """llama.cpp reads no output head for this architecture: it reuses the embeddings."""
    activations: tuple[str, ...] = ("silu",)
    head_dim_free: bool = True
    """llama.cpp takes a head size other than hidden / heads from the file."""
    llama3_rope: bool = False
    """The architecture reads a rope_freqs tensor (Llama 3.1's frequency scaling)."""
    extra: Callable[[Any], list[tuple[str, Any]]] = field(default=lambda config: [])
    """Family-specific metadata, as (GGUFWriter method without `add_`, value)."""
    limits: Callable[[Any], str | None] = field(default=lambda config: None)
    """Why a config of this family cannot be written, or None."""
    notes: Callable[[Any], list[str]] = field(default=lambda config: [])
    """What llama.cpp runs differently that the user should know (said in the report)."""


def rope(config: Any, layer_kind: str = "full_attention") -> dict[str, Any]:
    """transformers 5's rope parameters for one kind of layer (Gemma 3 keeps one per kind)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_kind in params and isinstance(params[layer_kind], dict):
        return dict(params[layer_kind])
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _unwindowed(config: Any, runtime: str) -> list[str]:
    """A sliding window the runtime's architecture leaves out: the same model within it."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False or not window:
        return []
    if window >= config.max_position_embeddings:
        return []
    return [
        f"llama.cpp's {runtime} architecture has no sliding window: it matches transformers "
        f"for contexts up to {window} tokens (the model's sliding window)"
    ]


def _gemma_scale(config: Any, big_layers: int) -> str | None:
    """llama.cpp scales queries by 1/sqrt(head_dim), or by 1/sqrt(hidden / heads) for the 27B
    (told apart by its layer count); transformers by query_pre_attn_scalar ** -0.5."""
    if config.num_hidden_layers == big_layers:
        runtime = config.hidden_size // config.num_attention_heads
    else:
        runtime = head_dim(config)
    if not math.isclose(config.query_pre_attn_scalar, runtime):
        return (
            f"query_pre_attn_scalar {config.query_pre_attn_scalar} is not what llama.cpp "
            f"scales this Gemma's queries by ({runtime})"
        )
    return None


def _swa_pattern(config: Any) -> list[tuple[str, Any]]:
    kinds = getattr(config, "layer_types", None) or []
    return [("sliding_window_pattern", [k == "sliding_attention" for k in kinds])]


def _gemma2_extra(config: Any) -> list[tuple[str, Any]]:
    return [
        ("attn_logit_softcapping", config.attn_logit_softcapping),
        ("final_logit_softcapping", config.final_logit_softcapping),
        ("sliding_window", config.sliding_window),
        *_swa_pattern(config),
    ]


def _gemma2_limits(config: Any) -> str | None:
    if config.attn_logit_softcapping is None or config.final_logit_softcapping is None:
        return (
            "llama.cpp's gemma2 always soft-caps attention and final logits; this config does not"
        )
    if not config.tie_word_embeddings:
        return "llama.cpp's gemma2 reads no output head: the embeddings must be tied"
    return _gemma_scale(config, big_layers=46)


def _gemma3_extra(config: Any) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    if config.final_logit_softcapping:
        items.append(("final_logit_softcapping", config.final_logit_softcapping))
    local = rope(config, "sliding_attention").get("rope_theta")
    if config.sliding_window and any(k == "sliding_attention" for k in (config.layer_types or [])):
        items += [("sliding_window", config.sliding_window), *_swa_pattern(config)]
        if local is not None:
            items.append(("rope_freq_base_swa", local))
    return items


def _gemma3_limits(config: Any) -> str | None:
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "llama.cpp's gemma3 has no attention soft-capping; this config sets it"
    if rope(config, "sliding_attention").get("rope_type", "default") != "default":
        return "llama.cpp's gemma3 scales no rotary frequencies in sliding-window layers"
    return _gemma_scale(config, big_layers=62)


def _phi3_extra(config: Any) -> list[tuple[str, Any]]:
    original = rope(config).get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None
    )
    return [("rope_scaling_orig_ctx_len", original)] if original else []


def _granite_extra(config: Any) -> list[tuple[str, Any]]:
    return [
        ("attention_scale", config.attention_multiplier),
        ("embedding_scale", config.embedding_multiplier),
        ("residual_scale", config.residual_multiplier),
        ("logit_scale", config.logits_scaling),
    ]


def _qwen_notes(config: Any) -> list[str]:
    return _unwindowed(config, "qwen") if getattr(config, "use_sliding_window", False) else []


FAMILIES: dict[str, Family] = {
    "llama": Family(
        "Llama",
        "LLAMA",
        interleaved_rope=True,
        llama3_rope=True,
        notes=lambda c: _unwindowed(c, "llama"),
    ),
    "mistral": Family(
        "Mistral",
        "LLAMA",
        interleaved_rope=True,
        llama3_rope=True,
        notes=lambda c: _unwindowed(c, "llama"),
    ),
    "qwen2": Family("Qwen2", "QWEN2", notes=_qwen_notes),
    "qwen3": Family("Qwen3", "QWEN3", notes=_qwen_notes),
    "gemma2": Family(
        "Gemma 2",
        "GEMMA2",
        norm_offset=1.0,
        head_required_tied=True,
        activations=("gelu_pytorch_tanh",),
        extra=_gemma2_extra,
        limits=_gemma2_limits,
    ),
    "gemma3_text": Family(
        "Gemma 3 (text)",
        "GEMMA3",
        norm_offset=1.0,
        activations=("gelu_pytorch_tanh",),
        extra=_gemma3_extra,
        limits=_gemma3_limits,
    ),
    "phi3": Family(
        "Phi-3",
        "PHI3",
        head_dim_free=False,
        extra=_phi3_extra,
        notes=lambda c: _unwindowed(c, "phi3"),
    ),
    "granite": Family(
        "Granite", "GRANITE", interleaved_rope=True, head_dim_free=False, extra=_granite_extra
    ),
}


def supported() -> str:
    return ", ".join(dict.fromkeys(f.label for f in FAMILIES.values()))


def refusal(config: Any) -> str | None:
    """One line saying why llama.cpp cannot be given this config's model, or None."""
    kind = getattr(config, "model_type", None)
    family = FAMILIES.get(kind)
    if family is None:
        return f"GGUF export knows {supported()}; this model is {kind!r}"
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act not in family.activations:
        return f"{family.label} with activation {act!r}: llama.cpp computes {family.activations[0]}"
    if not family.head_dim_free and head_dim(config) * config.num_attention_heads != (
        config.hidden_size
    ):
        return f"llama.cpp's {family.label} takes no head size other than hidden / heads"
    kind = rope(config).get("rope_type", "default")
    if kind not in ROPE_TYPES or (kind == "llama3" and not family.llama3_rope):
        return f"{family.label} with rotary scaling {kind!r} is not written to GGUF"
    return family.limits(config)


def hparams(config: Any, family: Family, *, rows: int) -> list[tuple[str, Any]]:
    """Every architecture key llama.cpp reads for this config, as (writer method, value)."""
    params = rope(config)
    rotary = int(head_dim(config) * params.get("partial_rotary_factor", 1.0))
    items: list[tuple[str, Any]] = [
        ("vocab_size", rows),
        ("context_length", config.max_position_embeddings),
        ("embedding_length", config.hidden_size),
        ("block_count", config.num_hidden_layers),
        ("feed_forward_length", config.intermediate_size),
        ("head_count", config.num_attention_heads),
        ("head_count_kv", config.num_key_value_heads or config.num_attention_heads),
        ("layer_norm_rms_eps", config.rms_norm_eps),
        ("key_length", head_dim(config)),
        ("value_length", head_dim(config)),
        ("rope_dimension_count", rotary),
        ("rope_freq_base", params.get("rope_theta", 10000.0)),
    ]
    if params.get("rope_type") == "linear":
        import gguf

        items += [
            ("rope_scaling_type", gguf.RopeScalingType.LINEAR),
            ("rope_scaling_factor", params["factor"]),
        ]
    return items + family.extra(config)


def llama3_rope_factors(config: Any) -> list[float] | None:
    """Llama 3.1's per-frequency divisors (transformers' `_compute_llama3_parameters`), which
    llama.cpp reads from a rope_freqs tensor; None for other scalings."""
    params = rope(config)
    if params.get("rope_type") != "llama3":
        return None
    dim = int(head_dim(config) * params.get("partial_rotary_factor", 1.0))
    base, factor = params.get("rope_theta", 10000.0), params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old = params["original_max_position_embeddings"]
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors
