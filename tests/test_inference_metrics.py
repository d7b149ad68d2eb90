"""Generation metrics on hand-made prediction/reference pairs: what each forgives, what it does
not, and the refusals of `--metrics`."""

from __future__ import annotations

import sys
import threading

import pytest
from tuneplex.errors import EXIT_USAGE, EnvironmentNotReady, UsageError
from tuneplex.inference.metrics import (
    DEFAULT_METRICS,
    METRICS,
    check_metrics,
    contains,
    exact_match,
    final_answer,
    math_equal,
    score_all,
    token_f1,
    tokens,
)


@pytest.mark.parametrize(
    ("prediction", "reference", "score"),
    [
        ("Paris", "paris", 1.0),
        ("  The  answer\n is\t42 ", "the answer is 42", 1.0),
        ("STRASSE", "straße", 1.0),  # casefold, not lower
        ("Paris.", "Paris", 0.0),  # punctuation is part of the answer here
        ("Paris is the capital", "Paris", 0.0),
        ("", "", 1.0),
        ("", "Paris", 0.0),
    ],
)
def test_exact_match(prediction, reference, score):
    assert exact_match(prediction=prediction, reference=reference) == score


@pytest.mark.parametrize(
    ("prediction", "reference", "score"),
    [
        ("I think it is  PARIS, France", "paris, france", 1.0),
        ("paris", "Paris, France", 0.0),  # not symmetric
        ("the answer is 42", "42", 1.0),
        ("the answer is 41", "42", 0.0),
        ("anything", "", 0.0),
        ("", "", 1.0),
    ],
)
def test_contains(prediction, reference, score):
    assert contains(prediction=prediction, reference=reference) == score


def test_tokens_strip_punctuation_at_word_ends_only():
    assert tokens("  «Paris», the city!  ") == ["paris", "the", "city"]
    assert tokens("3.14 don't e-mail U.S.") == ["3.14", "don't", "e-mail", "u.s"]
    assert tokens("東京。") == ["東京"]  # Unicode punctuation, any script
    assert tokens("... !") == []


def test_token_f1():
    assert token_f1(prediction="Paris!", reference="paris") == 1.0
    # 2 of 4 predicted tokens right, 2 of 2 reference tokens found: P=0.5, R=1
    assert token_f1(prediction="the city of Paris", reference="Paris city") == pytest.approx(2 / 3)
    # repeated tokens count once per occurrence in both
    assert token_f1(prediction="a a a", reference="a") == pytest.approx(0.5)
    # articles are not removed: "the" is a token like any other
    assert token_f1(prediction="the cat", reference="cat") == pytest.approx(2 / 3)
    assert token_f1(prediction="dog", reference="cat") == 0.0
    assert token_f1(prediction="", reference="cat") == 0.0
    assert token_f1(prediction="?", reference="") == 1.0


def test_final_answer_takes_the_last_gsm8k_line():
    ref = "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18"
    assert final_answer(ref) == "18"
    assert final_answer("#### 1 #### 2 ") == "2"
    assert final_answer("just 7") == "just 7"


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("So the total is 1234 apples.", "He has 1,000 + 234 = <<1000+234=1234>>1,234\n#### 1,234"),
        ("#### 1,000", "1000"),
        ("The answer is 0.5", "\\boxed{\\frac{1}{2}}"),
        ("The final answer is $\\boxed{\\frac{1}{2}}$.", "0.5"),
        ("First 3, then 17. #### 18", "#### 18"),
        ("The answer is $x^2 + 1$", "\\boxed{1 + x^2}"),
        ("1.4142135623", "\\sqrt{2}"),  # bare LaTeX
        ("\\sqrt{2}", "1.4142135623"),
        ("The answer is 3.0", "3"),
    ],
)
def test_math_equal(prediction, reference):
    assert math_equal(prediction=prediction, reference=reference) == 1.0


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("The answer is 17", "#### 18"),
        ("#### 1,235", "#### 1,234"),
        ("\\boxed{\\frac{1}{3}}", "0.5"),
        ("I do not know", "42"),
        ("", "42"),
        ("42", "no number at all"),
        ("cat", "tac"),  # words are not products of symbols
        ("Paris", "paris"),
    ],
)
def test_math_wrong_answers_score_zero(prediction, reference):
    assert math_equal(prediction=prediction, reference=reference) == 0.0


def test_math_off_the_main_thread():
    """math_verify's timeout needs SIGALRM (main thread only): elsewhere it runs without."""
    scores = []
    worker = threading.Thread(
        target=lambda: scores.append(math_equal(prediction="#### 1,234", reference="1234"))
    )
    worker.start()
    worker.join()
    assert scores == [1.0]


def test_check_metrics():
    assert check_metrics([]) == DEFAULT_METRICS
    assert set(DEFAULT_METRICS) <= set(METRICS)
    assert check_metrics(["token_f1,exact_match", "token_f1", " math "]) == (
        "token_f1",
        "exact_match",
        "math",
    )


def test_unknown_metric_is_one_line_per_name():
    with pytest.raises(UsageError) as caught:
        check_metrics(["exact_match", "exact", "bleu", "bleu"])
    assert caught.value.exit_code == EXIT_USAGE
    assert caught.value.lines() == [
        "--metrics: unknown metric 'exact'; choose from exact_match, contains, token_f1, math"
        "; did you mean 'exact_match'?",
        "--metrics: unknown metric 'bleu'; choose from exact_match, contains, token_f1, math",
    ]


def test_math_without_math_verify_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if not installed
    assert check_metrics(["exact_match"]) == ("exact_match",)
    with pytest.raises(EnvironmentNotReady) as caught:
        check_metrics(["exact_match", "math"])
    assert caught.value.exit_code == EXIT_USAGE
    assert caught.value.lines() == [
        "the math metric needs the package 'math_verify': pip install 'tuneplex[eval]'"
    ]


def test_score_all_means_over_rows_with_a_reference():
    scores = score_all(
        names=["exact_match", "token_f1", "math"],
        predictions=["Paris", "the city of Paris", "#### 18", "unanswered", "blank"],
        references=["paris", "Paris city", "18", None, "  "],
    )
    assert scores.scored == 3
    assert scores.skipped == 2
    assert scores.means["exact_match"] == pytest.approx(1 / 3)  # "#### 18" is not "18"
    assert scores.means["token_f1"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert scores.means["math"] == pytest.approx(1 / 3)  # "paris" holds no number
    assert list(scores.means) == ["exact_match", "token_f1", "math"]


def test_score_all_edges():
    empty = score_all(names=[], predictions=["a"], references=[None])
    assert (empty.means, empty.scored, empty.skipped) == ({}, 0, 1)
    assert set(score_all(names=[], predictions=["a"], references=["a"]).means) == set(
        DEFAULT_METRICS
    )
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score_all(names=["exact_match"], predictions=["a", "b"], references=["a"])
    with pytest.raises(UsageError):
        score_all(names=["nope"], predictions=["a"], references=["a"])


def test_importing_the_metrics_imports_no_heavy_package():
    import subprocess

    code = (
        "import sys, tuneplex.inference.metrics; "
        "print(sorted({'torch', 'math_verify', 'sympy'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
