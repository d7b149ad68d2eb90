"""GRPO rewards on hand-made batches: the math reward against GSM8K- and LaTeX-style references,
the user's Python reward loaded from a real file or module, weighted multi rewards, and the
one-line refusals (before training) and stops (while training) for everything that goes wrong."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from tuneplex.data.formats import reference_of
from tuneplex.errors import (
    EXIT_FAILURE,
    EXIT_USAGE,
    EnvironmentNotReady,
    TrainingStopped,
    UsageError,
)
from tuneplex.inference.rewards import (
    REWARD_NAMES,
    Scored,
    load_python_reward,
    math_reward,
    multi_reward,
    score,
)

KEY = "grpo.reward.function"


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def line_of(path: Path, text: str) -> int:
    """The 1-based number of the line of `path` that holds `text`."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def one_line_error(exc_info) -> str:
    lines = exc_info.value.lines()
    assert len(lines) == 1 and "\n" not in lines[0]
    return lines[0]


def test_reward_names():
    assert REWARD_NAMES == ("math", "python", "multi")


# --- math ----------------------------------------------------------------------------------------


def test_math_reward_scores_final_answers_against_references():
    pytest.importorskip("math_verify")
    reward = math_reward(reference_column="answer")
    completions = [
        "Each box holds 617, so two hold 1234.",  # GSM8K reference with a thousands comma
        "The total is 1235.",  # wrong
        "So x = 0.5",  # \boxed{\frac12}
        "#### 3",  # wrong
        "The answer is 42.",  # a JSON number as reference
        "I do not know.",  # no number at all
    ]
    answers = [
        "617 * 2 = 1234\n#### 1,234",
        "#### 1,234",
        "x = \\boxed{\\frac12}",
        "\\boxed{\\frac12}",
        42,
        "#### 7",
    ]
    scored = score(
        reward=reward, prompts=["q"] * 6, completions=completions, columns={"answer": answers}
    )
    assert scored == Scored(
        total=[1.0, 0.0, 1.0, 0.0, 1.0, 0.0], parts={"math": [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]}
    )


