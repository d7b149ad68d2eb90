"""Errors that reach the user as `path.to.key: message` lines, never as tracebacks.

Every problem with user input (job file, override, data file, model path, CLI flag) is a
`UsageError` carrying one line per problem; the CLI prints them all and exits with code 2.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

EXIT_USAGE = 2
EXIT_FAILURE = 1
MAX_PROBLEMS = 50
"""Problems printed at most; the rest are counted on one more line."""

_SECRET_SUFFIXES = ("key", "token", "secret", "password")
SECRET_NAME = r"(?i:[\w-]*(?:" + "|".join(_SECRET_SUFFIXES) + "))"
"""Regex of a key named like a secret's, to find one in text a user wrote."""
# `name: value` or `name=value` with a secret's name, in any text a message may quote: a
# malformed job turns `api_key:VALUE` into a key or a string
_SECRET_ASSIGNMENT = re.compile(rf"({SECRET_NAME}[\"']?[ \t]*[:=][ \t]*)\S.*")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input. `where` is a dotted key path, a `file:line`, or empty."""

    where: str
    message: str

    def __str__(self) -> str:
        # always one line, whatever a path or a library's message holds
        where, message = _escape(self.where)[:1000], _escape(self.message)[:2000]
        return f"{where}: {message}" if where else message


def _escape(text: str) -> str:
    # what would break a line, reach the terminal as a control sequence or not encode at all
    # (line breaks, escapes, bidi overrides, lone surrogates) is written as `repr` writes it
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def is_secret_key(name: object) -> bool:
    """`api_key`, `token` and every key named like *key, *token, *secret or *password."""
    return isinstance(name, str) and name.lower().endswith(_SECRET_SUFFIXES)


def redact(value: object) -> object:
    """`value` with the value of every secret key inside it (at any depth) replaced by ***."""
    if isinstance(value, dict):
        return {k: "***" if is_secret_key(k) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def hide_secrets(text: str) -> str:
    """`api_key:VALUE` or `token=VALUE` anywhere in `text` becomes `api_key:***`."""
    return _SECRET_ASSIGNMENT.sub(r"\1***", text)


def one_line(text: str, *, limit: int = 80) -> str:
    """A user's text (a key, a path, a flag) as a message may quote it: secrets after `key:`
    hidden, unprintable characters escaped as `repr` does, at most `limit` characters."""
    return _cut(_escape(hide_secrets(str(text)[: 4 * limit])), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Brief(reprlib.Repr):
    """`repr` in bounded time and size, however large or aliased the value (a YAML alias bomb
    is a few hundred bytes and billions of items)."""

    def __init__(self, limit: int):
        super().__init__()
        self.maxstring = self.maxother = limit
        self.maxlevel, self.maxdict = 2, 4
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 4

    def repr_str(self, x: str, level: int) -> str:
        return super().repr_str(hide_secrets(x[: 4 * self.maxstring]), level)

    def repr_int(self, x: int, level: int) -> str:
        return repr(x) if x.bit_length() <= 256 else f"<an integer of {x.bit_length()} bits>"


_PLAIN_KEY = re.compile(r"[\w-]{1,60}")


def show_key(name: str) -> str:
    """A key or column name in a message: as is when a short plain word, else quoted as `repr`
    would (` `, `a.b`, `x\ny`), so that a path or a list of names stays one unambiguous line."""
    return name if _PLAIN_KEY.fullmatch(name) else show(name)


def show(value: object, *, limit: int = 60) -> str:
    """How a message quotes a user's value: `repr`-like, one line, at most `limit` characters."""
    return _cut(_escape(_Brief(limit).repr(value)), limit)


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
    """A run stopped by a signal, resumable. The exit code is the shell's for the signal: 130
    for SIGINT (Ctrl-C), 143 for SIGTERM."""

    exit_code = 130

    def __init__(self, problems: str | Problem | Iterable[Problem | str], *, exit_code: int = 130):
        super().__init__(problems)
        self.exit_code = exit_code


class InternalError(TuneplexError):
    """A defect, not bad input: one line for the user, the traceback in the run's log. Exit 1."""


# The packages tuneplex imports that `pip install tuneplex` does not bring: what needs each,
# and the extras that install it. The one place a missing package becomes an install line.
OPTIONAL_PACKAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "datasets": ("reading data", ("data",)),
    "pyarrow": ("reading data", ("data",)),
    "numpy": ("reading data", ("data",)),
    "transformers": ("tokenizing", ("data",)),
    "tokenizers": ("tokenizing", ("data",)),
    "huggingface_hub": ("fetching a model's config.json from the Hub", ("data",)),
    "torch": ("training", ("automodel", "unsloth")),
    "peft": ("training", ("automodel", "unsloth")),
    "safetensors": ("training", ("automodel",)),
    "trl": ("the unsloth backend", ("unsloth",)),
    "unsloth": ("the unsloth backend", ("unsloth",)),
    "unsloth_zoo": ("the unsloth backend", ("unsloth",)),
    "bitsandbytes": ("the unsloth backend", ("unsloth",)),
    "matplotlib": ("drawing curves", ("plots",)),
    "wandb": ("the W&B tracker", ("wandb",)),
    "mlflow": ("the MLflow tracker", ("mlflow",)),
    "sqlalchemy": ("the MLflow tracker", ("mlflow",)),
    "alembic": ("the MLflow tracker", ("mlflow",)),
    "tensorboard": ("the TensorBoard tracker", ("tensorboard",)),
    "math_verify": ("the math metric", ("eval",)),
    "lm_eval": ("--lm-eval", ("eval",)),
    "gguf": ("--format gguf", ("export",)),
}


