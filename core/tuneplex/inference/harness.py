"""EleutherAI's lm-evaluation-harness on a model tuneplex loaded: `tuneplex eval --lm-eval`.

The harness gets the model object itself (a base model, or a PeftModel with the adapter on
its base), so it scores exactly what `generate` and `chat` run, with no merge and no reload by
name. A task is one the harness knows by name, or a local task YAML (or a folder of them),
whose folder is added to the harness's index; with only local tasks the built-in index (some
15,000 names, seconds to build) is not read at all.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tuneplex.errors import (
    Problem,
    UsageError,
    did_you_mean,
    first_line,
    needs_package,
    one_line,
)

FLAG = "--lm-eval"
_NOT_KEPT = ("samples", "pretty_env_info", "git_hash", "upper_git_hash")
"""Parts of the harness's output left out of `HarnessResult.results`: per-sample logs (not
requested), this machine's environment dump, and the git commit of the working directory
(which names whatever repository the command ran in, not the model)."""


@dataclass(frozen=True)
class HarnessTasks:
    """Tasks found and loaded (datasets read) before any model is: what `run_harness` runs."""

    names: tuple[str, ...]
    manager: Any = field(repr=False, compare=False)
    loaded: tuple[Any, ...] = field(repr=False, compare=False)
    """The harness's Task and Group objects, one per name."""


@dataclass(frozen=True)
class HarnessResult:
    table: str
    """The harness's own table of results (Markdown), groups below tasks."""
    results: dict
    """JSON-serialisable: the harness's `results`, `versions`, `n-shot`, `configs`, ..."""


def check_tasks(*, tasks: Sequence[str]) -> HarnessTasks:
    """Resolve and load `tasks` (names, task YAML files or folders of them; comma-separated
    lists too), so that a typo or a missing data file is refused before the model loads."""
    if importlib.util.find_spec("lm_eval") is None:
        raise needs_package("lm_eval")
    names: list[str] = []
    local: dict[str, Path] = {}  # task or group name -> its YAML
    folders: list[str] = []
    problems: list[Problem] = []
    for spec in _specs(tasks):
        if not _is_path(spec):
            names.append(spec)
            continue
        try:
            found = _local_tasks(Path(spec).expanduser())
        except UsageError as exc:
            problems += exc.problems
            continue
        local.update(found)
        names += found
        path = Path(spec).expanduser().resolve()
        folders.append(str(path if path.is_dir() else path.parent))
    if problems:
        raise UsageError(problems)
    if not names:
        raise UsageError(Problem(FLAG, "no task named"))
    names = list(dict.fromkeys(names))
    builtin = [n for n in names if n not in local]
    from lm_eval.tasks import TaskManager

    with _quiet():
        # a local group may name built-in tasks: the built-in index is read for groups too
        defaults = bool(builtin) or any(_is_group(path) for path in local.values())
        manager = TaskManager(include_path=list(dict.fromkeys(folders)), include_defaults=defaults)
    _check_names(manager, names, local)
    return HarnessTasks(names=tuple(names), manager=manager, loaded=_load(manager, names))


def run_harness(
    *,
    model,
    tokenizer,
    tasks: Sequence[str] | HarnessTasks,
    batch_size: int = 8,
    limit: int | None = None,
    device: str | None = None,
) -> HarnessResult:
    """Score `model` (a transformers model or a PeftModel) on the harness's `tasks`, at most
    `limit` examples each. The model runs where it is; `device` moves it there first."""
    checked = tasks if isinstance(tasks, HarnessTasks) else check_tasks(tasks=tasks)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import make_table

    if device is not None:
        model = model.to(device)
    with _quiet():
        # HFLM takes a loaded model as is (its `device` is ignored then) and never reloads it
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm,
            tasks=list(checked.loaded),
            task_manager=checked.manager,
            limit=limit,
            log_samples=False,
        )
    table = make_table(out)
    if out.get("groups"):
        table += "\n" + make_table(out, "groups")
    kept = {key: value for key, value in out.items() if key not in _NOT_KEPT}
    return HarnessResult(table=table, results=_jsonable(kept))


def _specs(tasks: Sequence[str]) -> Iterator[str]:
    for task in tasks:
        if Path(task).expanduser().exists():  # a path may hold a comma
            yield task
        else:
            yield from (part.strip() for part in task.split(",") if part.strip())


def _is_path(spec: str) -> bool:
    # harness names are words: a separator or a YAML suffix means a file was meant
    return "/" in spec or "\\" in spec or spec.endswith((".yaml", ".yml")) or Path(spec).exists()