def test_math_reward_refused_before_training_without_math_verify(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if not installed
    with pytest.raises(EnvironmentNotReady) as exc:
        math_reward(reference_column="answer")
    assert exc.value.exit_code == EXIT_USAGE
    assert one_line_error(exc) == (
        "the math metric needs the package 'math_verify': pip install 'tuneplex[eval]'"
    )


def check_reference(*, row, column, where):
    return reference_of(row, column=column, where=where, what="the math reward's reference")


def test_check_reference_refuses_rows_without_one():
    assert check_reference(row={"q": "x", "answer": "#### 4"}, column="answer", where="d:1") == (
        "#### 4"
    )
    assert check_reference(row={"answer": 4}, column="answer", where="d:1") == "4"
    with pytest.raises(UsageError) as exc:
        check_reference(row={"q": "x", "ans": "4"}, column="answer", where="data.jsonl:3")
    assert one_line_error(exc) == (
        "data.jsonl:3: column 'answer' (the math reward's reference) missing; row has: q, ans"
    )
    with pytest.raises(UsageError) as exc:
        check_reference(row={"answer": "  "}, column="answer", where="data.jsonl:4")
    assert one_line_error(exc) == (
        "data.jsonl:4: column 'answer' (the math reward's reference) is blank; "
        "expected the answer as text"
    )
    with pytest.raises(UsageError) as exc:
        check_reference(row={"answer": None}, column="answer", where="data.jsonl:5")
    assert "(the math reward's reference) is a null;" in one_line_error(exc)


# --- python --------------------------------------------------------------------------------------

LENGTHS = """\
def length_penalty(prompts, completions, **columns):
    return [-len(c) / 10 for c in completions]


def echo_columns(prompts, completions, **columns):
    # 1.0 where the completion equals the row's `target` column
    assert sorted(columns) == ["level", "target"], columns
    assert all(isinstance(v, list) for v in columns.values())
    return [float(c == t) for c, t in zip(completions, columns["target"])]


class Helper:
    pass


limit = 3
"""


def test_python_reward_from_a_relative_file_gets_columns_as_keyword_lists(tmp_path):
    write(tmp_path / "rewards" / "mine.py", LENGTHS)
    reward = load_python_reward("rewards/mine.py:echo_columns", base_dir=tmp_path, key=KEY)
    assert reward.name == "echo_columns"
    assert reward.file == tmp_path / "rewards" / "mine.py"
    scored = score(
        reward=reward,
        prompts=["a", "b", "c"],
        completions=["x", "y", "z"],
        columns={"target": ["x", "n", "z"], "level": [1, 2, 3]},
    )
    assert scored == Scored(total=[1.0, 0.0, 1.0], parts={"echo_columns": [1.0, 0.0, 1.0]})


def test_python_reward_from_a_module_on_sys_path(tmp_path, monkeypatch):
    write(tmp_path / "pkg" / "__init__.py", "")
    write(tmp_path / "pkg" / "scoring.py", LENGTHS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pkg", raising=False)
    monkeypatch.delitem(sys.modules, "pkg.scoring", raising=False)
    reward = load_python_reward("pkg.scoring:length_penalty", base_dir=Path("/"), key=KEY)
    assert reward.file == tmp_path / "pkg" / "scoring.py"
    scored = score(reward=reward, prompts=["p", "p"], completions=["ab", "abcd"], columns={})
    assert scored.total == pytest.approx([-0.2, -0.4])


def test_a_reward_file_imports_its_neighbours_without_leaving_them_on_sys_path(tmp_path):
    write(tmp_path / "helpers_for_reward.py", "BONUS = 2.0\n")
    write(
        tmp_path / "reward.py",
        """\
        from helpers_for_reward import BONUS

        def bonus(prompts, completions, **columns):
            return [BONUS] * len(completions)
        """,
    )
    path_before = list(sys.path)
    try:
        reward = load_python_reward("reward.py:bonus", base_dir=tmp_path, key=KEY)
        assert sys.path == path_before
        assert score(reward=reward, prompts=["p"], completions=["c"], columns={}).total == [2.0]
    finally:
        sys.modules.pop("helpers_for_reward", None)


def test_the_same_file_loads_twice_as_two_modules(tmp_path):
    write(tmp_path / "r.py", "state = []\ndef f(prompts, completions, **c):\n    return [0] * 1\n")
    first = load_python_reward("r.py:f", base_dir=tmp_path, key=KEY)
    second = load_python_reward(f"{tmp_path / 'r.py'}:f", base_dir=Path("/elsewhere"), key=KEY)
    assert first.function.__module__ != second.function.__module__
    assert first.function.__module__ in sys.modules  # dataclasses and pickle find it


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "rewards.py",
            "expected path/to/file.py:function or package.module:function (got 'rewards.py')",
        ),
        (
            "rewards.py:",
            "expected path/to/file.py:function or package.module:function (got 'rewards.py:')",
        ),
        (":f", "expected path/to/file.py:function or package.module:function (got ':f')"),
        ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
        ("mine:length_penalty", "no module named 'mine'; did you mean 'mine.py:length_penalty'?"),
    ],
)
def test_python_reward_spec_refusals(tmp_path, spec, message):
    write(tmp_path / "mine.py", LENGTHS)
    with pytest.raises(UsageError) as exc:
        load_python_reward(spec, base_dir=tmp_path, key=KEY)
    assert exc.value.exit_code == EXIT_USAGE
    assert one_line_error(exc) == f"{KEY}: {message}"


