"""`tuneplex backends`, `schema` and `validate`: the fast path, which imports no torch,
transformers or training library."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated

import typer

from tuneplex.cli.common import BackendOpt, JobArg, SetOpt, load_job_for, reported


@reported
def backends_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the installed backends, their versions and whether this machine can run them."""
    from tuneplex.plugins import NO_BACKENDS, registry

    reg = registry()
    rows = []
    for name in sorted(reg.backends):
        item = reg.backends[name]
        status = item.backend.check_environment()
        rows.append(
            {
                "name": name,
                "distribution": item.distribution,
                "version": item.version,
                "description": item.backend.description,
                "ready": status.ready,
                "environment": status.detail,
            }
        )
    if as_json:
        typer.echo(json.dumps({"backends": rows, "plugin_failures": reg.failures}, indent=2))
        return
    if not rows:
        typer.echo(NO_BACKENDS)
        return
    for row in rows:
        typer.echo(f"{row['name']}  ({row['distribution']} {row['version']})")
        typer.echo(f"  {row['description']}")
        typer.echo(f"  {'ready' if row['ready'] else 'not ready'}: {row['environment']}")


class SchemaFormat(str, Enum):
    json = "json"
    yaml = "yaml"
    markdown = "markdown"


@reported
def schema_cmd(
    backend: Annotated[str, typer.Argument(help="Backend whose job schema to print.")],
    fmt: Annotated[
        SchemaFormat,
        typer.Option(
            "--format",
            "-f",
            help="json: JSON Schema; yaml: a commented job template; markdown: a reference table.",
        ),
    ] = SchemaFormat.json,
) -> None:
    """Print a backend's live job schema (JSON Schema) or a YAML job template with every default."""
    from tuneplex.plugins import registry

    schema = registry().get(backend, where="schema BACKEND").backend.job_schema
    if fmt is SchemaFormat.json:
        typer.echo(json.dumps(schema.model_json_schema(), indent=2))
    elif fmt is SchemaFormat.yaml:
        from tuneplex.schema.template import yaml_template

        typer.echo(yaml_template(schema, backend=backend), nl=False)
    else:
        from tuneplex.schema.docs import markdown_reference

        typer.echo(markdown_reference(schema, backend=backend), nl=False)


@reported
def validate_cmd(
    job: JobArg,
    backend: BackendOpt = None,
    sets: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check a job without running it; print the resolved job and the values derived from it."""
    from tuneplex.cli.plan import validate_line, validate_memory

    installed, parsed = load_job_for(job, backend, sets, trackers=True)
    backend = installed.backend.name
    resolved = parsed.to_public_dict()
    derived = dict(installed.backend.derived(parsed))
    memory = validate_memory(backend=installed.backend, parsed=parsed, job=job, sets=sets or ())
    if as_json:
        memory.pop("line", None)
        out = {"backend": backend, "job": resolved, "derived": derived, "memory": memory}
        typer.echo(json.dumps(out, indent=2))
        return
    import yaml

    typer.echo(f"# {job}: valid {backend} job")
    typer.echo(yaml.safe_dump(resolved, sort_keys=False, default_flow_style=None).rstrip())
    typer.echo("# derived")
    typer.echo(yaml.safe_dump({"derived": derived}, sort_keys=False).rstrip())
    typer.echo(validate_line(memory))
