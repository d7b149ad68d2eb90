"""GGUF files for llama.cpp, Ollama and LM Studio, written with the `gguf` library (its
writer, constants, tensor-name map and quantizers): no compiler, no llama.cpp checkout.

A family is data (`gguf_families`); the tokenizer is read from the user's own tokenizer
(`gguf_vocab`). The file is planned from tensor shapes first, then each tensor is converted
and written on its own, so memory stays near one copy of the model; it is written beside
`out` and renamed at the end, so a failure never leaves half a file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneplex.errors import Problem, UsageError

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
CHUNK_ELEMENTS = 1 << 22
"""Rows are converted and quantized this many values at a time: a bf16 model's largest
tensor is never held in float32 whole."""
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def gguf_refusal(config: Any) -> str | None:
    """One line saying why a model of this transformers config cannot be written, or None."""
    from tuneplex.export.gguf_families import refusal

    return refusal(config)


@dataclass(frozen=True)
class _Tensor:
    name: str
    """Its GGUF name."""
    source: str | None
    """Its state-dict key; None for a tensor computed here (rope_freqs)."""
    shape: tuple[int, ...]
    qtype: Any
    """A gguf.GGMLQuantizationType."""


def write_gguf(
    *,
    model: Any,
    tokenizer: Any,
    out: Path,
    dtype: str,
    chat_template: str | None,
    eos_ids: list[int],
) -> dict[str, Any]:
    """Write `model` (merged, on the CPU) and `tokenizer` to `out` as one GGUF file whose
    tensors are `dtype` (norms and other 1-D tensors stay f32, as llama.cpp keeps them).
    `eos_ids`: the end-of-turn ids the chat template trains, first the one it ends turns
    with; llama.cpp stops at them. Returns a small report."""
    import gguf

    from tuneplex.export import gguf_families as families
    from tuneplex.export import gguf_vocab

    if dtype not in GGUF_DTYPES:
        raise UsageError(Problem("--dtype", f"{dtype!r} is not one of {', '.join(GGUF_DTYPES)}"))
    config = model.config
    reason = gguf_refusal(config)
    if reason is not None:
        raise UsageError(Problem("--format", f"gguf: {reason}"))
    family = families.FAMILIES[config.model_type]
    state = model.state_dict()
    rows = state[EMBED].shape[0]
    try:
        vocab = gguf_vocab.read_vocab(tokenizer, rows=rows)
    except gguf_vocab.VocabRefused as exc:
        raise UsageError(Problem("tokenizer", f"gguf: {exc}")) from None
    specials = gguf_vocab.read_specials(tokenizer, eos_ids=eos_ids)
    plan = _plan(config=config, family=family, state=state, dtype=dtype)
    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, family.arch)]
    out = Path(out)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(partial, arch)
    try:
        _write_metadata(writer, config=config, family=family, dtype=dtype, rows=rows)
        gguf_vocab.write_vocab(writer, vocab=vocab, specials=specials, chat_template=chat_template)
        _write_tensors(writer, plan=plan, state=state, config=config, family=family)
        writer.close()
        os.replace(partial, out)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return _report(
        out=out, arch=arch, dtype=dtype, plan=plan, notes=_notes(config, family, vocab, specials)
    )


# -- what is written ----------------------------------------------------------------------
def _plan(*, config: Any, family: Any, state: dict, dtype: str) -> list[_Tensor]:
    """Every tensor's GGUF name, shape and type, from shapes alone (nothing converted yet)."""
    import gguf

    from tuneplex.export.gguf_families import llama3_rope_factors

    arch = getattr(gguf.MODEL_ARCH, family.arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    head = _head_source(state, family)
    plan: list[_Tensor] = []
    factors = llama3_rope_factors(config)
    if factors is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.append(_Tensor(name, None, (len(factors),), gguf.GGMLQuantizationType.F32))
    for key, tensor in state.items():
        if key == HEAD and head != HEAD:
            continue  # tied: llama.cpp reads the embeddings as the output head
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UsageError(Problem("--format", f"gguf: no llama.cpp tensor holds {key}"))
        shape = tuple(tensor.shape)
        plan.append(_Tensor(name, key, shape, _ggml_type(name, shape, dtype, key == head)))
    return plan


def _head_source(state: dict, family: Any) -> str:
    """The state-dict key of the output head: lm_head, or the embeddings when tied."""
    if HEAD not in state or state[HEAD].data_ptr() == state[EMBED].data_ptr():
        return EMBED
    if family.head_required_tied:
        import torch

        if not torch.equal(state[HEAD], state[EMBED]):
            raise UsageError(
                Problem(
                    "--format",
                    f"gguf: llama.cpp's {family.label} reuses the embeddings as the output head, "
                    "and this model's head differs from them (an adapter on lm_head?)",
                )
            )
        return EMBED
    return HEAD


def _ggml_type(name: str, shape: tuple[int, ...], dtype: str, is_head: bool) -> Any:
    """llama.cpp's rule: 1-D tensors and norms in f32, matrices in the file's type. Quantized
    files keep the output head at q8_0 (llama.cpp's own quantizer keeps it above 4 bits, at
    Q6_K, which the gguf library cannot write) and rows that are no whole number of blocks in
    f16."""
    import gguf

    t = gguf.GGMLQuantizationType
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return t.F32
    chosen = {"f32": t.F32, "f16": t.F16, "bf16": t.BF16, "q8_0": t.Q8_0, "q4_0": t.Q4_0}[dtype]
    if chosen == t.Q4_0 and is_head:
        chosen = t.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[chosen]
    return chosen if shape[-1] % block == 0 else t.F16


def _write_metadata(writer: Any, *, config: Any, family: Any, dtype: str, rows: int) -> None:
    import gguf

    from tuneplex.export.gguf_families import hparams

    # general.name: llama.cpp sets token attributes by it ("phi-3" and others), so it is the
    # source's own name, never a family's
    writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "")).name or "tuneplex")
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[dtype]
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for method, value in hparams(config, family, rows=rows):
        getattr(writer, f"add_{method}")(value)


