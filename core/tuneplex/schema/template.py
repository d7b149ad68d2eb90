"""A commented YAML job template with every default, generated from the live schema."""

from __future__ import annotations

import textwrap
from typing import Any, Literal, get_origin

import yaml
from pydantic import BaseModel

from tuneplex.schema.base import model_in
from tuneplex.schema.common import OFF_WHEN_NULL

WIDTH = 96


def yaml_template(schema: type[BaseModel], *, backend: str) -> str:
    doc = (schema.__doc__ or schema.__name__).strip().splitlines()[0]
    lines = [
        f"# {schema.__name__} — {doc}",
        f"# Every key with its default (`tuneplex schema {backend} --format yaml`).",
        "# Keys marked REQUIRED must be filled in; everything else may be deleted.",
        "",
    ]
    _render(schema, lines, indent=0, prefix="")
    return "\n".join(lines) + "\n"


def _comment(text: str, indent: int, prefix: str) -> list[str]:
    pad = " " * indent
    return [
        f"{prefix}{pad}# {line}"
        for line in textwrap.wrap(text, WIDTH - indent - 2 - len(prefix)) or [""]
    ]


def _scalar(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _render(model: type[BaseModel], lines: list[str], *, indent: int, prefix: str) -> None:
    pad = " " * indent
    for name, field in model.model_fields.items():
        if lines and lines[-1].strip() not in ("", "#") and indent == 0:
            lines.append(prefix.rstrip())
        sub = model_in(field.annotation)
        required = field.is_required()
        desc = field.description or ""
        if required:
            desc = f"REQUIRED. {desc}"
        lines.extend(_comment(desc, indent, prefix))
        if sub is None:
            value = None if required else field.get_default(call_default_factory=True)
            choices = getattr(field.annotation, "__args__", ())
            if required and get_origin(field.annotation) is Literal and len(choices) == 1:
                value = choices[0]  # the one value a union member's tag can take
            lines.append(f"{prefix}{pad}{name}: {_scalar(value)}")
            continue
        default = None if required else field.get_default(call_default_factory=True)
        if default is None and not required:
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            off_when_null = bool(extra.get(OFF_WHEN_NULL))
            if not off_when_null and all(not f.is_required() for f in sub.model_fields.values()):
                # auto-filled section (e.g. lora): show what it is filled with
                lines.append(f"{prefix}{pad}{name}:")
                _render(sub, lines, indent=indent + 2, prefix=prefix)
            else:
                # off by default: show it commented out, ready to enable
                lines.append(f"{prefix}{pad}{name}: null")
                block = [f"{pad}{name}:"]
                _render(sub, block, indent=indent + 2, prefix="")
                lines.extend(f"{prefix}{pad}# {line[indent:]}" for line in block)
            continue
        lines.append(f"{prefix}{pad}{name}:")
        _render(sub, lines, indent=indent + 2, prefix=prefix)
