"""Checkpoints written before the sharded format: one `model.safetensors` and one
`optimizer.safetensors` of full tensors, gathered on rank 0 (`LEGACY_MODEL` marks them).

They still resume, onto the layout they were written with or any other: every rank reads the
full tensors and `set_state_dict` keeps its own part. New checkpoints are never written so.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tuneplex.errors import Problem, UsageError, first_line

LEGACY_MODEL = "model.safetensors"
LEGACY_OPTIMIZER = "optimizer.safetensors"
LEGACY_RNG = "rng.safetensors"
SEP = "::"
"""Optimizer tensors were keyed `<parameter>::<name>`."""


def is_legacy(path: Path) -> bool:
    return (Path(path) / LEGACY_MODEL).is_file()


def load_legacy(
    path: Path, *, model, optimizer, state: dict[str, Any], partial: bool
) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from an old-format checkpoint; returns `state`.
    `partial`: the model is one pipeline stage, which takes its own part."""
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    try:
        weights = load_file(str(path / LEGACY_MODEL))
        moments = load_file(str(path / LEGACY_OPTIMIZER))
        rng = load_file(str(path / LEGACY_RNG))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise UsageError(Problem(str(path), f"unreadable checkpoint: {first_line(exc)}")) from None
    for name, target in state.get("aliases", {}).items():
        weights[name] = weights[target]
    expected = {
        name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad
    }
    if partial:
        weights = {k: v for k, v in weights.items() if k in expected}
    if set(weights) != expected:
        missing = sorted(expected - set(weights))[:3]
        extra = sorted(set(weights) - expected)[:3]
        raise UsageError(
            Problem(
                str(path),
                f"checkpoint does not fit this model (missing {missing}, unexpected {extra})",
            )
        )
    per_param: dict[str, dict[str, Any]] = {}
    for key, t in moments.items():
        fqn, name = key.rsplit(SEP, 1)
        if fqn in expected:
            per_param.setdefault(fqn, {})[name] = t
    groups = [
        {**g, "params": [n for n in g["params"] if n in expected]} for g in state["param_groups"]
    ]
    set_state_dict(
        model,
        optimizer,
        model_state_dict=weights,
        optim_state_dict={"state": per_param, "param_groups": groups},
        options=StateDictOptions(full_state_dict=True, cpu_offload=True, strict=False),
    )
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_tupled(state["python_rng"]))
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    return state


def legacy_model_tensors(path: Path) -> dict[str, Any]:
    """The weights of an old-format checkpoint, by parameter name (tied aliases left out, as
    transformers ties them again)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(Path(path) / LEGACY_MODEL))
    except Exception as exc:
        raise UsageError(Problem(str(path), f"unreadable checkpoint: {first_line(exc)}")) from None


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x
