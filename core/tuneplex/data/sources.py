"""Reading dataset rows exactly as written: local .jsonl/.json/.parquet files, directories, hub ids.

Rows are read with the json module, not through a columnar loader, so rows of different shapes
(tool-call arguments above all) keep exactly their own keys: nothing is added or None-filled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneplex.errors import Problem, UsageError, first_line

SUPPORTED = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Source:
    """A resolved dataset reference: local files, or a hub dataset id."""

    ref: str
    files: tuple[Path, ...] = ()
    hub_id: str | None = None

    def fingerprint(self) -> str:
        """Content hash of the local files (or the hub id and its cached revision)."""
        h = hashlib.blake2b(digest_size=16)
        if self.hub_id is not None:
            h.update(f"hub:{self.hub_id}".encode())
            return h.hexdigest()
        for path in self.files:
            h.update(str(path.name).encode() + b"\0")
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or the older TRANSFORMERS_OFFLINE) is set: never contact the Hub."""
    return any(
        os.environ.get(var, "").lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve(ref: str, *, key: str) -> Source:
    """Local path -> its files; otherwise a hub id. `key` names the job field in errors."""
    path = Path(ref).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED:
            raise UsageError(
                Problem(key, f"{ref}: unsupported file type (use {', '.join(SUPPORTED)})")
            )
        return Source(ref, files=(path,))
    if path.is_dir():
        files = tuple(
            sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED)
        )
        if not files:
            raise UsageError(Problem(key, f"{ref}: directory has no {', '.join(SUPPORTED)} files"))
        return Source(ref, files=files)
    looks_local = ref.startswith((".", "/", "~")) or path.suffix.lower() in SUPPORTED
    if looks_local or ref.count("/") > 1:
        raise UsageError(Problem(key, f"{ref}: no such file or directory"))
    return Source(ref, hub_id=ref)


def read_rows(source: Source, *, key: str) -> list[tuple[str, dict[str, Any]]]:
    """All rows as (where, row) pairs; `where` is `file:line` (or file[index]) for messages."""
    if source.hub_id is not None:
        return _read_hub(source.hub_id, key=key)
    rows: list[tuple[str, dict[str, Any]]] = []
    for path in source.files:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows.extend(_read_jsonl(path))
        elif suffix == ".json":
            rows.extend(_read_json(path))
        else:
            rows.extend(_read_parquet(path))
    return rows


def _read_jsonl(path: Path):
    with path.open("r", encoding="utf-8", errors="strict") as fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UsageError(
                        Problem(f"{path}:{lineno}", f"invalid JSON: {exc.msg} (column {exc.colno})")
                    ) from None
                if not isinstance(row, dict):
                    raise UsageError(
                        Problem(f"{path}:{lineno}", f"expected a JSON object, got {_kind(row)}")
                    )
                yield f"{path}:{lineno}", row
        except UnicodeDecodeError as exc:
            raise UsageError(Problem(str(path), f"not UTF-8 text ({exc.reason})")) from None


def _read_json(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(Problem(f"{path}:{exc.lineno}", f"invalid JSON: {exc.msg}")) from None
    except UnicodeDecodeError as exc:
        raise UsageError(Problem(str(path), f"not UTF-8 text ({exc.reason})")) from None
    if not isinstance(data, list):
        raise UsageError(Problem(str(path), f"expected a JSON list of rows, got {_kind(data)}"))
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise UsageError(
                Problem(f"{path}[{index}]", f"expected a JSON object, got {_kind(row)}")
            )
        yield f"{path}[{index}]", row


def _read_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        raise UsageError(Problem(str(path), "reading parquet needs pyarrow")) from None
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise UsageError(Problem(str(path), f"unreadable parquet file: {exc}")) from None
    for index, row in enumerate(table.to_pylist()):
        yield f"{path}#row{index}", row


def _read_hub(hub_id: str, *, key: str):
    try:
        import datasets
    except ImportError:
        raise UsageError(
            Problem(key, f"{hub_id}: hub datasets need the datasets package")
        ) from None
    try:
        ds = datasets.load_dataset(hub_id, split="train")
    except Exception as exc:
        why = (
            "the Hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache"
            if (hub_offline())
            else f"{type(exc).__name__}: {first_line(exc)}"
        )
        raise UsageError(
            Problem(key, f"{hub_id}: not a local file or directory, and not loadable: {why}")
        ) from None
    return [(f"{hub_id}#row{i}", row) for i, row in enumerate(ds.to_list())]


def _kind(value: Any) -> str:
    return {
        list: "a list",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), type(value).__name__)
