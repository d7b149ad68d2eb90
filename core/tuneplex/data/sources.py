"""Reading dataset rows exactly as written: local .jsonl/.json/.parquet files, directories, hub ids.

Rows are read with the json module, not through a columnar loader, so rows of different shapes
(tool-call arguments above all) keep exactly their own keys: nothing is added or None-filled.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneplex.errors import Problem, UsageError, first_line
from tuneplex.files import file_kind, fingerprint, open_regular

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
            h.update(str(path.name).encode() + b"\0" + fingerprint(path, what="data file").encode())
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
    mode = _mode(path)
    if mode is not None and stat.S_ISREG(mode):
        if path.suffix.lower() not in SUPPORTED:
            raise UsageError(
                Problem(key, f"{ref}: unsupported file type (use {', '.join(SUPPORTED)})")
            )
        return Source(ref, files=(path,))
    if mode is not None and stat.S_ISDIR(mode):
        files = _files_in(path, key=key)
        if not files:
            raise UsageError(Problem(key, f"{ref}: directory has no {', '.join(SUPPORTED)} files"))
        return Source(ref, files=files)
    if mode is not None:  # a FIFO would block, /dev/zero never ends
        raise UsageError(Problem(key, f"{ref}: not a regular file ({file_kind(mode)})"))
    looks_local = ref.startswith((".", "/", "~")) or path.suffix.lower() in SUPPORTED
    if looks_local or ref.count("/") > 1:
        raise UsageError(Problem(key, f"{ref}: no such file or directory"))
    return Source(ref, hub_id=ref)


def _mode(path: Path) -> int | None:
    try:
        return path.stat().st_mode
    except (OSError, ValueError):
        return None


def _files_in(directory: Path, *, key: str) -> tuple[Path, ...]:
    """The directory's data files, at any depth; one that is not a regular file is refused
    rather than skipped, so no data goes missing unnoticed."""
    files = []
    for path in sorted(directory.rglob("*")):
        if path.suffix.lower() not in SUPPORTED:
            continue
        mode = _mode(path)
        if mode is not None and stat.S_ISDIR(mode):
            continue
        if mode is None or not stat.S_ISREG(mode):
            kind = file_kind(mode) if mode is not None else "unreadable or a broken link"
            raise UsageError(Problem(key, f"{path}: not a regular file ({kind})"))
        files.append(path)
    return tuple(files)


def read_rows(source: Source, *, key: str) -> list[tuple[str, dict[str, Any] | Problem]]:
    """All rows as (where, row) pairs; `where` is `file:line` (or file[index]) for messages. A
    line that is no row (bad JSON, not UTF-8, not an object) comes as its Problem, so that every
    bad line is reported at once (or skipped, under dataset.skip_invalid_rows)."""
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
    # bytes, decoded line by line, so that a bad byte is named with its line
    with open_regular(path, what="data file") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, Problem(where, _not_utf8(exc, exc.start + 1))
                continue
            if not line.strip():
                continue
            try:
                row = _loads(line, where=where, whole_file=False)
            except UsageError as exc:
                yield where, exc.problems[0]
                continue
            if not isinstance(row, dict):
                row = Problem(where, f"expected a JSON object, got {_kind(row)}")
            yield where, row


def _read_json(path: Path):
    with open_regular(path, what="data file") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        raise UsageError(Problem(f"{path}:{line}", _not_utf8(exc, column))) from None
    data = _loads(text, where=str(path), whole_file=True)
    if not isinstance(data, list):
        raise UsageError(Problem(str(path), f"expected a JSON list of rows, got {_kind(data)}"))
    for index, row in enumerate(data):
        where = f"{path}[{index}]"
        if not isinstance(row, dict):
            row = Problem(where, f"expected a JSON object, got {_kind(row)}")
        yield where, row


def _not_utf8(exc: UnicodeDecodeError, column: int) -> str:
    byte = exc.object[exc.start]
    return f"not UTF-8 text (byte 0x{byte:02x} at column {column}: {exc.reason})"


def _loads(text: str, *, where: str, whole_file: bool) -> Any:
    """json.loads; malformed JSON, nesting or numbers too large to read are one line naming
    `where` (for a whole file, with the line the error is on)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if whole_file:
            where, reason = f"{where}:{exc.lineno}", f"invalid JSON: {exc.msg}"
        else:
            reason = f"invalid JSON: {exc.msg} (column {exc.colno})"
        raise UsageError(Problem(where, reason)) from None
    except RecursionError:
        raise UsageError(Problem(where, "nested too deeply to read")) from None
    except ValueError:  # int() refuses more digits than sys.get_int_max_str_digits()
        digits = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
        raise UsageError(Problem(where, f"a number has more than {digits} digits")) from None


def _read_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        raise UsageError(Problem(str(path), "reading parquet needs pyarrow")) from None
    try:
        table = pq.read_table(path)
    except Exception as exc:
        reason = f"unreadable parquet file: {first_line(exc)}"
        raise UsageError(Problem(str(path), reason)) from None
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
