"""Reading job files (YAML or JSON), applying `--set` overrides, validating against a schema.

This is the only module that sees YAML; everything below it takes validated, typed objects.
A job file is small, so anything that would make it large, deep or slow to read (a FIFO,
/dev/zero, an alias bomb, nesting thousands deep, integers of thousands of digits) is refused
with one `where: what` line, like any other bad input.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from tuneplex.errors import (
    SECRET_NAME,
    Problem,
    UsageError,
    first_line,
    format_validation_error,
    is_secret_key,
    one_line,
    show,
)
from tuneplex.files import open_regular

MAX_JOB_BYTES = 1 << 20
MAX_DEPTH = 64
"""Nesting levels a job may have (aliases followed); real jobs have about five."""
MAX_VALUES = 100_000
"""Values a job may hold once its aliases are expanded."""
MAX_INT_DIGITS = 100


class _JobLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (`5e-6` is a number), no silent duplicate keys, and
    bounds on depth, alias expansion and integer size."""

    _depth = 0

    def compose_node(self, parent, index):
        if self._depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, KeyError, OverflowError) as exc:  # `!!int x`, 2021-02-30
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            reason = f"not a valid {tag} value ({first_line(exc)})"
            raise ConstructorError(None, None, reason, node.start_mark) from None


# YAML 1.1 reads `5e-6` (no dot) as a string; learning rates are written that way.
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_JobLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_JobLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document that contains itself, or whose aliases expand it past MAX_VALUES
    values or MAX_DEPTH levels; counted per distinct node, so it takes linear time."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) once expanded
    entered: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            kids = [done[id(k)] for k in _children(node)]
            values = 1 + sum(v for v, _ in kids)
            depth = 1 + max((d for _, d in kids), default=0)
            if values > MAX_VALUES or depth > MAX_DEPTH:
                too = (
                    f"holds more than {MAX_VALUES} values"
                    if values > MAX_VALUES
                    else f"is nested deeper than {MAX_DEPTH} levels"
                )
                reason = f"this value {too} (aliases expanded)"
                raise ComposerError(None, None, reason, node.start_mark)
            done[id(node)] = (values, depth)
        elif id(node) in entered:
            if id(node) not in done:
                reason = "an alias refers to the value that contains it"
                raise ComposerError(None, None, reason, node.start_mark)
        else:
            entered.add(id(node))
            stack.append((node, True))
            stack.extend((k, False) for k in _children(node))


def _construct_int(loader: _JobLoader, node: yaml.ScalarNode) -> int:
    digits = sum(c.isalnum() for c in node.value)
    if digits > MAX_INT_DIGITS:
        reason = f"an integer of {digits} digits is too large (at most {MAX_INT_DIGITS})"
        raise ConstructorError(None, None, reason, node.start_mark)
    return loader.construct_yaml_int(node)