def test_python_reward_file_refusals(tmp_path):
    path = write(tmp_path / "mine.py", LENGTHS)
    cases = {
        "missing.py:f": f"{tmp_path / 'missing.py'}: no such file",
        "mine.py:length_penalti": (
            f"{path}: no function 'length_penalti'; it defines Helper, echo_columns, "
            "length_penalty; did you mean 'length_penalty'?"
        ),
        "mine.py:limit": f"{path}: 'limit' is 3 (int), not a function",
    }
    for spec, message in cases.items():
        with pytest.raises(UsageError) as exc:
            load_python_reward(spec, base_dir=tmp_path, key=KEY)
        assert one_line_error(exc) == f"{KEY}: {message}", spec
    empty = write(tmp_path / "empty.py", "import os\nx = 1\n")
    with pytest.raises(UsageError) as exc:
        load_python_reward("empty.py:f", base_dir=tmp_path, key=KEY)
    assert one_line_error(exc) == f"{KEY}: {empty}: no function 'f'; it defines no functions"


def test_a_file_that_fails_to_import_is_refused_at_its_own_line(tmp_path):
    broken = write(tmp_path / "broken.py", "import os\n\nWEIGHT = undefined_name * 2\n")
    with pytest.raises(UsageError) as exc:
        load_python_reward("broken.py:f", base_dir=tmp_path, key=KEY)
    assert one_line_error(exc) == (
        f"{KEY}: {broken}:3: importing it raised NameError: name 'undefined_name' is not defined"
    )
    assert isinstance(exc.value.__cause__, NameError)
    bad = write(tmp_path / "bad.py", "def f(:\n    pass\n")
    with pytest.raises(UsageError) as exc:
        load_python_reward("bad.py:f", base_dir=tmp_path, key=KEY)
    assert one_line_error(exc).startswith(f"{KEY}: {bad}:1: importing it raised SyntaxError: ")
    assert not any(n.endswith(("_broken", "_bad")) for n in sys.modules)


# --- multi ---------------------------------------------------------------------------------------


def test_multi_reward_total_is_the_weighted_sum_and_parts_stay_apart(tmp_path):
    write(tmp_path / "mine.py", LENGTHS)
    length = load_python_reward("mine.py:length_penalty", base_dir=tmp_path, key=KEY)
    exact = load_python_reward("mine.py:echo_columns", base_dir=tmp_path, key=KEY)
    multi = multi_reward(rewards=[exact, length, exact], weights=[2.0, 0.5, -1.0])
    assert multi.names == ("echo_columns", "length_penalty", "echo_columns#2")
    scored = score(
        reward=multi,
        prompts=["p", "p"],
        completions=["yes", "abcdefghij"],
        columns={"target": ["yes", "no"], "level": [0, 0]},
    )
    assert scored.parts == {
        "echo_columns": [1.0, 0.0],
        "length_penalty": pytest.approx([-0.3, -1.0]),
        "echo_columns#2": [1.0, 0.0],
    }
    assert scored.total == pytest.approx([2.0 - 0.15 - 1.0, -0.5])


def test_multi_reward_needs_matching_weights(tmp_path):
    write(tmp_path / "mine.py", LENGTHS)
    length = load_python_reward("mine.py:length_penalty", base_dir=tmp_path, key=KEY)
    with pytest.raises(ValueError, match="2 weights for 1 rewards"):
        multi_reward(rewards=[length], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="at least one reward"):
        multi_reward(rewards=[], weights=[])
    assert multi_reward(rewards=[length]).weights == (1.0,)


# --- failures while training ---------------------------------------------------------------------

RAISING = """\
import json


def parse_score(text):
    return json.loads(text)["score"]


def judged(prompts, completions, **columns):
    return [parse_score(c) for c in completions]


def strict(prompts, completions, **columns):
    if len(completions) > 1:
        raise ValueError("batch too large\\nsecond line")
    return [1.0]


def no_columns(prompts, completions):
    return [0.0] * len(completions)
"""


def test_a_raising_reward_stops_training_at_its_own_line(tmp_path):
    path = write(tmp_path / "judge.py", RAISING)
    reward = load_python_reward("judge.py:strict", base_dir=tmp_path, key=KEY)
    with pytest.raises(TrainingStopped) as exc:
        score(reward=reward, prompts=["p", "q"], completions=["a", "b"], columns={})
    assert exc.value.exit_code == EXIT_FAILURE
    assert one_line_error(exc) == (
        f"{path}:{line_of(path, 'raise ValueError')}: reward 'strict' raised ValueError: "
        "batch too large"
    )
    assert isinstance(exc.value.__cause__, ValueError)


