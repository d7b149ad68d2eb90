"""A model's shape as its config.json says it: enough to count parameters and activations
without loading a weight (a config-only directory is enough). Standard library only."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tuneplex.errors import Problem, UsageError

CONFIG = "config.json"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of a decoder layer (Llama's names; every family here is counted as it)."""


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The sizes that decide memory; MoE fields are 0 for a dense model."""

    source: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    attention_bias: bool = False
    qk_norm: bool = False

    def linears(self) -> dict[str, tuple[int, int, int]]:
        """Per decoder layer: projection name → (in features, out features, copies); the
        experts' projections count `experts` copies (fused experts are one tensor each)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out = {"q_proj": (h, q, 1), "k_proj": (h, kv, 1), "v_proj": (h, kv, 1), "o_proj": (q, h, 1)}
        if self.experts:
            m, n = self.moe_intermediate or self.intermediate, self.experts
            out |= {"gate_proj": (h, m, n), "up_proj": (h, m, n), "down_proj": (m, h, n)}
        else:
            i = self.intermediate
            out |= {"gate_proj": (h, i, 1), "up_proj": (h, i, 1), "down_proj": (i, h, 1)}
        return out

    def layer_parameters(self) -> int:
        """One decoder layer: its projections, router, biases and norms."""
        total = sum(a * b * n for a, b, n in self.linears().values())
        if self.experts:
            total += self.hidden * self.experts  # the router
        if self.attention_bias:
            total += (self.heads + 2 * self.kv_heads) * self.head_dim
        if self.qk_norm:
            total += 2 * self.head_dim
        return total + 2 * self.hidden

    def embedding_parameters(self) -> int:
        """The input embeddings and, when not tied, the output head."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def parameters(self) -> int:
        """Every parameter: embeddings, head (when untied), layers, the final norm."""
        return self.embedding_parameters() + self.layers * self.layer_parameters() + self.hidden


def read_model_shape(source: str, *, base_dir: Path | None = None) -> ModelShape:
    """The shape of `source`: a local directory holding config.json (no weights needed), or a
    Hub id whose config.json is in the local Hugging Face cache (fetched only while the Hub is
    online). One-line UsageError naming the path, id or key otherwise."""
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if path.exists():
        if not (path / CONFIG).is_file():
            raise UsageError(Problem("model", f"{source}: no {CONFIG} (not a model directory)"))
        config_file = path / CONFIG
    else:
        config_file = _hub_config(source)
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(Problem("model", f"{config_file}: not readable JSON ({exc})")) from None
    if not isinstance(config, dict):
        raise UsageError(Problem("model", f"{config_file}: not a JSON object"))
    return shape_of(config, source=source, where=str(config_file))


def shape_of(config: dict, *, source: str, where: str) -> ModelShape:
    """The shape a config dict gives (a multimodal model's `text_config` is its language
    model); a missing size is one line naming the file and the key."""
    text = config.get("text_config")
    if isinstance(text, dict):
        config = {"tie_word_embeddings": config.get("tie_word_embeddings", True), **text}

    def size(*keys: str, default: int | None = None) -> int:
        for key in keys:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        if default is not None:
            return default
        raise UsageError(Problem("model", f"{where}: no {keys[0]} (a positive integer)"))

    hidden = size("hidden_size", "n_embd", "d_model")
    heads = size("num_attention_heads", "n_head")
    experts = size("num_local_experts", "num_experts", "n_routed_experts", default=0)
    return ModelShape(
        source=source,
        model_type=str(config.get("model_type", "unknown")),
        hidden=hidden,
        layers=size("num_hidden_layers", "n_layer"),
        heads=heads,
        kv_heads=size("num_key_value_heads", default=heads),
        head_dim=size("head_dim", default=hidden // heads),
        intermediate=size("intermediate_size", "n_inner", default=4 * hidden),
        vocab=size("vocab_size"),
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        experts=experts,
        experts_per_token=size("num_experts_per_tok", default=1 if experts else 0),
        moe_intermediate=size("moe_intermediate_size", default=0),
        attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
        qk_norm=config.get("model_type") in QK_NORM_FAMILIES,
    )


QK_NORM_FAMILIES = ("qwen3", "qwen3_moe", "olmo2", "gemma3_text")


def _hub_config(ref: str) -> Path:
    """config.json of a Hub id from the local cache; downloaded only while the Hub is online."""
    if ref.count("/") != 1 or ref.startswith(("/", ".", "~")):
        raise UsageError(Problem("model", f"{ref}: no such local directory"))
    cached = _cached(ref)
    if cached is not None:
        return cached
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UsageError(
            Problem(
                "model",
                f"{ref}: no such local directory, and its config.json is not in the Hugging "
                "Face cache while the Hub is offline (HF_HUB_OFFLINE)",
            )
        )
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(ref, CONFIG))
    except Exception as exc:  # an unknown id, no network, no huggingface_hub: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(Problem("model", f"{ref}: cannot fetch its {CONFIG} ({first})")) from None


def _cached(ref: str) -> Path | None:
    """The cache's config.json of `ref` at its `main` snapshot (any snapshot otherwise)."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(Path.home(), ".cache", "huggingface"), "hub"
    )
    repo = Path(hub) / ("models--" + ref.replace("/", "--"))
    ref_file = repo / "refs" / "main"
    if ref_file.is_file():
        config = repo / "snapshots" / ref_file.read_text().strip() / CONFIG
        if config.is_file():
            return config
    found = sorted((repo / "snapshots").glob(f"*/{CONFIG}"))
    return found[0] if found else None
