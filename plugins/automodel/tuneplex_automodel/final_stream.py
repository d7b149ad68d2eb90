"""The weights of `final/`, streamed to rank 0 one whole tensor at a time.

Every rank walks its sharded state dict in the same order; each DTensor is made whole
(`full_tensor`, a collective within its mesh), rank 0 writes it into its place in the
safetensors file (`safetensors_stream`) and it is freed before the next. Pipeline stages
other than rank 0's send their tensors to rank 0 in stage order, one at a time. So rank 0's
peak is about the largest tensor (twice for a merged LoRA weight), never the model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuneplex_automodel.safetensors_stream import DEFAULT_FILE_BYTES, Entry, SafetensorsWriter

PEFT_PREFIX = "base_model.model."
_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _clean(name: str) -> str:
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def _tied_duplicates(model) -> set[str]:
    """Names under which a parameter already seen is shared (tied embeddings): transformers
    saves such a weight once and ties it again on load. The same on every rank."""
    first = {_clean(n) for n, _ in model.named_parameters()}
    every = {_clean(n) for n, _ in model.named_parameters(remove_duplicate=False)}
    return every - first


_ADAPTER_PARTS = (
    ".lora_A.",
    ".lora_B.",
    ".lora_embedding_A.",
    ".lora_embedding_B.",
    ".lora_magnitude_vector.",  # DoRA's
)
MAGNITUDE = ".lora_magnitude_vector."


def _is_lora(name: str) -> bool:
    return any(p in name for p in _ADAPTER_PARTS)


def _stage_leads(dist) -> bool:
    return not (dist.local_rank_in("dp_cp") or dist.local_rank_in("tp"))


def _metas(sd: dict[str, Any], names: list[str], *, dist) -> list[tuple[str, tuple, Any, int]]:
    """(name, global shape, dtype, stage) of every tensor, on rank 0 (others: their own)."""
    own = [(k, tuple(sd[k].shape), sd[k].dtype, dist.pp_rank) for k in names]
    if dist.dims.pp == 1 or not _stage_leads(dist):
        return own
    import torch.distributed as tdist

    out = [None] * dist.dims.pp if dist.is_main else None
    tdist.gather_object(own, out, dst=0, group=dist.group("pp"))
    return [m for stage in out for m in stage] if dist.is_main else own


def _whole(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def whole_tensors(model, *, dist, keep) -> tuple[list, Iterator[tuple[str, Any]]]:
    """(metas on rank 0, iterator of (name, whole tensor on rank 0 / None elsewhere)); every
    rank must exhaust the iterator. `keep(name)` picks the tensors (the same on every rank)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model)  # sharded: DTensors, nothing copied
    skip = _tied_duplicates(model)
    names = [k for k in sd if k not in skip and keep(k)]
    metas = _metas(sd, names, dist=dist)

    def walk():
        import torch
        import torch.distributed as tdist

        for stage in range(dist.dims.pp):
            if stage == dist.pp_rank:
                lead = dist.dims.pp > 1 and _stage_leads(dist) and stage > 0
                for k in names:
                    t = _whole(sd[k])
                    if lead:
                        tdist.send(t.contiguous(), dst=0)
                    yield k, (t.detach().cpu() if dist.is_main else None)
                    del t
            elif dist.is_main:
                src = tdist.get_global_rank(dist.group("pp"), stage)
                for k, shape, dtype, s in metas:
                    if s != stage:
                        continue
                    buf = torch.empty(shape, dtype=dtype, device=dist.device)
                    tdist.recv(buf, src=src)
                    yield k, buf.cpu()
                    del buf

    return metas, walk()


def _cast(dtype, t_dtype):
    return dtype if dtype is not None and t_dtype.is_floating_point else t_dtype


def stream_final(
    directory: Path | None,
    *,
    model,
    dist,
    lora: bool,
    merge: bool,
    dtype,
    max_bytes: int = DEFAULT_FILE_BYTES,
) -> None:
    """The weights (and configs) of final/ into `directory` (rank 0; None elsewhere)."""
    main = directory is not None
    if lora:
        _adapter(directory / "adapter" if merge and main else directory, model=model, dist=dist)
        if not merge:
            return
    metas, tensors = whole_tensors(model, dist=dist, keep=lambda k: True)
    if lora:
        _merged(directory, metas, tensors, model=model, dtype=dtype, max_bytes=max_bytes)
        return
    saved = _saved_form(model)
    entries = _entries(metas, saved, dtype) if main else []
    writer = SafetensorsWriter(directory, entries, max_bytes=max_bytes) if main else None
    for k, t in tensors:
        if writer is not None:
            for name, part in saved(k, t.to(_cast(dtype, t.dtype))):
                writer.put(name, part)
    if writer is not None:
        writer.close()
        _write_config(directory, model, dtype=_first_float(metas, dtype))


def _adapter(directory: Path | None, *, model, dist) -> None:
    """peft's adapter files: adapter_config.json and adapter_model.safetensors (peft names)."""

    metas, tensors = whole_tensors(model, dist=dist, keep=_is_lora)
    if directory is None:
        for _ in tensors:
            pass
        return
    directory.mkdir(parents=True, exist_ok=True)
    entries = [Entry(peft_name(k), shape, dt) for k, shape, dt, _ in metas]
    writer = SafetensorsWriter(directory, entries, stem="adapter_model", max_bytes=2**62)
    for k, t in tensors:
        writer.put(peft_name(k), t)
    writer.close()
    config = copy.deepcopy(model.peft_config["default"])
    config.inference_mode = True
    config.save_pretrained(str(directory))


