"""v1's LoRA `target_modules` (Megatron's fused module names, globs over module paths) as the
entries of `training.lora.target_modules`, which peft matches as a list: a module's own name,
or the end of its dotted path.

`linear_qkv` holds Hugging Face's q_proj, k_proj and v_proj; `linear_proj` o_proj; `linear_fc1`
gate_proj and up_proj; `linear_fc2` down_proj. A glob that selects some layers only becomes one
entry per module and layer, `layers.0.self_attn.q_proj`: q_proj of layer 0 and nothing else
(the Llama-style paths every model with these module names has).
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable
from pathlib import Path

MEGATRON = {  # v1's fused (Megatron) module: its parent, and the Hugging Face modules it holds
    "linear_qkv": ("self_attention", ("q_proj", "k_proj", "v_proj")),
    "linear_proj": ("self_attention", ("o_proj",)),
    "linear_fc1": ("mlp", ("gate_proj", "up_proj")),
    "linear_fc2": ("mlp", ("down_proj",)),
}
HF_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
PROBES = (1024, 4096)
"""Layer counts a pattern is tried on when the model's is unknown: a selection that differs
between them depends on the layer count (`*.layers.1*.*`)."""


def hf_targets(
    patterns: Iterable[str], *, layers: int | None
) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """v1 target_modules as `training.lora.target_modules` entries: (names, notes, [(pattern,
    why not)]). Entries are matched as peft matches a list: a module's own name, or the end of
    its dotted path, so `layers.0.self_attn.q_proj` is q_proj of layer 0 and nothing else."""
    everywhere: list[str] = []
    per_layer: set[tuple[int, str]] = set()
    notes, lost = [], []
    for pattern in patterns:
        if not any(c in pattern for c in "*?[.") and pattern not in MEGATRON:
            everywhere.append(pattern)  # a module name of the model's own: as written
            continue
        if pattern in MEGATRON:
            everywhere += MEGATRON[pattern][1]
            continue
        full, part = _selection(pattern, layers or PROBES[0])
        if layers is None and (full, part) != _selection(pattern, PROBES[1]):
            why = "the layers it selects depend on the model's layer count: pass --model DIR"
            lost.append((pattern, why))
            continue
        if not full and not part:
            lost.append((pattern, "matches no attention or MLP projection"))
            continue
        everywhere += [leaf for leaf in HF_PARENT if leaf in full]
        per_layer |= part
        if part:
            picked = sorted({i for i, _ in part})
            notes.append(f"{pattern}: layer{'s' if len(picked) > 1 else ''} {_ranges(picked)} only")
    names = [leaf for leaf in HF_PARENT if leaf in everywhere]
    names += [n for n in dict.fromkeys(everywhere) if n not in HF_PARENT]
    names += [
        f"layers.{i}.{HF_PARENT[leaf]}.{leaf}"
        for i, leaf in sorted(per_layer, key=lambda p: (p[0], list(HF_PARENT).index(p[1])))
        if leaf not in everywhere
    ]
    return names, notes, lost


def _selection(pattern: str, layers: int) -> tuple[frozenset, frozenset]:
    """What a v1 glob selects in a model of `layers` layers: (Hugging Face modules chosen in
    every layer, (layer, module) pairs chosen in some). Matched against v1's (Megatron) module
    paths, `decoder.layers.N.self_attention.linear_qkv`, or their last name; where that finds
    nothing, against Hugging Face's, `model.layers.N.self_attn.q_proj`."""
    rx = re.compile(fnmatch.translate(pattern))
    found = {
        (i, hf)
        for leaf, (parent, hfs) in MEGATRON.items()
        for i in range(layers)
        if rx.match(f"decoder.layers.{i}.{parent}.{leaf}") or rx.match(leaf)
        for hf in hfs
    } or {
        (i, leaf)
        for leaf, parent in HF_PARENT.items()
        for i in range(layers)
        if rx.match(f"model.layers.{i}.{parent}.{leaf}") or rx.match(leaf)
    }
    full = frozenset(h for h in HF_PARENT if all((i, h) in found for i in range(layers)))
    return full, frozenset((i, h) for i, h in found if h not in full)


def _ranges(numbers: list[int]) -> str:
    out, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)


def model_layers(model: str | None) -> int | None:
    """The decoder layer count of a local model directory (its config.json), else None."""
    if model is None:
        return None
    config = Path(model).expanduser() / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for where in (data, data.get("text_config") or {}):
        count = where.get("num_hidden_layers") if isinstance(where, dict) else None
        if isinstance(count, int) and count > 0:
            return count
    return None