def extra_of(package: str) -> str:
    """The (first) extra that installs `package`, one of OPTIONAL_PACKAGES."""
    return OPTIONAL_PACKAGES[package][1][0]


def needs_package(package: str) -> EnvironmentNotReady:
    """The refusal for a missing optional package, in one line:
    `reading data needs the package 'datasets': pip install 'tuneplex[data]'`."""
    what, extras = OPTIONAL_PACKAGES[package]
    install = " or ".join(f"'tuneplex[{extra}]'" for extra in extras)
    return EnvironmentNotReady(f"{what} needs the package '{package}': pip install {install}")


def missing_package(exc: BaseException) -> EnvironmentNotReady | None:
    """`needs_package` for a ModuleNotFoundError of an optional package, found in `exc` or
    what caused it (a library re-raising it as its own error); None for anything else (a
    missing module of tuneplex or of an installed package is a defect, not a missing extra)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ModuleNotFoundError) and current.name in OPTIONAL_PACKAGES:
            return needs_package(current.name)
        current = current.__cause__ or current.__context__
    return None


class CrossFieldError(ValueError):
    """Raised by schema validators for rules spanning several fields.

    Carries one or more (relative dotted path, message) pairs; `format_validation_error`
    re-roots them under the location of the model that raised it.
    """

    def __init__(self, problems: Sequence[tuple[str, str]]):
        self.pairs = list(problems)
        super().__init__("; ".join(f"{k}: {m}" for k, m in self.pairs))


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """`; did you mean 'x'?` for the nearest choice, or an empty string."""
    if not isinstance(word, str) or len(word) > 100:
        return ""
    match = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def _join(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{show_key(part)}" if out else show_key(part)
    return out


def _show(value: object, loc: Sequence[str | int]) -> str:
    names = [p for p in loc if isinstance(p, str)]
    return "'***'" if names and is_secret_key(names[-1]) else show(value)


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
    "string_unicode": "must be valid Unicode text",
}


YAML_BOOLS = {"True": "true", "False": "false"}

TAGGED_UNION = "tagged_union"
"""The error type of a union chosen by one key (`custom_error_context`: that key and its
choices): reported on that key, as an unknown choice or a missing key."""


def format_validation_error(exc, model: type | None = None) -> list[Problem]:
    """Turn a pydantic ValidationError into one Problem per error, in input order.

    `model` (the root schema class) lets unknown-key errors list the allowed keys.
    """
    problems: list[Problem] = []
    for err in exc.errors(include_url=False):
        kind = err["type"]
        loc = user_loc(tuple(err.get("loc", ())), keep_last=kind == "extra_forbidden")
        path = _join(loc) or "job"
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
        if kind == TAGGED_UNION:
            choices, got = list(ctx["choices"]), err.get("input")
            if not isinstance(got, dict):
                msg = f"expected a mapping with {ctx['key']}: {' | '.join(choices)}"
                problems.append(Problem(path, f"{msg} (got {_show(got, loc)})"))
                continue
            at = _join((*loc, ctx["key"]))
            if ctx["key"] not in got:
                problems.append(
                    Problem(at, f"required key is missing (one of: {', '.join(choices)})")
                )
                continue
            name = got[ctx["key"]]
            msg = f"must be one of: {', '.join(choices)} (got {_show(name, loc)})"
            problems.append(Problem(at, msg + did_you_mean(name, choices)))
            continue
        if kind in ("literal_error", "enum"):
            expected = ctx.get("expected", "")
            choices = [c.strip().strip("'") for c in expected.replace(" or ", ", ").split(",")]
            choices = [YAML_BOOLS.get(c, c) for c in choices]  # Literal[True, ...]: as YAML says
            got = err.get("input")
            msg = f"must be one of: {', '.join(c for c in choices if c)} (got {_show(got, loc)})"
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
            msg += f" (got {_show(err['input'], loc)})"
        problems.append(Problem(path, msg))
    if len(problems) > MAX_PROBLEMS:
        more = len(problems) - MAX_PROBLEMS
        problems = [*problems[:MAX_PROBLEMS], Problem("job", f"{more} more problems not shown")]
    return problems


_TAG = re.compile(r"[a-z][a-z-]*\[.*\]")


def user_loc(loc: tuple, *, keep_last: bool) -> tuple:
    """`loc` without the tags pydantic adds for validators and unions (`function-after[...]`,
    `literal['x']`); an unknown key is the user's, whatever it looks like."""
    head, last = (loc[:-1], loc[-1:]) if keep_last else (loc, ())
    return (*(p for p in head if not (isinstance(p, str) and _TAG.fullmatch(p))), *last)


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
