"""The strict, frozen pydantic base every job section derives from, and how to look up a key
of a (live) schema by its dotted path."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Rejects unknown keys, never coerces types ("16" is not an int), and is immutable.

    Strict mode matches what the printed JSON Schema accepts, so a job that passes
    `jsonschema` passes here and the other way round.
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        validate_default=True,
        use_attribute_docstrings=False,
        populate_by_name=False,
    )


class JobSchema(StrictModel):
    """Root of a backend's job. `backend_name` ties the schema to its backend for messages."""

    backend_name: ClassVar[str] = ""
    resume_may_change: ClassVar[tuple[str, ...]] = ()
    """Top-level sections a `--resume` may change (a backend whose checkpoints load onto
    another parallel layout names its layout's); any other difference is refused."""

    def to_public_dict(self) -> dict[str, Any]:
        """The resolved job as plain JSON data, with secrets masked (for job.json and printing)."""
        return self.model_dump(mode="json")

    def to_private_dict(self) -> dict[str, Any]:
        """The resolved job as plain JSON data with secrets in clear: only for handing the job
        to worker processes (through a private temporary file), never for printing."""
        import json

        from pydantic import SecretBytes, SecretStr

        def reveal(x):
            if isinstance(x, SecretStr | SecretBytes):
                return x.get_secret_value()
            if isinstance(x, dict):
                return {k: reveal(v) for k, v in x.items()}
            if isinstance(x, list | tuple):
                return [reveal(v) for v in x]
            return x

        return json.loads(json.dumps(reveal(self.model_dump(mode="python")), default=str))


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (`X`, `X | None`, `list[X]`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = model_in(arg)
        if found is not None:
            return found
    return None


def schema_field(schema: type, path: str):
    """The pydantic field at dotted `path` of a (nested) model, or None."""
    current, found = schema, None
    for part in path.split("."):
        if current is None or part not in current.model_fields:
            return None
        found = current.model_fields[part]
        current = model_in(found.annotation)
    return found


def has_key(schema: type, path: str) -> bool:
    """Whether the job schema has the dotted key `path`."""
    return schema_field(schema, path) is not None


def key_default(schema: type, path: str) -> Any:
    found = schema_field(schema, path)
    if found is None or found.is_required():
        return None
    return found.default_factory() if found.default_factory else found.default


def choices(schema: type, path: str) -> tuple[Any, ...]:
    """The values a Literal key allows (empty when it is no Literal)."""
    found = schema_field(schema, path)
    stack, out = [found.annotation] if found else [], []
    while stack:
        annotation = stack.pop()
        if get_origin(annotation) is Literal:
            out += get_args(annotation)
        else:
            stack += get_args(annotation)
    return tuple(out)


def ordered(job: dict[str, Any], schema: type | None) -> dict[str, Any]:
    """`job` with its keys in the schema's order (as `tuneplex schema` prints them)."""
    if schema is None:
        return job
    names = list(schema.model_fields)
    keys = sorted(job, key=lambda k: names.index(k) if k in names else len(names))
    out = {}
    for k in keys:
        inner = model_in(schema.model_fields[k].annotation) if k in names else None
        out[k] = ordered(job[k], inner) if isinstance(job[k], dict) and inner else job[k]
    return out
