"""Model references (a local directory or a Hugging Face id), checked before any heavy work,
and the facts about a loaded model that every backend reads the same way.

Shared by every backend so a bad `model` gets the same one-line error whichever trains, so
every backend loads weights from safetensors only, and so a peft (LoRA) wrapper is seen
through in one way. No torch or peft imports here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tuneplex.data.sources import hub_offline
from tuneplex.errors import Problem, UsageError


def resolve_model_ref(ref: str, *, key: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is local); one-line UsageError naming `key`
    for a directory that is not a loadable model, or a Hub id while the Hub is offline."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(Problem(key, f"{ref}: not a directory (a model is a directory)"))
        if not (path / "config.json").is_file():
            raise UsageError(Problem(key, f"{ref}: no config.json (not a model directory)"))
        if not any(path.glob("*.safetensors")):
            pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
            why = f" (found {pickled[0]}; pickled weights are not loaded)" if pickled else ""
            raise UsageError(Problem(key, f"{ref}: no .safetensors weights{why}"))
        return str(path), True
    if hub_offline():
        raise UsageError(
            Problem(key, f"{ref}: no such local directory, and the Hub is offline (HF_HUB_OFFLINE)")
        )
    return ref, False


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts (logical sizes, also for sharded parameters)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def is_peft(model: Any) -> bool:
    """Whether `model` is a peft wrapper. Looked up in the loaded modules, never imported: a
    model cannot be a PeftModel unless peft is already loaded."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def unwrap_peft(model: Any) -> Any:
    """The transformers model inside a peft wrapper (`model` itself when it is not one): the
    one place backends reach past the adapter to the model's own modules and class."""
    return model.get_base_model() if is_peft(model) else model


def adapter_names(model: Any) -> list[str]:
    """The names of a peft wrapper's adapters (their modules' keys, as in `lora_A.<name>`); none
    for a plain model."""
    return list(model.peft_config) if is_peft(model) else []
