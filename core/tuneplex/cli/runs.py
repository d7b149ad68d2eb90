"""`tuneplex runs`: list run directories, show one, and draw their curves.

Registered by the app as `app.add_typer(runs_app, name="runs")`. Everything below reads run
directories and never writes to them, except `plot` (a picture, where it is asked to go).
A path that is not a run, or a record that cannot be read, is one `where: what` line on
stderr and exit code 2. matplotlib and rich are imported only by the commands using them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from tuneplex.cli.common import reported

runs_app = typer.Typer(
    help="Look at training runs: list them, show one, draw their curves.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (NaN and inf as null).")]
RunArg = Annotated[Path, typer.Argument(help="A run directory (made by `tuneplex train`).")]
MISSING = "-"


# -- list ----------------------------------------------------------------------------------


@runs_app.command("list")
@reported
def list_cmd(
    root: Annotated[
        Path, typer.Argument(metavar="DIR", help="Where to look for runs, recursively.")
    ] = Path("runs"),
    as_json: JsonOpt = False,
) -> None:
    """One row per run under DIR: backend, status, steps, validation loss, speed, time.

    A run without summary.json is `running` while a `train` holds its lock, else
    `incomplete` (stopped by a crash or a kill); its numbers then come from metrics.jsonl.
    A run whose records cannot be read is listed as `unreadable`, with the reason on stderr.
    """
    from tuneplex.errors import Problem, UsageError
    from tuneplex.runs.listing import find_runs, overview, read_run

    if not root.exists():
        raise UsageError(Problem(str(root), "no such directory"))
    if not root.is_dir():
        raise UsageError(Problem(str(root), "not a directory"))
    rows = []
    for path in find_runs(root):
        name = str(path.relative_to(root)) if path != root else path.resolve().name
        try:
            rows.append(overview(read_run(path, name=name, metrics=False)))
        except UsageError as exc:
            for line in exc.lines():
                typer.echo(line, err=True)
            problem = exc.lines()[0]
            rows.append(
                {"name": name, "path": str(path), "status": "unreadable", "problem": problem}
            )
    if as_json:
        typer.echo(_json(rows))
        return
    if not rows:
        typer.echo(f"no runs under {root}")
        return
    _table(rows)


def _table(rows: list[dict[str, Any]]) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False)
    for title, justify in COLUMNS:
        table.add_column(title, justify=justify, no_wrap=True)
    for row in rows:
        cells = [
            row["name"],
            row.get("backend") or MISSING,
            Text(row["status"], style=STATUS_STYLE.get(row["status"], "")),
            _steps(row.get("steps"), row.get("total_steps")),
            _loss(row.get("best_val_loss")),
            _loss(row.get("val_loss")),
            _count(row.get("tokens_per_s")),
            _duration(row.get("elapsed_s")),
            _started(row.get("started")),
        ]
        table.add_row(*(c if isinstance(c, Text) else Text(str(c)) for c in cells))
    tty = sys.stdout.isatty()
    Console(highlight=False, width=None if tty else 1000).print(table)


COLUMNS = (
    ("run", "left"),
    ("backend", "left"),
    ("status", "left"),
    ("steps", "right"),
    ("best val", "right"),
    ("last val", "right"),
    ("tok/s", "right"),
    ("elapsed", "right"),
    ("started (UTC)", "left"),
)
STATUS_STYLE = {
    "completed": "green",
    "running": "cyan",
    "interrupted": "yellow",
    "diverged": "red",
    "unreadable": "red",
    "incomplete": "dim",
}


# -- show ----------------------------------------------------------------------------------


@runs_app.command("show")
@reported
def show_cmd(run: RunArg, as_json: JsonOpt = False) -> None:
    """A run's outcome, the job's key settings, its data, and how to load what it made:
    final/ (a LoRA adapter or a whole model), the checkpoint with the best validation loss
    if one is kept, and its curves.png.

    The settings are the run's backend's description of its job.json; where that backend is
    not installed, or the saved job is no longer valid for it, one line says so instead
    (in JSON: `settings` null and `settings_unavailable` the reason)."""
    from tuneplex.runs.listing import read_run

    info = read_run(run)
    report = _report(info)
    if as_json:
        typer.echo(_json(report))
        return
    for line in _show_lines(report):
        typer.echo(line)


def _report(info) -> dict[str, Any]:
    from tuneplex.runs.checkpoints import latest_checkpoint
    from tuneplex.runs.listing import (
        CURVES_FILE,
        best_checkpoint,
        final_weights,
        job_settings,
        latest_eval,
        overview,
    )

    latest = latest_checkpoint(info.path)
    curves = info.path / CURVES_FILE
    settings, unavailable = job_settings(info)
    described = {"settings": settings.as_dict() if settings else None}
    if unavailable:
        described["settings_unavailable"] = unavailable
    return {
        **overview(info),
        "path": str(info.path.resolve()),
        **described,
        "data": info.summary.get("data"),
        "final": final_weights(info.path),
        "best_checkpoint": best_checkpoint(info),
        "last_checkpoint": info.summary.get("last_checkpoint")
        or (str(latest[1]) if latest else None),
        "curves": str(curves.resolve()) if curves.is_file() else None,
        "eval": latest_eval(info.path),
        "summary": info.summary,
    }


def _show_lines(r: dict[str, Any]) -> list[str]:
    s = r["summary"]
    steps = _steps(r["steps"], r["total_steps"])
    outcome = [r["status"], r["backend"], f"{steps} steps"]
    if isinstance(s.get("epochs"), int | float):
        outcome.append(f"{s['epochs']:g} epochs")
    if s.get("failed_step") is not None:
        outcome.append(f"failed at step {s['failed_step']}")
    lines = [
        f"run        {r['path']}",
        f"status     {', '.join(str(x) for x in outcome if x)}",
        f"started    {_started(r['started'])} UTC, ran {_duration(r['elapsed_s'])}",
        f"loss       train {_loss(r['train_loss'])}, validation {_loss(r['val_loss'])}, "
        f"best validation {_loss(r['best_val_loss'])}",
    ]
    speed = [f"{_count(r['tokens_per_s'])} tokens/s"]
    if isinstance(s.get("tokens"), int):
        speed.insert(0, f"{s['tokens']:,} tokens")
    if s.get("peak_memory_gib") is not None:
        speed.append(f"peak memory {s['peak_memory_gib']} GiB ({s.get('peak_memory_kind')})")
    lines.append(f"speed      {', '.join(speed)}")
    if s.get("device"):
        lines.append(f"device     {s['device']}")
    if r["settings"] is None:
        lines.append(f"job        settings not shown: {r['settings_unavailable']}")
    else:
        lines += ["job", *_settings_lines(r["settings"], s)]
    data = r["data"]
    if isinstance(data, dict) and data:
        lines.append("data")
        lines += [f"  {split:<12} {_data_line(stats)}" for split, stats in data.items()]
    lines += _outputs_lines(r)
    return lines


def _settings_lines(st: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    tuning = st["finetuning_type"] or MISSING
    if st["lora_rank"] is not None:
        alpha = st["lora_alpha"]
        tuning += f" (rank {st['lora_rank']}" + (
            f", alpha {alpha:g})" if alpha is not None else ")"
        )
    params = summary.get("trainable_parameters"), summary.get("total_parameters")
    if all(isinstance(p, int) for p in params):
        tuning += f", {params[0]:,} of {params[1]:,} parameters trained"
    schedule = []
    if st["epochs"] is not None:
        schedule.append(f"{st['epochs']} epochs")
    if st["max_steps"] is not None:
        schedule.append(f"at most {st['max_steps']} steps")
    if st["seed"] is not None:
        schedule.append(f"seed {st['seed']}")
    batch = ", ".join(f"{k} {json.dumps(v)}" for k, v in (st["batch"] or {}).items())
    data = f"{st['train_data'] or MISSING}" + (
        f", validation {st['validation_data']}" if st["validation_data"] else ", no validation"
    )
    rows = [
        ("model", f"{st['model'] or MISSING}" + _model_class(summary)),
        ("data", data),
        ("training", f"{st['training_type'] or 'sft'}, {tuning}"),
        ("max length", st["max_seq_length"]),
        ("lr", st["learning_rate"]),
        ("batch", batch or None),
        ("schedule", ", ".join(schedule) or None),
    ]
    return [f"  {k:<12} {v}" for k, v in rows if v is not None]


def _model_class(summary: dict[str, Any]) -> str:
    return f" ({summary['model_class']})" if summary.get("model_class") else ""


def _data_line(stats: Any) -> str:
    if not isinstance(stats, dict):
        return str(stats)
    parts = []
    for key, label, always in (
        ("rows", "rows", True),
        ("examples", "examples", True),
        ("tokens", "tokens", True),
        ("trained_tokens", "trained tokens", True),
        ("truncated", "truncated", True),
        ("dropped_no_trained_tokens", "dropped (no trained token)", False),
        ("skipped_invalid_rows", "skipped (invalid)", False),
        ("packed_rows", "packed rows", False),
    ):
        if isinstance(stats.get(key), int) and (always or stats[key]):
            parts.append(f"{stats[key]:,} {label}")
    if isinstance(stats.get("packing_efficiency"), float):
        parts.append(f"packing efficiency {stats['packing_efficiency']:.1%}")
    for kind, seen in sorted((stats.get("template_drops") or {}).items()):
        rows = seen.get("rows") if isinstance(seen, dict) else seen
        parts.append(f"template drops {kind} in {rows} rows")
    if stats.get("first_skipped"):
        parts.append(f"first skipped: {stats['first_skipped']}")
    return ", ".join(parts)


def _outputs_lines(r: dict[str, Any]) -> list[str]:
    final = r["final"]
    if final is None:
        lines = ["final      none (the run did not complete)"]
    else:
        lines = [f"final      {final['path']}  ({final['what']})"]
        if final["load"]:
            lines.append(f"  load     {final['load']}")
    best = r["best_checkpoint"]
    if best is not None:
        where = best["path"] or "not kept (no complete checkpoint at that step)"
        lines.append(
            f"best       validation {best['val_loss']:.4f} at step {best['step']}: {where}"
        )
    if r["last_checkpoint"]:
        lines.append(f"checkpoint {r['last_checkpoint']} (latest)")
    lines.append(f"curves     {r['curves'] or 'none (draw them: tuneplex runs plot RUN)'}")
    lines += _eval_lines(r.get("eval"))
    return lines


def _eval_lines(report: dict[str, Any] | None) -> list[str]:
    """The latest `tuneplex eval` report: what was measured on what, tuned (and base)."""
    if not report:
        return []
    model = report.get("model") or {}
    base = report.get("baseline")
    on = report.get("data") or "lm-eval"
    lines = [f"eval       {report.get('checkpoint', 'final')} on {on} ({report.get('created')})"]
    for name, value in model.items():
        if name == "n" or not isinstance(value, int | float):
            continue
        was = base.get(name) if isinstance(base, dict) else None
        than = f" (base {was:.4f})" if isinstance(was, int | float) else ""
        lines.append(f"  {name:<12} {value:.4f}{than}")
    lines.append(f"  report   {report.get('path')}")
    return lines


# -- plot ----------------------------------------------------------------------------------


@runs_app.command("plot")
@reported
def plot_cmd(
    runs: Annotated[list[Path], typer.Argument(metavar="RUN", help="One or more run directories.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Picture to write, .png or .svg (default: RUN/curves.png for one run, "
            "./curves.png for several).",
        ),
    ] = None,
) -> None:
    """Draw loss (train and validation), learning rate, gradient norm and throughput against
    the optimizer step; several runs are overlaid, one color each. Prints the picture's path.

    One run without -o redraws RUN/curves.png (the picture `train` draws when a run ends: run
    this to see a run still going); several runs go to curves.png in the current directory.
    """
    from tuneplex.runs.listing import CURVES_FILE, check_run_dir
    from tuneplex.runs.plots import plot_runs

    for run in runs:
        check_run_dir(run)
    if output is None:
        output = runs[0] / CURVES_FILE if len(runs) == 1 else Path(CURVES_FILE)
    typer.echo(str(plot_runs(runs, output)))


# -- formatting ----------------------------------------------------------------------------


def _json(data: Any) -> str:
    return json.dumps(_strict(data), indent=2)


def _strict(value: Any) -> Any:
    """JSON's own numbers only: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _steps(done: Any, total: Any) -> str:
    done = done if isinstance(done, int) else MISSING
    return f"{done}/{total}" if isinstance(total, int) else f"{done}/?"


def _loss(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # a diverged run's nan says more than nothing
    return f"{value:.4f}" if isinstance(value, int | float) else MISSING


def _count(value: Any) -> str:
    return f"{value:,.0f}" if isinstance(value, int | float) else MISSING


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _started(created: Any) -> str:
    """The marker's `2026-01-31T09:05:00Z` as `2026-01-31 09:05`."""
    if not isinstance(created, str) or len(created) < 16:
        return MISSING
    return created[:16].replace("T", " ")
