"""Reward functions ("environments") for reinforcement learning from rewards (GRPO).

Both backends score completions through `score`, so that a reward is built, called and checked
in one place: a `math` reward (the final answer against a reference column), a `python` reward
(the user's function, `file.py:name` or `package.module:name`) and a `multi` reward (a weighted
sum whose parts are logged apart, as `reward/<name>`).

Bad settings are refused when the reward is built, before training (`UsageError`, exit 2); a
reward that fails or returns something unusable while training stops the run
(`TrainingStopped`, exit 1) with one line naming the reward and, for the user's own code, the
`file:line` to look at.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import math
import numbers
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tuneplex.data.formats import reference_text
from tuneplex.errors import (
    Problem,
    TrainingStopped,
    UsageError,
    did_you_mean,
    first_line,
    needs_package,
    one_line,
    show,
)

REWARD_NAMES = ("math", "python", "multi")
"""The rewards a job may name."""


class Reward(Protocol):
    """Scores a batch of completions, one float per completion. `columns` holds the rows' other
    columns, each a list aligned with `prompts`. A reward with a `file` attribute (a Path) has
    its failures pointed at the innermost line of that file."""

    @property
    def name(self) -> str: ...

    def __call__(
        self,
        *,
        prompts: list[str],
        completions: list[str],
        columns: Mapping[str, list],
        references: Sequence[str | None] | None = None,
    ) -> Sequence[float]: ...


@dataclass(frozen=True)
class Scored:
    """What a batch earned: `total` per completion (the weighted sum for a multi reward) and
    each reward's own values by its name (one entry for a single reward), for `reward/<name>`."""

    total: list[float]
    parts: dict[str, list[float]]


# --- math --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MathReward:
    """1.0 when a completion's final answer equals the row's reference mathematically."""

    reference_column: str | None
    """The column holding the reference; None: the rows' own answers (`references`)."""
    name: str = "math"

    def __call__(
        self,
        *,
        prompts: list[str],
        completions: list[str],
        columns: Mapping[str, list],
        references: Sequence[str | None] | None = None,
    ) -> list[float]:
        from tuneplex.inference.metrics import math_equal

        if self.reference_column is None:
            if references is None:
                raise KeyError("no reference answers given")
            values = references
        elif self.reference_column not in columns:
            raise KeyError(f"no reference column {self.reference_column!r} among the columns")
        else:
            values = columns[self.reference_column]
        out = []
        for completion, value in zip(completions, values, strict=True):
            reference = reference_text(value)
            out.append(math_equal(prediction=completion, reference=reference) if reference else 0.0)
        return out


def math_reward(*, reference_column: str | None = None) -> MathReward:
    """The `math` reward; refused before training when the verifier (math-verify) is missing."""
    if importlib.util.find_spec("math_verify") is None:
        raise needs_package("math_verify")
    return MathReward(reference_column=reference_column)


# --- python ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PythonReward:
    """The user's `function(prompts, completions, **columns) -> list[float]`, called with
    keywords as TRL calls its reward functions (so theirs work here unchanged)."""

    name: str
    function: Callable[..., Any]
    file: Path | None

    def __call__(
        self,
        *,
        prompts: list[str],
        completions: list[str],
        columns: Mapping[str, list],
        references: Sequence[str | None] | None = None,
    ) -> Any:
        return self.function(prompts=prompts, completions=completions, **columns)


_SPEC_FORMS = "expected path/to/file.py:function or package.module:function"
_loaded = itertools.count(1)


def load_python_reward(spec: str, *, base_dir: Path, key: str) -> PythonReward:
    """The function `spec` names, imported now (call once per training process). A relative
    file path is read from `base_dir` (the job file's folder); while the file runs, its own
    folder is first on sys.path, so it may import the modules beside it. `key` is the job
    setting quoted in refusals."""
    where, _, attr = spec.rpartition(":")  # the last colon: C:\x.py:f on Windows
    if not where.strip() or not attr.strip():
        raise UsageError(Problem(key, f"{_SPEC_FORMS} (got {show(spec)})"))
    where, attr = where.strip(), attr.strip()
    if where.endswith(".py"):
        path = (base_dir / Path(where).expanduser()).resolve()
        module, label = _import_file(path, key=key), str(path)
    else:
        module, label = _import_module(where, attr, base_dir=base_dir, key=key), where
        path = Path(module.__file__).resolve() if getattr(module, "__file__", None) else None
    if not hasattr(module, attr):
        defined = sorted(
            n
            for n, v in vars(module).items()
            if callable(v)
            and not n.startswith("_")
            and getattr(v, "__module__", None) == module.__name__
        )
        listing = f"it defines {', '.join(defined)}" if defined else "it defines no functions"
        raise UsageError(
            Problem(
                key, f"{label}: no function {show(attr)}; {listing}{did_you_mean(attr, defined)}"
            )
        )
    function = getattr(module, attr)
    if not callable(function):
        raise UsageError(
            Problem(
                key,
                f"{label}: {show(attr)} is {show(function)} ({type(function).__name__}), "
                "not a function",
            )
        )
    return PythonReward(name=attr, function=function, file=path)