def test_a_failure_inside_a_library_points_at_the_reward_files_line(tmp_path):
    path = write(tmp_path / "judge.py", RAISING)
    reward = load_python_reward("judge.py:judged", base_dir=tmp_path, key=KEY)
    with pytest.raises(TrainingStopped) as exc:
        score(reward=reward, prompts=["p"], completions=["not json"], columns={})
    message = one_line_error(exc)
    # json raised it, two frames below; the innermost line of the user's file is what to read
    assert message.startswith(
        f"{path}:{line_of(path, 'json.loads')}: reward 'judged' raised JSONDecodeError: "
    )


def test_a_reward_with_the_wrong_signature_points_at_its_def(tmp_path):
    path = write(tmp_path / "judge.py", RAISING)
    reward = load_python_reward("judge.py:no_columns", base_dir=tmp_path, key=KEY)
    with pytest.raises(TrainingStopped) as exc:
        score(reward=reward, prompts=["p"], completions=["c"], columns={"answer": ["4"]})
    assert one_line_error(exc) == (
        f"{path}:{line_of(path, 'def no_columns')}: reward 'no_columns' raised TypeError: "
        "no_columns() got an unexpected keyword argument 'answer'"
    )


RETURNS = """\
import math


def returns(prompts, completions, value=None, **columns):
    return value[0]
"""


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ([1.0, 2.0, 3.0], "returned 3 values for 4 completions"),
        ([1.0, 0.0, "abc", 1.0], "value [2] is 'abc' (str), not a number"),
        ([1.0, None, 0.0, 1.0], "value [1] is None (NoneType), not a number"),
        ([1.0, 0.0, 0.5, float("nan")], "value [3] is nan"),
        ([1.0, float("-inf"), 0.5, 1.0], "value [1] is -inf"),
        ([1.0, 10**400, 0.5, 1.0], "value [1] is too large for a float"),
        ([1.0, 1j, 0.5, 1.0], "value [1] is 1j (complex), not a number"),
        (0.5, "returned 0.5 (float), not a list of numbers"),
        ({"a": 1}, "returned {'a': 1} (dict), not a list of numbers"),
    ],
)
def test_unusable_results_stop_training(tmp_path, returned, message):
    path = write(tmp_path / "returns.py", RETURNS)
    reward = load_python_reward("returns.py:returns", base_dir=tmp_path, key=KEY)
    with pytest.raises(TrainingStopped) as exc:
        score(
            reward=reward,
            prompts=["p"] * 4,
            completions=["c"] * 4,
            columns={"value": [returned] * 4},
        )
    assert one_line_error(exc) == f"{path}: reward 'returns' {message}"


def test_tuples_bools_and_arrays_are_values(tmp_path):
    write(tmp_path / "returns.py", RETURNS)
    reward = load_python_reward("returns.py:returns", base_dir=tmp_path, key=KEY)

    def scored(returned):
        columns = {"value": [returned] * 3}
        return score(reward=reward, prompts=["p"] * 3, completions=["c"] * 3, columns=columns)

    assert scored((1, True, False)).total == [1.0, 1.0, 0.0]
    np = pytest.importorskip("numpy")
    assert scored(np.array([0.5, 1, 2], dtype=np.float32)).total == [0.5, 1.0, 2.0]
    assert scored([np.float32(0.25), np.int64(2), np.bool_(True)]).total == [0.25, 2.0, 1.0]
    with pytest.raises(TrainingStopped, match=r"reward 'returns' returned a 2-D array"):
        scored(np.ones((3, 1)))
    torch = pytest.importorskip("torch")
    assert scored(torch.tensor([1.0, 0.0, 0.5])).total == [1.0, 0.0, 0.5]
    assert scored([torch.tensor(1.0), torch.tensor(True), 0]).total == [1.0, 1.0, 0.0]
    with pytest.raises(TrainingStopped, match=r"value \[0\] is nan"):
        scored(torch.tensor([float("nan"), 0.0, 0.5]))
