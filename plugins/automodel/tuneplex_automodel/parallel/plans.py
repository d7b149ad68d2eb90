"""What the parallel layer knows about each model family, as data keyed by the Hugging Face class.

A family is a tensor-parallel plan (module path inside a decoder layer -> style), the modules
whose gradients each tensor-parallel rank computes only in part, and where a pipeline stage
finds the model's parts. Adding a family is one entry here and one test
(`tests/test_automodel_families.py`); `lora_plan` adapts every plan to peft's LoRA layers.

Styles:
- `colwise`: the output features split across ranks, the output stays split (the next
  `rowwise` module takes it as it is);
- `rowwise`: the input features split, the outputs summed (one all-reduce);
- `colwise_gather`: split like `colwise`, the output gathered whole: fused projections
  (Phi-3's `qkv_proj`, `gate_up_proj`) whose output the model slices at fixed offsets, so
  q, k and v (gate and up) come back apart exactly as in one process;
- `rowwise_split`: split like `rowwise`, for a whole input (after a `colwise_gather`).

Data parallelism (FSDP2), context and expert parallelism need no plan: an architecture
missing here trains with them; tensor and pipeline parallelism refuse it in one line.
Imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

STYLES = ("colwise", "rowwise", "colwise_gather", "rowwise_split")


@dataclass(frozen=True)
class StageParts:
    """Where a pipeline stage finds the parts of a causal LM (attribute paths from the model),
    and the scalings a family's forward applies around them."""

    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    rotary: str = "model.rotary_emb"
    norm: str = "model.norm"
    head: str = "lm_head"
    embed_multiplier: str | None = None
    """Config attribute the embeddings are multiplied by (Granite's `embedding_multiplier`);
    what the forward does to the logits is `model.finish_logits`'s."""


@dataclass(frozen=True)
class Family:
    tp: MappingProxyType
    """Module path inside one decoder layer -> style (see STYLES)."""
    partial_grads: tuple[str, ...] = ()
    """Modules inside a decoder layer that act on a `colwise` output (per-head q/k norms):
    their weights are whole on every rank, but each rank's gradient covers its own heads only,
    so the gradients are summed over the tensor-parallel ranks."""
    stages: StageParts | None = field(default_factory=StageParts)
    """None: the family's forward does more than a stage can repeat; no pipeline parallelism."""
    divides: tuple[str, ...] = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    """Config sizes the tensor-parallel width must divide."""
    note: str = ""


def _plan(**styles: str) -> MappingProxyType:
    assert set(styles.values()) <= set(STYLES), styles
    return MappingProxyType({k.replace("__", "."): v for k, v in styles.items()})


ATTENTION = _plan(
    self_attn__q_proj="colwise",
    self_attn__k_proj="colwise",
    self_attn__v_proj="colwise",
    self_attn__o_proj="rowwise",
)
LLAMA = MappingProxyType(
    {
        **ATTENTION,
        **_plan(mlp__gate_proj="colwise", mlp__up_proj="colwise", mlp__down_proj="rowwise"),
    }
)
FUSED = _plan(
    self_attn__qkv_proj="colwise_gather",
    self_attn__o_proj="rowwise_split",
    mlp__gate_up_proj="colwise_gather",
    mlp__down_proj="rowwise_split",
)
QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")

FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(tp=LLAMA),
    "MistralForCausalLM": Family(tp=LLAMA),
    "Qwen2ForCausalLM": Family(tp=LLAMA),
    "Qwen3ForCausalLM": Family(tp=LLAMA, partial_grads=QK_NORMS),
    "Gemma2ForCausalLM": Family(
        tp=LLAMA,
        stages=None,
        note="no pipeline: its forward scales embeddings and soft-caps logits",
    ),
    "Gemma3ForCausalLM": Family(
        tp=LLAMA,
        partial_grads=QK_NORMS,
        stages=None,
        note="no pipeline: its forward soft-caps logits (two rotary embeddings)",
    ),
    "Phi3ForCausalLM": Family(tp=FUSED),
    "GraniteForCausalLM": Family(
        tp=LLAMA,
        stages=StageParts(embed_multiplier="embedding_multiplier"),
    ),
    # mixtures of experts: attention split by tensor parallelism, experts by expert parallelism
    "Qwen3MoeForCausalLM": Family(
        tp=ATTENTION, partial_grads=QK_NORMS, divides=("num_attention_heads", "num_key_value_heads")
    ),
    "MixtralForCausalLM": Family(
        tp=ATTENTION, divides=("num_attention_heads", "num_key_value_heads")
    ),
}


def family_of(model_class: str) -> Family | None:
    return FAMILIES.get(model_class)


def supported(*, pipeline: bool = False) -> list[str]:
    """The classes with a tensor-parallel plan (and with `pipeline`, stage parts)."""
    return sorted(c for c, f in FAMILIES.items() if not pipeline or f.stages is not None)


def lora_plan(plan: MappingProxyType, adapters: list[str]) -> dict[str, str]:
    """`plan` for a model whose planned modules are peft LoRA layers with these adapters.

    The base layer keeps its style. A column split cuts B's output features (A stays whole:
    its output is the small rank-r input of B); a row split cuts A's input features (B stays
    whole: it adds to the summed output). Without adapters the plan is returned as it is.
    """
    if not adapters:
        return dict(plan)
    out: dict[str, str] = {}
    for path, style in plan.items():
        out[f"{path}.base_layer"] = style
        part = "lora_B" if style.startswith("colwise") else "lora_A"
        out.update({f"{path}.{part}.{a}": style for a in adapters})
    return out


def table_markdown() -> str:
    """The README's family x parallelism table, generated from FAMILIES (a test compares)."""
    yes, no = "yes", "—"
    lines = [
        "| Hugging Face class | data parallel (FSDP2) | tensor parallel | pipeline parallel "
        "| notes |",
        "|---|---|---|---|---|",
    ]
    for cls in sorted(FAMILIES):
        f = FAMILIES[cls]
        fused = any(s.endswith(("_gather", "_split")) for s in f.tp.values())
        tp = "fused projections, output gathered" if fused else yes
        if set(f.tp) == set(ATTENTION):
            tp = "attention (experts: expert parallel)"
        notes = [n for n in (f.note, "q/k norm gradients summed over TP" * bool(f.partial_grads))]
        lines.append(
            f"| `{cls}` | {yes} | {tp} | {yes if f.stages else no} | "
            + "; ".join(n for n in notes if n)
            + " |"
        )
    lines.append(
        "| any other causal LM | yes | — (refused in one line) | — (refused in one line) | |"
    )
    return "\n".join(lines) + "\n"