def _merged(directory, metas, tensors, *, model, dtype, max_bytes) -> None:
    """The merged model: each LoRA layer's base weight plus scaling * B @ A, as peft's
    merge_and_unload computes it; names as the base model has them."""
    writer = None
    saved = _saved_form(model.get_base_model())
    if directory is not None:
        base = [(_base_name(k), shape, dt, st) for k, shape, dt, st in metas if not _is_lora(k)]
        writer = SafetensorsWriter(directory, _entries(base, saved, dtype), max_bytes=max_bytes)
    pending: dict[str, dict[str, Any]] = {}
    complete = 4 if model.peft_config["default"].use_dora else 3  # DoRA: and its magnitude
    for k, t in tensors:
        if writer is None:
            continue
        module, sep, _ = k.partition(".base_layer.weight")
        for part in (".lora_A.", ".lora_B.", MAGNITUDE):
            if part in k:
                module, sep = k.partition(part)[0], part
        if not sep:
            for name, part in saved(_base_name(k), t.to(_cast(dtype, t.dtype))):
                writer.put(name, part)
            continue
        parts = pending.setdefault(module, {})
        parts[sep] = t
        if len(parts) == complete:
            del pending[module]
            merged = _merge(model, parts, dtype)
            for name, part in saved(_base_name(module + ".base_layer.weight"), merged):
                writer.put(name, part)
    if writer is not None:
        if pending:
            raise RuntimeError(f"LoRA layers left unmerged: {sorted(pending)[:3]}")
        writer.close()
        _write_config(directory, model.get_base_model(), dtype=_first_float(metas, dtype))


def _saved_form(model):
    """(name, tensor) -> [(name, tensor)] as save_pretrained writes them: transformers keeps
    some weights in another form in memory than in checkpoints (a mixture of experts' experts
    fused into one tensor a layer, written back one tensor per expert), and reverts it per
    tensor, so the file is what `from_pretrained` and other runtimes read."""
    from transformers.core_model_loading import revert_weight_conversion

    def saved(name: str, tensor) -> list[tuple[str, Any]]:
        return list(revert_weight_conversion(model, {name: tensor}).items())

    return saved


def _entries(metas, saved, dtype) -> list[Entry]:
    """Each tensor's entries in the file (names, shapes, dtypes), found by converting a
    stand-in on the meta device."""
    import torch

    out = []
    for k, shape, dt, _ in metas:
        stand_in = torch.empty(shape, dtype=_cast(dtype, dt), device="meta")
        out += [Entry(name, tuple(t.shape), t.dtype) for name, t in saved(k, stand_in)]
    return out


def _merge(model, parts: dict[str, Any], dtype):
    from peft.utils.other import transpose

    config = model.peft_config["default"]  # every layer's: no rank or alpha patterns here
    scaling = config.lora_alpha / (config.r**0.5 if config.use_rslora else config.r)
    weight = parts[".base_layer.weight"]
    a, b = parts[".lora_A."], parts[".lora_B."]
    delta = transpose(b @ a, config.fan_in_fan_out) * scaling
    merged = weight + delta.to(weight.dtype)
    magnitude = parts.get(MAGNITUDE)
    if magnitude is not None:  # DoRA: each output row rescaled to its learned magnitude
        merged = _dora(merged, magnitude, fan_in_fan_out=config.fan_in_fan_out)
    return merged.to(_cast(dtype, merged.dtype))


def _dora(merged, magnitude, *, fan_in_fan_out: bool):
    """peft's DoRA merge: (m / ||W + ΔW||) (W + ΔW), the norm per output feature (computed in
    fp32, as peft computes it)."""
    from peft.utils.other import transpose

    w = transpose(merged, fan_in_fan_out).float()
    norm = w.norm(p=2, dim=1, keepdim=True)
    scaled = (magnitude.float().view(-1, 1) / norm) * w
    return transpose(scaled, fan_in_fan_out).to(merged.dtype)


def _base_name(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def _first_float(metas, dtype):
    for _, _, dt, _ in metas:
        if dt.is_floating_point:
            return _cast(dtype, dt)
    return dtype


def _write_config(directory: Path, model, *, dtype) -> None:
    """config.json (and generation_config.json) as save_pretrained writes them."""
    config = copy.deepcopy(model.config)
    if dtype is not None:
        config.dtype = dtype
    if not getattr(config, "architectures", None):
        cls = next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))
        config.architectures = [cls.__name__]
    config.save_pretrained(str(directory))
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(str(directory))


def peft_name(name: str) -> str:
    """A LoRA parameter's name in the model (`...lora_A.default.weight`) as peft saves it in an
    adapter file (`...lora_A.weight`; DoRA's `...lora_magnitude_vector.default.weight` as
    `...lora_magnitude_vector`)."""
    head, sep, tail = name.partition(MAGNITUDE)
    if sep:
        return head + sep.rstrip(".")
    for part in (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B."):
        head, sep, tail = name.partition(part)
        if sep and "." in tail:
            return head + part + tail.split(".", 1)[1]
    return name
