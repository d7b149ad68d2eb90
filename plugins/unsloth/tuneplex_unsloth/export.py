"""final/ for the unsloth backend: the adapter, or the merged model in 16 or 4 bits — checked —
with the adapter it was made from under adapter/ (so the merge can be checked against base +
adapter, and the adapter used on its own).

Unsloth refuses plain merged_4bit, and a forced path has been known to write 16-bit weights
silently; what is written is read back and refused loudly when it is not what was asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneplex.errors import TrainingStopped
from tuneplex.runs import AtomicDir

SIXTEEN_BIT = {"BF16", "F16"}
ADAPTER_DIR = "adapter"


def export_final(target: Path, *, model, tokenizer, job, loader) -> str:
    method = job.output.save_method
    full = job.training.finetuning_type == "all_weights"
    with AtomicDir(target) as tmp:
        if full:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            what = "full model: AutoModelForCausalLM.from_pretrained(path)"
        elif method == "lora":
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            what = "LoRA adapter: peft.PeftModel.from_pretrained(base, path)"
        else:
            model.save_pretrained(str(tmp / ADAPTER_DIR))  # before the merge touches anything
            loader.save_merged(model, tokenizer, tmp, method=method, job=job)
            verify(tmp, method)
            bits = "4-bit" if method == "merged_4bit" else "16-bit"
            what = (
                f"merged {bits} model (adapter in {ADAPTER_DIR}/): "
                "AutoModelForCausalLM.from_pretrained(path)"
            )
    return what


def weight_dtypes(path: Path) -> dict[str, int]:
    """Count of tensors per safetensors dtype across the directory's weight files."""
    counts: dict[str, int] = {}
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                counts[info["dtype"]] = counts.get(info["dtype"], 0) + 1
    return counts


def verify(path: Path, method: str) -> None:
    dtypes = weight_dtypes(path)
    if not dtypes:
        raise TrainingStopped(f"output.save_method {method}: no safetensors weights were written")
    config = json.loads((path / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    if method == "merged_4bit":
        four_bit = quant.get("load_in_4bit") or quant.get("_load_in_4bit")
        if not (four_bit and "U8" in dtypes):
            raise TrainingStopped(
                f"output.save_method merged_4bit: the saved model is not 4-bit (weight dtypes "
                f"{_fmt(dtypes)}, quantization_config {quant or 'none'}); nothing was kept"
            )
    elif method == "merged_16bit":
        floats = {d for d in dtypes if d.startswith(("F", "BF"))}
        if quant or not floats <= SIXTEEN_BIT:
            raise TrainingStopped(
                f"output.save_method merged_16bit: the saved model is not 16-bit (weight dtypes "
                f"{_fmt(dtypes)}); nothing was kept"
            )


def _fmt(dtypes: dict[str, int]) -> str:
    return ", ".join(f"{k}×{v}" for k, v in sorted(dtypes.items()))