class _YamlLoader(yaml.SafeLoader):
    """Reads task YAML for its names only: the harness's tags (`!function utils.f`) load as
    nothing instead of importing code."""


_YamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _read_yaml(path: Path) -> dict:
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UsageError(Problem(FLAG, f"{one_line(path)}: {first_line(exc)}")) from None
    return doc if isinstance(doc, dict) else {}


def _name(doc: dict) -> str | None:
    """The group a YAML defines, or the task (the harness reads `group:` first)."""
    name = doc.get("group", doc.get("task"))
    return name if isinstance(name, str) else None


def _is_group(path: Path) -> bool:
    return isinstance(_read_yaml(path).get("group"), str)


def _local_tasks(path: Path) -> dict[str, Path]:
    """{name: YAML} of what a task file or folder defines; in a folder, the groups and every
    task no group there runs (a group runs its own tasks)."""
    shown = one_line(path)
    if not path.exists():
        raise UsageError(Problem(FLAG, f"no such task file or folder: {shown}"))
    if path.is_file():
        if path.suffix != ".yaml":
            raise UsageError(Problem(FLAG, f"{shown}: the harness reads task files named *.yaml"))
        name = _name(_read_yaml(path))
        if name is None:
            raise UsageError(Problem(FLAG, f"{shown}: no 'task:' key naming the task"))
        return {name: path.resolve()}
    docs = {
        p.resolve(): _read_yaml(p)
        for p in sorted(path.glob("**/*.yaml"))
        if "__pycache__" not in p.parts and ".ipynb_checkpoints" not in p.parts
    }
    members = {
        m if isinstance(m, str) else m.get("task")
        for doc in docs.values()
        if isinstance(doc.get("group"), str)
        for m in (doc["task"] if isinstance(doc.get("task"), list) else [])
        if isinstance(m, str | dict)
    }
    found = {name: p for p, doc in docs.items() if (name := _name(doc)) and name not in members}
    if not found:
        raise UsageError(Problem(FLAG, f"{shown}: no task YAML (with a 'task:' key) in it"))
    return found


def _check_names(manager, names: list[str], local: dict[str, Path]) -> None:
    known = manager.task_index
    problems = []
    for name in names:
        entry = known.get(name)
        if name not in local:
            if entry is None:
                hint = did_you_mean(name, manager.all_tasks)
                msg = f"unknown task '{one_line(name)}'{hint} (a name lm_eval knows, or a .yaml)"
                problems.append(Problem(FLAG, msg))
        elif entry is None or entry.yaml_path is None:
            msg = f"{one_line(local[name])}: the harness could not read it (check its include:)"
            problems.append(Problem(FLAG, msg))
        elif entry.yaml_path.resolve() != local[name]:
            # in one folder the harness keeps the first file of a name (a later folder's
            # file of a built-in name replaces the built-in one)
            where, other = one_line(local[name]), one_line(entry.yaml_path)
            msg = f"{where}: the task name '{one_line(name)}' is also {other}'s; rename one"
            problems.append(Problem(FLAG, msg))
    if problems:
        raise UsageError(problems)


def _load(manager, names: list[str]) -> tuple[Any, ...]:
    """One Task or Group object per name, datasets read: a data file that is missing or
    unreadable, or a dataset that cannot be fetched offline, is refused here in one line."""
    loaded = []
    for name in names:
        try:
            with _quiet():
                out = manager.load([name])
        except Exception as exc:  # the harness and datasets raise many kinds for bad input
            msg = f"task '{one_line(name)}' could not be loaded: {first_line(exc)}"
            raise UsageError(Problem(FLAG, msg)) from exc
        loaded.append(out["groups"].get(name) or out["tasks"][name])
    return tuple(loaded)


@contextmanager
def _quiet() -> Iterator[None]:
    """The harness logs its every step, and warnings about choices made here (a model object
    passed in, single process); only its errors are shown."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _jsonable(value: Any) -> Any:
    """`value` with what JSON cannot hold dropped (dtypes, functions) and numpy scalars made
    Python numbers."""
    if isinstance(value, dict):
        items = ((str(k), _jsonable(v)) for k, v in value.items())
        return {k: v for k, v in items if v is not _DROP}
    if isinstance(value, list | tuple):
        return [v for v in map(_jsonable, value) if v is not _DROP]
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):  # numpy's float64 too
        return float(value)
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return _DROP


_DROP = object()