def _import_file(path: Path, *, key: str) -> Any:
    if not path.is_file():
        raise UsageError(Problem(key, f"{path}: no such file"))
    stem = path.stem if path.stem.isidentifier() else "file"
    name = f"_tuneplex_reward_{next(_loaded)}_{stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(Problem(key, f"{path}: cannot be imported as a Python file"))
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickle look their module up there
    sys.path.insert(0, str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise UsageError(Problem(key, _import_failure(exc, path))) from exc
    finally:
        sys.path.remove(str(path.parent))
    return module


def _import_module(name: str, attr: str, *, base_dir: Path, key: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")):
            raise UsageError(Problem(key, _import_failure(exc, None))) from exc
        from tuneplex.schema.grpo import no_module

        raise UsageError(Problem(key, no_module(name, attr, base_dir=base_dir))) from exc
    except Exception as exc:
        raise UsageError(Problem(key, _import_failure(exc, None))) from exc


def _import_failure(exc: BaseException, file: Path | None) -> str:
    if isinstance(exc, SyntaxError) and exc.filename:
        at, message = f"{exc.filename}:{exc.lineno}", exc.msg
    else:
        at, message = _raised_at(exc, file), first_line(exc)
    return f"{at}: importing it raised {type(exc).__name__}: {one_line(message, limit=200)}"


def _raised_at(exc: BaseException, file: Path | None) -> str:
    """`file:line` of the innermost frame in `file` (of any real file when None)."""
    frames = [
        (frame.f_code.co_filename, line)
        for frame, line in traceback.walk_tb(exc.__traceback__)
        if not frame.f_code.co_filename.startswith("<")  # <frozen importlib._bootstrap>
    ]
    if file is not None:
        frames = [(name, line) for name, line in frames if _same_file(name, file)]
    return f"{frames[-1][0]}:{frames[-1][1]}" if frames else ""


def _same_file(name: str, file: Path) -> bool:
    return name == str(file) or Path(name).resolve() == file


# --- multi and scoring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MultiReward:
    """Several rewards whose weighted sum is the total; `names` are unique (see multi_reward)."""

    rewards: tuple[Reward, ...]
    weights: tuple[float, ...]
    names: tuple[str, ...]


def multi_reward(
    *, rewards: Sequence[Reward], weights: Sequence[float] | None = None
) -> MultiReward:
    """The `multi` reward: each reward's values times its weight (1.0 each when None), summed.
    A weight may be negative (a penalty) or 0 (logged, not trained on). A name already taken
    gets `#2`, `#3`, ... in list order (two `math` rewards log as `reward/math` and
    `reward/math#2`), so the parts never overwrite each other."""
    weights = [1.0] * len(rewards) if weights is None else list(weights)
    if not rewards:
        raise ValueError("a multi reward needs at least one reward")
    if len(weights) != len(rewards):
        raise ValueError(f"{len(weights)} weights for {len(rewards)} rewards")
    if any(isinstance(r, MultiReward) for r in rewards):
        raise ValueError("a multi reward cannot hold another multi reward")
    if not all(isinstance(w, numbers.Real) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    names: list[str] = []
    for reward in rewards:
        name, n = reward.name, 1
        while name in names:
            n += 1
            name = f"{reward.name}#{n}"
        names.append(name)
    return MultiReward(
        rewards=tuple(rewards), weights=tuple(float(w) for w in weights), names=tuple(names)
    )


def score(
    *,
    reward: Reward | MultiReward,
    prompts: list[str],
    completions: list[str],
    columns: Mapping[str, list],
    references: Sequence[str | None] | None = None,
) -> Scored:
    """Every reward called on the batch and its values checked: exactly one finite number per
    completion (a list, tuple, 1-D numpy array or torch tensor, of numbers, numpy scalars or
    0-D tensors; True and False count as 1 and 0). A reward that raises or returns anything
    else stops training (`TrainingStopped`) with one line; its own exception stays chained
    for the log."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    for column, values in columns.items():
        if len(values) != len(prompts):
            raise ValueError(f"column {column!r} has {len(values)} values for {len(prompts)} rows")
    multi = reward if isinstance(reward, MultiReward) else multi_reward(rewards=[reward])
    parts: dict[str, list[float]] = {}
    for each, name in zip(multi.rewards, multi.names, strict=True):
        parts[name] = _call(
            each,
            name,
            prompts=prompts,
            completions=completions,
            columns=columns,
            references=references,
        )
    total = [
        math.fsum(w * values[i] for w, values in zip(multi.weights, parts.values(), strict=True))
        for i in range(len(completions))
    ]
    return Scored(total=total, parts=parts)


def _call(
    reward: Reward,
    name: str,
    *,
    prompts: list[str],
    completions: list[str],
    columns: Mapping[str, list],
    references: Sequence[str | None] | None,
) -> list[float]:
    file: Path | None = getattr(reward, "file", None)
    try:
        result = reward(
            prompts=prompts, completions=completions, columns=columns, references=references
        )
    except Exception as exc:
        at = _raised_at(exc, file) or _defined_at(reward) or (str(file) if file else "")
        message = (
            f"reward '{name}' raised {type(exc).__name__}: {one_line(first_line(exc), limit=200)}"
        )
        raise TrainingStopped(Problem(at, message)) from exc
    values = _values(result, len(completions))
    if isinstance(values, str):
        raise TrainingStopped(Problem(str(file or ""), f"reward '{name}' {values}"))
    return values


def _defined_at(reward: Reward) -> str:
    # raised before its first line ran (a wrong signature): point at the `def`
    code = getattr(getattr(reward, "function", None), "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code is not None else ""


def _values(result: Any, count: int) -> list[float] | str:
    """`result` as floats, or what is wrong with it (to follow the reward's name)."""
    if hasattr(result, "tolist") and hasattr(result, "ndim"):  # numpy array, torch tensor
        if result.ndim != 1:
            return f"returned a {result.ndim}-D array; expected one value per completion"
        result = result.tolist()
    if not isinstance(result, list | tuple):
        return f"returned {show(result)} ({type(result).__name__}), not a list of numbers"
    if len(result) != count:
        return f"returned {len(result)} values for {count} completions"
    values = []
    for i, value in enumerate(result):
        if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
            value = value.item()  # numpy scalar (np.bool_ is no numbers.Real), 0-D tensor
        if not isinstance(value, numbers.Real):
            return f"value [{i}] is {show(value)} ({type(value).__name__}), not a number"
        try:
            number = float(value)
        except OverflowError:
            return f"value [{i}] is too large for a float"
        if not math.isfinite(number):
            return f"value [{i}] is {number}"
        values.append(number)
    return values


# --- from a job's environment ------------------------------------------------------------------


def build_reward(environment: Any, *, base_dir: Path, key: str) -> Reward | MultiReward:
    """The reward a job's `training.grpo.environment` names (`tuneplex.schema.grpo`), built
    (a python reward imported) once per training process; `key` is the setting's job key."""
    from tuneplex.schema.grpo import MathEnvironment, MultiEnvironment, PythonEnvironment

    if isinstance(environment, MathEnvironment):
        return math_reward(reference_column=environment.reference_column)
    if isinstance(environment, PythonEnvironment):
        return load_python_reward(environment.function, base_dir=base_dir, key=f"{key}.function")
    if isinstance(environment, MultiEnvironment):
        rewards = [
            build_reward(each, base_dir=base_dir, key=f"{key}.rewards[{i}]")
            for i, each in enumerate(environment.rewards)
        ]
        return multi_reward(rewards=rewards, weights=environment.weights)
    raise TypeError(f"not an environment: {environment!r}")


def row_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """Rows' other columns as a reward takes them: one list per column name (in the order first
    seen), None where a row lacks it."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    return {name: [row.get(name) for row in rows] for name in names}


def reward_names(reward: Reward | MultiReward) -> tuple[str, ...]:
    """The names the parts of `reward` are logged under (`reward/<name>`)."""
    return reward.names if isinstance(reward, MultiReward) else (reward.name,)