# -- tensors, one at a time -----------------------------------------------------------------
def _write_tensors(writer: Any, *, plan: list[_Tensor], state: dict, config, family) -> None:
    import gguf
    import numpy as np

    for t in plan:
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(t.shape, t.qtype)))
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in plan:
        writer.write_tensor_data(_encoded(t, state=state, config=config, family=family))


def _encoded(t: _Tensor, *, state: dict, config: Any, family: Any):
    """One tensor as the file stores it: transformed for llama.cpp, then in its ggml type."""
    import gguf
    import numpy as np
    import torch

    from tuneplex.export.gguf_families import llama3_rope_factors

    if t.source is None:
        return np.asarray(llama3_rope_factors(config), dtype=np.float32)
    data = transformed(state[t.source].detach(), key=t.source, config=config, family=family)
    qtype = gguf.GGMLQuantizationType
    if t.qtype == qtype.F32 and data.dtype == torch.float32:
        return data.contiguous().numpy()
    kind = {qtype.F32: np.float32, qtype.F16: np.float16}.get(t.qtype, np.uint8)
    shape = t.shape if kind is not np.uint8 else gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
    out = np.empty(shape, dtype=kind)
    if data.dim() < 2:
        out[...] = gguf.quants.quantize(data.to(torch.float32).numpy(), t.qtype)
        return out
    step = max(1, CHUNK_ELEMENTS // data.shape[-1])
    for row in range(0, data.shape[0], step):
        part = data[row : row + step].to(torch.float32).contiguous().numpy()
        out[row : row + step] = gguf.quants.quantize(part, t.qtype)
    return out


def transformed(tensor: Any, *, key: str, config: Any, family: Any) -> Any:
    """`tensor` as llama.cpp computes with it (the family's documented transforms):
    - interleaved rope: q/k projection rows reordered from transformers' rotate-half layout
      (pairs i, i + d/2) to llama.cpp's adjacent pairs (2i, 2i + 1), per head;
    - norm offset: Gemma's norms stored as 1 + w, since llama.cpp multiplies by w.
    Other tensors come back as they are."""
    import torch

    if family.interleaved_rope and key.endswith(("q_proj.weight", "q_proj.bias")):
        return interleave_rope(tensor.to(torch.float32), config.num_attention_heads)
    if family.interleaved_rope and key.endswith(("k_proj.weight", "k_proj.bias")):
        return interleave_rope(tensor.to(torch.float32), config.num_key_value_heads)
    if family.norm_offset and key.endswith("norm.weight"):
        return tensor.to(torch.float32) + family.norm_offset
    return tensor


def interleave_rope(rows: Any, heads: int) -> Any:
    """Per head, rows [0 .. d/2) and [d/2 .. d) interleaved: 0, d/2, 1, d/2 + 1, ..."""
    return (
        rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


# -- the report ---------------------------------------------------------------------------
def _notes(config: Any, family: Any, vocab: Any, specials: Any) -> list[str]:
    notes = [*family.notes(config), *vocab.notes]
    if specials.unmarked:
        notes.append(
            f"end-of-turn ids {list(specials.unmarked)} have no llama.cpp key (eos, eot and eom "
            "are taken): llama.cpp stops there only if their text is one it knows"
        )
    return notes


def _report(*, out: Path, arch: str, dtype: str, plan: list[_Tensor], notes: list[str]) -> dict:
    """Path, size, tensor count, architecture and type; `kept`: the tensors (block numbers as
    *) written in another type than `dtype`, with theirs."""
    kept: dict[str, str] = {}
    for t in plan:
        if t.qtype.name.lower() != dtype:
            kept[re.sub(r"^blk\.\d+\.", "blk.*.", t.name)] = t.qtype.name.lower()
    return {
        "path": str(out),
        "bytes": out.stat().st_size,
        "tensors": len(plan),
        "architecture": arch,
        "dtype": dtype,
        "kept": kept,
        "notes": notes,
    }
