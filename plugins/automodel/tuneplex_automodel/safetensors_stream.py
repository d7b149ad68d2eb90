"""safetensors files written one tensor at a time, in any order.

Every tensor's name, shape and dtype is known before any is written (DTensors carry their
global shape), so each file's header, and with it every tensor's byte range, is fixed up
front; a tensor is then written into its range as it arrives and freed. The writer never
holds more than the tensor it is given. Several files get transformers' names
(`model-00001-of-00003.safetensors`) and a `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_FILE_BYTES = 5 * 1024**3
"""A file is closed before it would exceed this (transformers' long-standing shard size)."""

_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: Any  # torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def _split(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    files: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if files[-1] and size + e.nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(e)
        size += e.nbytes
    return files


class SafetensorsWriter:
    """Files for `entries` under `directory` (`stem`.safetensors, or numbered files and an
    index); `put(name, tensor)` in any order, then `close()`."""

    def __init__(
        self,
        directory: Path,
        entries: list[Entry],
        *,
        stem: str = "model",
        max_bytes: int = DEFAULT_FILE_BYTES,
    ):
        self.directory = Path(directory)
        files = _split(entries, max_bytes)
        n = len(files)
        self.where: dict[str, tuple[Path, int, Entry]] = {}
        self.index: dict[str, str] = {}
        self.paths: list[Path] = []
        self.stem = stem
        for i, group in enumerate(files, 1):
            name = f"{stem}.safetensors" if n == 1 else f"{stem}-{i:05d}-of-{n:05d}.safetensors"
            path = self.directory / name
            self.paths.append(path)
            self._create(path, group)
            for e in group:
                self.index[e.name] = name
        self.total = sum(e.nbytes for e in entries)
        self.written: set[str] = set()

    def _create(self, path: Path, group: list[Entry]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for e in group:
            header[e.name] = {
                "dtype": _CODES[str(e.dtype).removeprefix("torch.")],
                "shape": list(e.shape),
                "data_offsets": [offset, offset + e.nbytes],
            }
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        start = 8 + len(raw)
        with path.open("wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            fh.truncate(start + offset)
        for e in group:
            begin = header[e.name]["data_offsets"][0]
            self.where[e.name] = (path, start + begin, e)

    def put(self, name: str, tensor) -> None:
        path, at, entry = self.where[name]
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise ValueError(
                f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                f"declared {entry.shape} {entry.dtype}"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(-1)
        raw = data.view(dtype=_byte_dtype()) if data.numel() else data
        with path.open("r+b") as fh:
            fh.seek(at)
            fh.write(memoryview(raw.numpy()).cast("B"))
        self.written.add(name)

    def close(self) -> list[Path]:
        """Check every tensor arrived, fsync, and write the index when there are several files."""
        missing = sorted(set(self.where) - self.written)
        if missing:
            raise RuntimeError(f"never written: {missing[:3]}")
        for path in self.paths:
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        if len(self.paths) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.index}
            out = self.directory / f"{self.stem}.safetensors.index.json"
            out.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return self.paths


def _byte_dtype():
    import torch

    return torch.uint8
