"""Reading job files (YAML or JSON), applying `--set` overrides, validating against a schema.

This is the only module that sees YAML; everything below it takes validated, typed objects.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from tuneplex.errors import Problem, UsageError, format_validation_error


class _JobLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (`5e-6` is a number) and no silent duplicate keys."""


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


def _construct_mapping(loader: _JobLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key '{key}' (first at line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_JobLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, *, source: str) -> Any:
    """Parse YAML text; syntax errors become `source:line:col: reason`."""
    try:
        return yaml.load(text, Loader=_JobLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        reason = exc.problem or exc.context or "invalid YAML"
        raise UsageError(Problem(where, reason)) from None
    except yaml.YAMLError as exc:
        raise UsageError(Problem(source, f"invalid YAML: {exc}")) from None


def load_job_file(path: str | Path) -> dict[str, Any]:
    """Read a job file (.json is JSON; anything else is YAML) into a plain mapping."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(Problem(str(path), "no such file")) from None
    except IsADirectoryError:
        raise UsageError(Problem(str(path), "is a directory, not a job file")) from None
    except UnicodeDecodeError as exc:
        raise UsageError(Problem(str(path), f"not UTF-8 text ({exc.reason})")) from None
    except OSError as exc:
        raise UsageError(Problem(str(path), exc.strerror or str(exc))) from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(Problem(f"{path}:{exc.lineno}:{exc.colno}", exc.msg)) from None
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
            problems.append(Problem(f"--set {item}", "expected key.path=value"))
            continue
        try:
            value = parse_yaml(raw, source=f"--set {key}") if raw.strip() else None
        except UsageError as exc:
            problems.extend(exc.problems)
            continue
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                problems.append(Problem(f"--set {key}", f"'{where}' is a value, not a section"))
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise UsageError(problems)
    return result


def validate_job(schema: type, data: Mapping[str, Any]):
    """Validate plain data against a job schema; every problem at once, as a UsageError."""
    from pydantic import ValidationError

    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc, schema)) from None


def load_job(schema: type, path: str | Path, overrides: Iterable[str] = ()):
    """File + overrides + validation: the one way a job enters tuneplex."""
    return validate_job(schema, apply_overrides(load_job_file(path), overrides))
