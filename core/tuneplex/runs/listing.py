"""Reading run directories back: finding them, and what each one says about itself.

Readers never write: a run is told from any other folder by its marker (`is_run`), a run
being trained by its lock (tested with a shared lock taken and dropped at once), and a run
without summary.json (running, or ended by a crash or SIGKILL) is described from its
metrics.jsonl. A damaged record is one `file:line: what` problem, never a traceback.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneplex.backend import Backend, JobSettings
from tuneplex.errors import Problem, UsageError, first_line
from tuneplex.runs.checkpoints import complete_checkpoints
from tuneplex.runs.directory import JOB_FILE, LOCK, MARKER, WORKER_LOCK, is_run
from tuneplex.runs.records import EVALS_DIR, FINAL_DIR, METRICS_FILE, SUMMARY_FILE, eval_order

CURVES_FILE = "curves.png"
"""The picture every run draws of itself when it ends (see `plots.plot_run`)."""


@dataclass(frozen=True)
class RunInfo:
    """One run as read from its directory; `summary` and `job` are {} when missing."""

    path: Path
    name: str
    status: str
    """completed, interrupted, diverged (summary.json); running (locked); else incomplete."""
    summary: dict[str, Any]
    job: dict[str, Any]
    marker: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def train_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("split") == "train"]

    @property
    def val_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("split") == "val"]


def find_runs(root: Path) -> list[Path]:
    """Every run directory under `root` (itself included), by path; a run's own folders
    (checkpoints, final, trackers) are not searched, nor are symlinked folders followed."""
    root = Path(root)
    if is_run(root):
        return [root]
    found = []
    for here, dirs, _ in os.walk(root, onerror=None):
        path = Path(here)
        if path != root and is_run(path):
            found.append(path)
            dirs.clear()
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


def check_run_dir(path: Path) -> Path:
    """`path` if it is a run directory, else the one-line refusal."""
    path = Path(path)
    if not path.exists():
        raise UsageError(Problem(str(path), "no such file or directory"))
    if not is_run(path):
        raise UsageError(Problem(str(path), f"not a run directory (no {MARKER})"))
    return path


def read_run(path: Path, *, name: str | None = None, metrics: bool = True) -> RunInfo:
    """Read a run directory; `metrics=False` skips metrics.jsonl when summary.json has what
    a listing needs. Raises UsageError naming the file (and line) that cannot be read."""
    path = check_run_dir(path)
    summary = read_json(path / SUMMARY_FILE, missing_ok=True)
    job = read_json(path / JOB_FILE, missing_ok=True)
    marker = _read_marker(path)
    events = read_events(path) if metrics or not summary else []
    if summary:
        status = str(summary.get("status") or "unknown")
    else:
        status = "running" if is_locked(path) else "incomplete"
    return RunInfo(
        path=path,
        name=name or path.name,
        status=status,
        summary=summary,
        job=job,
        marker=marker,
        events=events,
    )


def read_json(path: Path, *, missing_ok: bool = False) -> dict[str, Any]:
    """A JSON object from `path` ({} if missing and `missing_ok`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise UsageError(Problem(str(path), "no such file")) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(Problem(str(path), f"cannot read it ({_why(exc)})")) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(Problem(f"{path}:{exc.lineno}", f"invalid JSON ({exc.msg})")) from None
    if not isinstance(data, dict):
        raise UsageError(Problem(str(path), "not a JSON object"))
    return data


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's events ([] when there is none yet). A last line without its newline
    that does not parse is being written (or was cut by a crash) and is left out; any other
    bad line is an error naming it."""
    path = Path(run_dir) / METRICS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(Problem(str(path), f"cannot read it ({_why(exc)})")) from None
    lines = text.split("\n")
    events = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: unfinished
                break
            raise UsageError(Problem(f"{path}:{number}", f"invalid JSON ({exc.msg})")) from None
        if not isinstance(event, dict) or not isinstance(event.get("step"), int | float):
            raise UsageError(Problem(f"{path}:{number}", "not a metrics event (no step)"))
        events.append(event)
    return events


def is_locked(run_dir: Path) -> bool:
    """Whether a `train` (or the workers it started) holds the run's lock right now. Tested
    with a shared lock, dropped at once; the lock files are opened read-only, never made."""
    import fcntl

    for name in (LOCK, WORKER_LOCK):
        try:
            fd = os.open(Path(run_dir) / name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # releases the lock if we took it
    return False


def _read_marker(run_dir: Path) -> dict[str, Any]:
    try:
        return read_json(run_dir / MARKER)
    except UsageError:
        return {}  # only its creation time is shown; `train` itself refuses a bad marker


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or first_line(exc)


# -- what a listing shows ------------------------------------------------------------------


def finite(value: Any) -> float | None:
    """A number as a float, or None (missing, not a number, NaN or infinite)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def best_validation(info: RunInfo) -> tuple[int, float] | None:
    """(step, loss) of the lowest finite validation loss in metrics.jsonl."""
    points = [(e["step"], finite(e.get("loss"))) for e in info.val_events]
    points = [(int(s), v) for s, v in points if v is not None]
    return min(points, key=lambda p: p[1]) if points else None


def overview(info: RunInfo) -> dict[str, Any]:
    """The row `tuneplex runs list` shows: from summary.json, else from metrics.jsonl."""
    s, train, val = info.summary, info.train_events, info.val_events
    if s:
        loss = s.get("train_loss")
        steps, total = s.get("steps"), s.get("total_steps")
        best, last = s.get("best_val_loss"), s.get("val_loss")
        speed, elapsed = s.get("tokens_per_s"), s.get("elapsed_s")
    else:
        steps = int(max(e["step"] for e in train)) if train else 0
        total = None
        loss = train[-1].get("loss") if train else None
        found = best_validation(info)
        best = found[1] if found else None
        last = val[-1].get("loss") if val else None
        elapsed = info.events[-1].get("elapsed_s") if info.events else None
        tokens = sum(e.get("tokens") or 0 for e in train if isinstance(e.get("tokens"), int))
        seconds = finite(train[-1].get("elapsed_s")) if train else None
        speed = round(tokens / seconds, 1) if tokens and seconds else None
    return {
        "name": info.name,
        "path": str(info.path),
        "backend": s.get("backend") or info.marker.get("backend"),
        "status": info.status,
        "steps": steps,
        "total_steps": total,
        "train_loss": loss if isinstance(loss, int | float) else None,  # a diverged run's NaN
        "best_val_loss": finite(best),
        "val_loss": finite(last),
        "tokens_per_s": finite(speed),
        "elapsed_s": finite(elapsed),
        "started": info.marker.get("created"),
    }


def job_settings(info: RunInfo) -> tuple[JobSettings | None, str | None]:
    """(settings, None): the run's key settings, as its backend describes the saved job; or
    (None, why not) in one line (see `run_job`)."""
    found, why = run_job(info)
    if found is None:
        return None, why
    backend, job = found
    return backend.describe(job), None


def run_job(info: RunInfo) -> tuple[tuple[Backend, Any] | None, str | None]:
    """((the run's backend, its validated job), None), or (None, why not) in one line: the
    backend is not installed, or job.json is missing or no longer valid for it. The backend is
    the one run.json (or summary.json) names; an older run that names none is told by its job,
    when exactly one installed backend's schema takes it."""
    from tuneplex.plugins import KNOWN_EXTRAS, registry
    from tuneplex.schema.loading import validate_job

    if not info.job:
        return None, f"{JOB_FILE} is missing or empty"
    try:
        reg = registry()
    except UsageError as exc:  # two plugins claim one name: `show` still shows the rest
        return None, exc.lines()[0]
    installed = reg.backends
    name = info.summary.get("backend") or info.marker.get("backend")
    if not isinstance(name, str):  # a run made before run.json named its backend
        fits = reg.fitting(info.job)
        if len(fits) != 1:
            which = f"several backends ({', '.join(fits)})" if fits else "no installed backend"
            return None, f"no {SUMMARY_FILE} names the backend, and {JOB_FILE} fits {which}"
        name = fits[0]
    if name not in installed:
        extra = KNOWN_EXTRAS.get(name)
        hint = f" (pip install 'tuneplex[{extra}]')" if extra else ""
        return None, f"the {name} backend is not installed{hint}"
    backend = installed[name].backend
    try:
        job = validate_job(backend.job_schema, info.job)
    except UsageError as exc:
        more = len(exc.problems) - 1
        return None, (
            f"{JOB_FILE} is no longer a valid {name} job: {exc.lines()[0]}"
            + (f" (and {more} more)" if more else "")
        )
    return (backend, job), None


def final_weights(run_dir: Path) -> dict[str, Any] | None:
    """What final/ holds and the line of Python that loads it (None: no final/ yet)."""
    final = Path(run_dir) / FINAL_DIR
    if not final.is_dir():
        return None
    where = str(final.resolve())
    if (final / "adapter_config.json").is_file():
        base = read_json(final / "adapter_config.json").get("base_model_name_or_path")
        return {
            "path": where,
            "kind": "lora_adapter",
            "what": "LoRA adapter" + (f" on {base}" if base else ""),
            "load": "from peft import AutoPeftModelForCausalLM; "
            f"model = AutoPeftModelForCausalLM.from_pretrained({where!r})",
        }
    if (final / "config.json").is_file():
        merged = (final / "adapter" / "adapter_config.json").is_file()
        return {
            "path": where,
            "kind": "merged_model" if merged else "full_model",
            "what": "merged model (its LoRA adapter in adapter/)" if merged else "full model",
            "load": "from transformers import AutoModelForCausalLM; "
            f"model = AutoModelForCausalLM.from_pretrained({where!r})",
        }
    return {"path": where, "kind": "unknown", "what": "no adapter or model config", "load": None}


def latest_eval(run_dir: Path) -> dict[str, Any] | None:
    """The newest report `tuneplex eval` kept in the run (its path under "path"); None when
    there is none that can be read."""
    folder = Path(run_dir) / EVALS_DIR
    found = sorted(folder.glob("*.json"), key=eval_order) if folder.is_dir() else []
    for path in reversed(found):
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(report, dict):
            return {**report, "path": str(path.resolve())}
    return None


def best_checkpoint(info: RunInfo) -> dict[str, Any] | None:
    """The complete checkpoint saved at the step of the best validation loss, if one is
    kept (a checkpoint holds that step's weights; another step's would not be the best)."""
    found = best_validation(info)
    if found is None:
        return None
    step, loss = found
    at = dict(complete_checkpoints(info.path)).get(step)
    return {"step": step, "val_loss": loss, "path": str(at.resolve()) if at is not None else None}
