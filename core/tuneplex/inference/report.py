"""What `tuneplex eval` measures, prints and keeps: a model (and with --baseline its base model)
on a data file, and optionally the evaluation harness; a run keeps each report in evals/."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneplex.errors import Problem, UsageError
from tuneplex.inference.loading import Loaded
from tuneplex.inference.target import Target


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    data: Path | None
    metrics: tuple[str, ...]
    max_new_tokens: int = 256
    batch_size: int = 8
    harness_tasks: Any | None = None
    """`harness.HarnessTasks` for --lm-eval."""
    harness_limit: int | None = None
    dtype: str | None = None
    """`--dtype`, for the baseline as for the model."""


@dataclass
class Side:
    """One model's results: figures on the data file, its answers, the harness's."""

    label: str
    figures: dict[str, Any] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)
    harness: Any | None = None


@dataclass
class EvalResult:
    model: Side
    baseline: Side | None
    rows: list[tuple[str, str | None]]
    """(prompt, reference) of the rows answered."""

    def as_json(self) -> dict[str, Any]:
        """`{"model": {...}, "baseline": {...}}`: each model's figures (baseline only when
        asked for)."""
        out = {"model": self.model.figures}
        if self.baseline is not None:
            out["baseline"] = self.baseline.figures
        return out

    def lines(self, *, samples: int = 0) -> list[str]:
        from tuneplex.inference.scoring import side_by_side

        out: list[str] = []
        if self.baseline is not None:
            out.append(f"base:  {self.baseline.label}")
        out.append(f"tuned: {self.model.label}")
        if self.model.figures:
            base = self.baseline.figures if self.baseline is not None else None
            out += side_by_side(self.model.figures, base)
        for k, (prompt, reference) in enumerate(self.rows[:samples]):
            out += ["", f"[{k + 1}] prompt:    {prompt}", f"    reference: {reference}"]
            if self.baseline is not None:
                out.append(f"    base:      {self.baseline.answers[k]}")
            out.append(f"    tuned:     {self.model.answers[k]}")
        for side in (self.baseline, self.model):
            if side is not None and side.harness is not None:
                out += ["", f"lm-eval ({side.label}):", side.harness.table.rstrip()]
        return out


def metric_names(given: list[str] | None, *, generate: bool) -> tuple[str, ...]:
    """The metrics asked for (comma-separated or repeated), checked; the defaults when none."""
    from tuneplex.inference.metrics import check_metrics

    if not generate:
        if given:
            raise UsageError(Problem("--metrics", "scores answers, which --no-generate skips"))
        return ()
    return check_metrics(given or [])


def harness_tasks(given: str | None):
    """The `--lm-eval` tasks, found and their data loaded before any model loads (a typo or
    missing data is one line); None without the option."""
    if given is None:
        return None
    from tuneplex.inference.harness import check_tasks

    return check_tasks(tasks=[given])


def evaluate_target(loaded: Loaded, opts: EvalOptions, *, baseline: bool) -> EvalResult:
    """The target, then (with `baseline`) its base model, loaded once the target is done."""
    base_target = loaded.target.baseline() if baseline else None  # refused before any work
    data = None
    if opts.data is not None:  # read once, for the model and its base
        from tuneplex.inference.prompts import read_file_rows
        from tuneplex.inference.scoring import DATA_KEY

        data = read_file_rows(opts.data, key=DATA_KEY)
    model, rows = _side(loaded, opts, data)
    base = None
    if base_target is not None:
        from tuneplex.inference.loading import load

        device, tokenizer = str(loaded.device), loaded.tokenizer
        del loaded  # the tuned weights go before the base's come
        base_loaded = load(base_target, device=device, dtype=opts.dtype, tokenizer=tokenizer)
        base, _ = _side(base_loaded, opts, data)
    return EvalResult(model=model, baseline=base, rows=rows)


def _side(
    loaded: Loaded, opts: EvalOptions, data: list | None
) -> tuple[Side, list[tuple[str, str | None]]]:
    from tuneplex.inference.engine import Sampling
    from tuneplex.inference.scoring import score

    side = Side(label=loaded.target.label)
    rows: list[tuple[str, str | None]] = []
    if opts.data is not None:
        scores = score(
            loaded,
            opts.data,
            data,
            metrics=opts.metrics,
            sampling=Sampling(max_new_tokens=opts.max_new_tokens),
            batch_size=opts.batch_size,
        )
        side.figures = scores.figures
        side.answers = [c.text for c in scores.completions]
        rows = [(p.text, p.reference) for p in scores.prompts]
    if opts.harness_tasks is not None:
        from tuneplex.inference.harness import run_harness

        side.harness = run_harness(
            model=loaded.model,
            tokenizer=loaded.tokenizer,
            tasks=opts.harness_tasks,
            batch_size=opts.batch_size,
            limit=opts.harness_limit,
            device=str(loaded.device),
        )
    return side, rows


def save(target: Target, result: EvalResult, opts: EvalOptions) -> Path:
    """The report as `evals/<UTC time>.json` in the run (tuneplex's own entry of the run)."""
    from tuneplex.runs.records import new_eval_path, write_json_atomic

    assert target.run is not None
    path = new_eval_path(target.run)
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": target.label,
        "checkpoint": target.checkpoint or "final",
        "data": str(opts.data) if opts.data is not None else None,
        "metrics": list(opts.metrics),
        **result.as_json(),
    }
    for name, side in (("model", result.model), ("baseline", result.baseline)):
        if side is not None and side.harness is not None:
            report.setdefault("lm_eval", {})[name] = side.harness.results
    write_json_atomic(path, report)
    return path
