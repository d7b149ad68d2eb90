"""The local files a job reads (data, model, tokenizer, templates), and fingerprints of them.

A run records the fingerprint of every input file when it starts (`tuneplex.files.fingerprint`);
`--resume` compares them, so a run never continues silently on changed data or weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tuneplex.files import fingerprint

SKIPPED_SECTIONS = ("output", "integrations")
"""Where a job names things tuneplex writes or services it talks to, never inputs."""
INPUT_KEYS = frozenset(
    {"model", "teacher_model", "name", "training", "validation", "path", "validation_path"}
)
"""Keys whose value is a model or data reference even when it has no path separator."""
MAX_FILES = 4096
"""A directory input past this many files is fingerprinted by its first MAX_FILES only."""


def job_inputs(job: Mapping[str, Any]) -> dict[str, Path]:
    """{dotted key: local path} for every value of the job that names an existing file or
    directory (hub ids and plain words are not inputs)."""
    found: dict[str, Path] = {}
    for key, value in _strings(job, ""):
        if key.split(".", 1)[0] in SKIPPED_SECTIONS:
            continue
        leaf = key.rsplit(".", 1)[-1]
        if not (value.startswith((".", "~", "/")) or "/" in value or leaf in INPUT_KEYS):
            continue
        path = _existing(value)
        if path is not None:
            found[key] = path
    return found


def _strings(node: Any, prefix: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _strings(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{prefix}[{i}]")
    elif isinstance(node, str) and node and "\n" not in node and len(node) < 4096:
        yield prefix, node


def _existing(value: str) -> Path | None:
    try:
        path = Path(value).expanduser()
        return path if path.exists() else None
    except (OSError, ValueError, RuntimeError):  # too long, NUL byte, unknown user
        return None


def files_of(path: Path) -> list[Path]:
    """The regular files an input consists of (hidden entries such as .git skipped)."""
    if path.is_file():
        return [path]
    out = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).parts
        if any(part.startswith(".") for part in rel) or not p.is_file():
            continue
        out.append(p)
        if len(out) >= MAX_FILES:
            break
    return out


def fingerprints(inputs: Mapping[str, Path], *, skip_under: Path) -> dict[str, dict[str, str]]:
    """{key: {file: fingerprint}} for every input not inside `skip_under` (the run itself)."""
    root = skip_under.resolve()
    out: dict[str, dict[str, str]] = {}
    for key, path in inputs.items():
        real = path.resolve()
        if real == root or root in real.parents:
            continue
        out[key] = {str(f): fingerprint(f) for f in files_of(path)}
    return out


def changes(old: Mapping[str, Mapping[str, str]], new: Mapping[str, Mapping[str, str]]):
    """(key, file, what happened) for each input file that differs between two records."""
    for key in sorted(set(old) & set(new)):
        before, now = old[key], new[key]
        for name in sorted(set(before) | set(now)):
            if name not in now:
                yield key, name, "was removed since the run started"
            elif name not in before:
                yield key, name, "is new since the run started"
            elif before[name] != now[name]:
                yield key, name, "changed since the run started"
