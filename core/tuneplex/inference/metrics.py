"""Scores of generated answers against reference answers, for `tuneplex eval --metrics`.

Each metric scores one prediction against one reference as a float in [0, 1]; `score_all`
averages them over the rows that have a reference. The text metrics forgive only what no
reader would call a different answer (whitespace and case; token_f1 also punctuation at word
ends) and nothing language-specific, so they mean the same in every language.
"""

from __future__ import annotations

import importlib.util
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tuneplex.errors import Problem, UsageError, did_you_mean, needs_package, one_line


class Metric(Protocol):
    """One prediction scored against one reference, in [0, 1]; keyword-only because most
    metrics are not symmetric."""

    def __call__(self, *, prediction: str, reference: str) -> float: ...


def normalize(text: str) -> str:
    """Runs of whitespace collapsed to one space, ends stripped, case folded (`ß` == `SS`)."""
    return " ".join(text.split()).casefold()


def exact_match(*, prediction: str, reference: str) -> float:
    """1.0 when the two are the same text but for whitespace and case."""
    return float(normalize(prediction) == normalize(reference))


def contains(*, prediction: str, reference: str) -> float:
    """1.0 when the reference occurs in the prediction (an answer inside a longer reply); an
    empty reference is in nothing but an empty prediction."""
    ref, pred = normalize(reference), normalize(prediction)
    return float(ref in pred if ref else not pred)


def _is_punctuation(char: str) -> bool:
    return unicodedata.category(char).startswith("P")


def tokens(text: str) -> list[str]:
    """SQuAD's answer tokens, language-neutral: normalised words with Unicode punctuation
    stripped from their ends only, so `Paris.` is `paris` but `3.14`, `don't` and `e-mail`
    stay whole. SQuAD's English article removal ("a", "an", "the") is left out on purpose."""
    out = []
    for word in normalize(text).split():
        start, end = 0, len(word)
        while start < end and _is_punctuation(word[start]):
            start += 1
        while end > start and _is_punctuation(word[end - 1]):
            end -= 1
        if start < end:
            out.append(word[start:end])
    return out


def token_f1(*, prediction: str, reference: str) -> float:
    """SQuAD's token F1: partial credit for an answer that shares words with the reference.
    Two answers without any token (empty, or only punctuation) agree."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def final_answer(text: str) -> str:
    """What follows the last `####` (GSM8K's answer line), else the whole text: math_verify
    finds a `\\boxed{}`, an "answer is" or the last number in it by itself."""
    return text.rsplit("####", 1)[1].strip() if "####" in text else text


_LATEX = re.compile(r"[\\^_{}]")


def _parse_math(text: str, timeout: int | None) -> list:
    from math_verify import parse

    parsed = parse(text, parsing_timeout=timeout)
    if parsed or not _LATEX.search(text):
        return parsed
    # bare LaTeX (`\sqrt{2}`, `x^2+1`) is only read between $...$; plain words are not
    # wrapped, as LaTeX reads `cat` as the product c*a*t, equal to `tac`
    return parse(f"${text}$", parsing_timeout=timeout)


def math_equal(*, prediction: str, reference: str) -> float:
    """1.0 when the final answers are mathematically equal (`\\boxed{\\frac{1}{2}}` is `0.5`,
    `#### 1,234` is `1234`), by math_verify's parsing and sympy comparison."""
    from math_verify import verify

    # math_verify bounds its time with SIGALRM, which only the main thread may set
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = _parse_math(final_answer(reference), timeout)
    answer = _parse_math(final_answer(prediction), timeout)
    if not gold or not answer:
        return 0.0
    return float(verify(gold, answer, timeout_seconds=timeout))


METRICS: dict[str, Metric] = {
    "exact_match": exact_match,
    "contains": contains,
    "token_f1": token_f1,
    "math": math_equal,
}
DEFAULT_METRICS = ("exact_match", "token_f1")
"""What `eval` scores when no metric is named: the strict score and the partial-credit one;
`math` needs an extra package and `contains` rewards answers that say everything."""
_NEEDS = {"math": "math_verify"}
"""Metric -> the optional package it imports."""


def check_metrics(names: Sequence[str]) -> tuple[str, ...]:
    """The metrics named (repeated or comma-separated, duplicates dropped), DEFAULT_METRICS
    when none; refused before any generation when a name is unknown or needs a package that
    is missing."""
    wanted = [n.strip() for name in names for n in name.split(",") if n.strip()]
    if not wanted:
        return DEFAULT_METRICS
    choices = ", ".join(METRICS)
    unknown = [
        Problem(
            "--metrics",
            f"unknown metric '{one_line(n)}'; choose from {choices}{did_you_mean(n, METRICS)}",
        )
        for n in dict.fromkeys(wanted)
        if n not in METRICS
    ]
    if unknown:
        raise UsageError(unknown)
    for name in wanted:
        package = _NEEDS.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise needs_package(package)
    return tuple(dict.fromkeys(wanted))


@dataclass(frozen=True)
class Scores:
    """Each metric's mean over the `scored` rows with a reference; `skipped` rows had none.
    `means` is empty when no row was scored."""

    means: dict[str, float]
    scored: int
    skipped: int


def score_all(
    *, names: Sequence[str], predictions: Sequence[str], references: Sequence[str | None]
) -> Scores:
    """Mean of each metric named over the rows whose reference is not None or blank (an
    row without a reference cannot be right or wrong). `names` are checked as `check_metrics`
    does."""
    checked = check_metrics(names)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    rows = [
        (p, r) for p, r in zip(predictions, references, strict=True) if r is not None and r.strip()
    ]
    skipped = len(references) - len(rows)
    if not rows:
        return Scores(means={}, scored=0, skipped=skipped)
    means = {
        name: sum(METRICS[name](prediction=p, reference=r) for p, r in rows) / len(rows)
        for name in checked
    }
    return Scores(means=means, scored=len(rows), skipped=skipped)
