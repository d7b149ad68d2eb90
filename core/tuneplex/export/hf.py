"""A merged model as one standalone Hugging Face directory: safetensors, config.json, the
tokenizer with the chat template training used, and a generation_config.json whose eos holds
the end-of-turn token(s), so transformers, vLLM and TGI stop where the model was taught to."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from tuneplex.export.merge import Merged
from tuneplex.export.output import size_of, write_marker

HF_DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
"""`--dtype` for `--format hf`, and the torch dtype each names."""
SHARD_SIZE = "5GB"


def flag_of(dtype: str) -> str:
    """The `--dtype` name of a torch dtype name (`bfloat16` -> `bf16`)."""
    return next(flag for flag, name in HF_DTYPES.items() if name == dtype)


def generation_config(merged: Merged) -> Any:
    """The model's own generation config with eos set to every id that ends a turn."""
    config = copy.deepcopy(merged.model.generation_config)
    ids = merged.eos_ids
    config.eos_token_id = ids[0] if len(ids) == 1 else list(ids)
    config._from_model_config = False  # chosen here: transformers must not derive it again
    if config.pad_token_id is None and merged.tokenizer.pad_token_id is not None:
        config.pad_token_id = merged.tokenizer.pad_token_id
    return config


def write_hf(*, merged: Merged, out: Path) -> dict[str, Any]:
    """Write `merged` into the directory `out` (new, or emptied by the caller's staging); a
    small report: path, bytes, files, dtype."""
    out.mkdir(parents=True, exist_ok=True)
    model = merged.model
    model.generation_config = generation_config(merged)
    model.save_pretrained(str(out), max_shard_size=SHARD_SIZE)
    merged.tokenizer.save_pretrained(str(out))
    target = merged.target
    write_marker(
        out,
        format="hf",
        dtype=flag_of(merged.dtype),
        source=target.label,
        checkpoint=target.checkpoint,
        adapter_merged=merged.adapter,
        base=target.base,
        source_dtype=merged.source_dtype,
        eos_ids=merged.eos_ids,
        stop_strings=list(merged.stop_strings),
    )
    return {
        "path": str(out),
        "bytes": size_of(out),
        "files": sorted(p.name for p in out.iterdir()),
        "dtype": flag_of(merged.dtype),
    }
