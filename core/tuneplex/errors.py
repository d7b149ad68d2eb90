"""Errors that reach the user as `path.to.key: message` lines, never as tracebacks.

Every problem with user input (job file, override, data file, model path, CLI flag) is a
`UsageError` carrying one line per problem; the CLI prints them all and exits with code 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

EXIT_USAGE = 2
EXIT_FAILURE = 1

_SECRET_HINTS = ("key", "token", "secret", "password")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input. `where` is a dotted key path, a `file:line`, or empty."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type name when it has none): what a
    one-line error may quote from a library."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class TuneplexError(Exception):
    """Base of every error the CLI reports without a traceback."""

    exit_code = EXIT_FAILURE

    def __init__(self, problems: str | Problem | Iterable[Problem | str]):
        if isinstance(problems, str | Problem):
            problems = [problems]
        self.problems: list[Problem] = [
            p if isinstance(p, Problem) else Problem("", p) for p in problems
        ]
        super().__init__("\n".join(str(p) for p in self.problems))

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]


class UsageError(TuneplexError):
    """Bad input: a job, an override, a flag, a file. Exit code 2."""

    exit_code = EXIT_USAGE


class EnvironmentNotReady(TuneplexError):
    """The backend cannot run here (no GPU, missing package). Refused before any work: exit 2."""

    exit_code = EXIT_USAGE


class TrainingStopped(TuneplexError):
    """Training stopped on its own (a NaN loss, a diverged step). Exit 1; checkpoints intact."""


class Interrupted(TuneplexError):
    """Ctrl-C during training: the run can be resumed. Exit 130, as for SIGINT."""

    exit_code = 130


class InternalError(TuneplexError):
    """A defect, not bad input: one line for the user, the traceback in the run's log. Exit 1."""


class CrossFieldError(ValueError):
    """Raised by schema validators for rules spanning several fields.

    Carries one or more (relative dotted path, message) pairs; `format_validation_error`
    re-roots them under the location of the model that raised it.
    """

    def __init__(self, problems: Sequence[tuple[str, str]]):
        self.pairs = list(problems)
        super().__init__("; ".join(f"{k}: {m}" for k, m in self.pairs))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`; did you mean 'x'?` for the nearest choice, or an empty string."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def _join(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _show(value: object, path: str) -> str:
    if any(h in path.rsplit(".", 1)[-1].lower() for h in _SECRET_HINTS):
        return "'***'"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_MESSAGES = {
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping of keys",
    "model_attributes_type": "expected a mapping of keys",
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "string_too_short": "must not be empty",
    "too_short": "needs at least {min_length} item(s)",
    "finite_number": "must be a finite number",
    "string_pattern_mismatch": "must match {pattern}",
}


def format_validation_error(exc, model: type | None = None) -> list[Problem]:
    """Turn a pydantic ValidationError into one Problem per error, in input order.

    `model` (the root schema class) lets unknown-key errors list the allowed keys.
    """
    problems: list[Problem] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err.get("loc", ()))
        # pydantic puts the tag of a function/union validator into loc; drop those
        loc = tuple(p for p in loc if not (isinstance(p, str) and "[" in p and "]" in p))
        path = _join(loc)
        kind = err["type"]
        ctx = err.get("ctx") or {}
        if kind == "value_error" and isinstance(ctx.get("error"), CrossFieldError):
            for rel, msg in ctx["error"].pairs:
                problems.append(Problem(_join((*loc, *rel.split("."))) if rel else path, msg))
            continue
        if kind == "extra_forbidden":
            key = str(loc[-1])
            allowed = _allowed_keys(model, loc[:-1]) if model is not None else []
            msg = "unknown key" + did_you_mean(key, allowed)
            if allowed:
                msg += f" (allowed: {', '.join(allowed)})"
            problems.append(Problem(path, msg))
            continue
        if kind == "missing":
            problems.append(Problem(path, "required key is missing"))
            continue
        if kind in ("literal_error", "enum"):
            expected = ctx.get("expected", "")
            choices = [c.strip().strip("'") for c in expected.replace(" or ", ", ").split(",")]
            got = err.get("input")
            msg = f"must be one of: {', '.join(c for c in choices if c)} (got {_show(got, path)})"
            problems.append(Problem(path, msg + did_you_mean(got, choices)))
            continue
        if err.get("input", ...) is None and kind.endswith("_type"):
            problems.append(Problem(path, "must be set (got null)"))
            continue
        nums = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in ctx.items()}
        msg = _MESSAGES[kind].format(**nums) if kind in _MESSAGES else err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if kind not in ("value_error", "assertion_error") and "input" in err:
            msg += f" (got {_show(err['input'], path)})"
        problems.append(Problem(path, msg))
    return problems


def _allowed_keys(model, loc: Sequence[str | int]) -> list[str]:
    """Field names of the (nested) model found at `loc`, following list/dict/optional types."""
    from tuneplex.schema.base import model_in

    current = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = model_in(field.annotation)
    return list(current.model_fields) if current is not None else []