def _construct_mapping(loader: _JobLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *defaults`: the keys written here override the merged ones
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            reason = f"a key must be a string or a number, not a {_kind(key)}"
            raise ConstructorError(None, None, reason, key_node.start_mark)
        if key in seen:
            reason = f"duplicate key {show(key)} (first at line {seen[key] + 1})"
            raise ConstructorError(None, None, reason, key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_JobLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_JobLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _kind(value: Any) -> str:
    return {list: "list", dict: "mapping", set: "set"}.get(type(value), type(value).__name__)


# --- secrets in malformed YAML -------------------------------------------------------------
# A parse error quotes the token it stopped at: a tag, an alias, a character. When that token
# is part of a secret's value (`api_key: !s3cret`), the message says where, never what.
_SECRET_KEY = re.compile(rf"{SECRET_NAME}[\"']?[ \t]*:")
_LINE_BREAK = re.compile(r"\r\n|[\r\n\x85\u2028\u2029]")  # YAML's line breaks
_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")
_SECRET_REASON = "invalid YAML at a secret (its text is not shown); write it as key: 'value'"


def _secret_spans(text: str) -> list[tuple[int, int, int, str]]:
    """(first line, its column, end line, text) of each secret's value: what follows
    `name:` on its line, and the more indented lines below it."""
    lines = _LINE_BREAK.split(text)
    spans = []
    for i, line in enumerate(lines):
        found = _SECRET_KEY.search(line)
        if found is None:
            continue
        indent = len(line) - len(line.lstrip(" -"))
        end = i + 1
        while end < len(lines) and (
            not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip(" ")) > indent
        ):
            end += 1
        value = "\n".join([line[found.end() :], *lines[i + 1 : end]])
        spans.append((i, found.end(), end, value))
    return spans


def _touches_secret(text: str, exc: yaml.MarkedYAMLError, reason: str) -> bool:
    spans = _secret_spans(text)
    marks = [m for m in (exc.problem_mark, exc.context_mark) if m is not None]
    for first, column, end, value in spans:
        for mark in marks:
            if first < mark.line < end or (mark.line == first and mark.column >= column):
                return True
        for quoted in _QUOTED.finditer(reason):
            token = quoted.group(1) or quoted.group(2)
            if token and token in value:
                return True
    return False


def parse_yaml(text: str, *, source: str, secret: bool = False) -> Any:
    """Parse YAML text; errors become `source:line:col: reason`. `secret`: the whole text is a
    secret's value, which no message may quote."""
    try:
        return yaml.load(text, Loader=_JobLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        reason = exc.problem or exc.context or "invalid YAML"
        if secret or _touches_secret(text, exc, reason):
            reason = _SECRET_REASON
        raise UsageError(Problem(where, reason)) from None
    except yaml.reader.ReaderError as exc:
        before = _LINE_BREAK.split(text[: exc.position])
        where = f"{source}:{len(before)}:{len(before[-1]) + 1}"
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise UsageError(Problem(where, f"character #x{char:04x} is not allowed in YAML")) from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise UsageError(Problem(source, f"invalid YAML ({first_line(exc)})")) from None


# --- job files --------------------------------------------------------------------------------
class _LongInteger(ValueError):
    pass


def _json_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise _LongInteger(text)
    return int(text)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects as YAML mappings are read: a key given twice is refused, not overwritten."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _too_deep(data: Any) -> bool:
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(value, dict | list):
            items = value.values() if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items)
    return False


def parse_json(text: str, *, source: str) -> Any:
    """Parse a JSON job; errors become `source:line:col: reason`, as for YAML."""
    try:
        data = json.loads(text, parse_int=_json_int, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise UsageError(Problem(f"{source}:{exc.lineno}:{exc.colno}", exc.msg)) from None
    except _DuplicateKey as exc:
        raise UsageError(Problem(source, f"duplicate key {show(str(exc))}")) from None
    except _LongInteger as exc:
        digits = str(exc)
        before = text[: text.find(digits)].split("\n")
        where = f"{source}:{len(before)}:{len(before[-1]) + 1}"
        reason = f"an integer of {len(digits)} digits is too large (at most {MAX_INT_DIGITS})"
        raise UsageError(Problem(where, reason)) from None
    except RecursionError:
        raise UsageError(Problem(source, f"nested deeper than {MAX_DEPTH} levels")) from None
    if _too_deep(data):
        raise UsageError(Problem(source, f"nested deeper than {MAX_DEPTH} levels"))
    return data


def _read_job_text(path: Path) -> str:
    with open_regular(path, what="job file") as fh:
        raw = fh.read(MAX_JOB_BYTES + 1)
    if len(raw) > MAX_JOB_BYTES:
        reason = f"larger than {MAX_JOB_BYTES >> 20} MiB; a job file is a few kilobytes"
        raise UsageError(Problem(str(path), reason))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        where = f"{path}:{line}:{column}"
        reason = f"not UTF-8 text (byte 0x{raw[exc.start]:02x}: {exc.reason})"
        raise UsageError(Problem(where, reason)) from None


def load_job_file(path: str | Path) -> dict[str, Any]:
    """Read a job file (.json is JSON; anything else is YAML) into a plain mapping."""
    path = Path(path)
    text = _read_job_text(path)
    if path.suffix.lower() == ".json":
        data = parse_json(text, source=str(path))
    else:
        data = parse_yaml(text, source=str(path))
    if data is None:
        raise UsageError(Problem(str(path), "empty job file"))
    if not isinstance(data, dict):
        raise UsageError(
            Problem(str(path), f"a job is a mapping of sections, got a {type(data).__name__}")
        )
    return data


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a copy of `data`."""
    result = copy.deepcopy(dict(data))
    problems: list[Problem] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not p for p in parts):
            problems.append(Problem(f"--set {one_line(item)}", "expected key.path=value"))
            continue
        source = f"--set {one_line(key)}"
        if len(parts) > MAX_DEPTH:
            problems.append(Problem(source, f"nested deeper than {MAX_DEPTH} levels"))
            continue
        try:
            secret = is_secret_key(parts[-1])
            value = parse_yaml(raw, source=source, secret=secret) if raw.strip() else None
        except UsageError as exc:
            problems.extend(exc.problems)
            continue
        problem = _set(result, parts, value)
        if problem is not None:
            problems.append(Problem(source, problem))
    if problems:
        raise UsageError(problems)
    return result


def _set(data: dict[str, Any], parts: list[str], value: Any) -> str | None:
    """Put `value` at `parts` in `data`, creating sections; or say why it cannot go there. A
    part that is a number addresses an item of a list (`environment.rewards.0.function`, the
    paths validation names)."""
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            where = one_line(".".join(parts[:depth]))
            if not node:
                return f"'{where}' is an empty list: set it whole ({where}=[...])"
            if not part.isdecimal():
                return f"'{where}' is a list: address its items by number (0-{len(node) - 1})"
            if int(part) >= len(node):
                return f"'{where}' has {len(node)} items; there is no item {int(part)}"
            key: Any = int(part)
        else:
            key = part
        if last:
            node[key] = value
            return None
        child = node[key] if isinstance(node, list) else node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict | list):
            return f"'{one_line('.'.join(parts[: depth + 1]))}' is a value, not a section"
        node = child
    return None


# --- placeholders ----------------------------------------------------------------------------
# `tuneplex migrate` writes `<your model: ...>` where the job needs something its input lacks;
# any command that reads the job names each one still there, instead of passing it on.
_PLACEHOLDER = re.compile(r"<your [^<>\n]{1,200}>")


def placeholder(what: str) -> str:
    """The value a job holds where the user has yet to write `what`."""
    return f"<your {what}>"


def placeholder_problems(data: Any) -> list[Problem]:
    """One problem per placeholder left in a job's plain data, at its key path."""
    problems: list[Problem] = []
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str) and _PLACEHOLDER.fullmatch(value):
            what, _, hint = value[len("<your ") : -1].partition(": ")
            say = f"still a placeholder: write your {what} here" + (f" ({hint})" if hint else "")
            problems.append(Problem(where or "job", say))
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                stack.append((f"{where}.{key}" if where else str(key), item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return problems


def validate_job(schema: type, data: Mapping[str, Any]):
    """Validate plain data against a job schema; every problem at once, as a UsageError. A
    placeholder left in the job is its key's only problem."""
    from pydantic import ValidationError

    placeholders = placeholder_problems(data)
    try:
        parsed = schema.model_validate(data)
    except ValidationError as exc:
        left = {p.where for p in placeholders}
        problems = format_validation_error(exc, schema)
        raise UsageError([*placeholders, *(p for p in problems if p.where not in left)]) from None
    if placeholders:
        raise UsageError(placeholders)
    return parsed


def load_job(schema: type, path: str | Path, overrides: Iterable[str] = ()):
    """File + overrides + validation: the one way a job enters tuneplex."""
    return validate_job(schema, apply_overrides(load_job_file(path), overrides))
