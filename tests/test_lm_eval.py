"""lm-evaluation-harness on a tiny model built here: local task YAML over local jsonl, offline,
for the loaded model and for a PeftModel on it; and the one-line refusals of `--lm-eval`."""

from __future__ import annotations

import json
import random
import sys

import pytest
from tuneplex.errors import EXIT_USAGE, EnvironmentNotReady, UsageError

pytest.importorskip("lm_eval")
pytest.importorskip("peft")

ROWS = 8


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A folder with a multiple-choice task and a generation task over one local jsonl."""
    from tuneplex.testing.tiny import WORDS

    root = tmp_path_factory.mktemp("lm-eval-tasks")
    rng = random.Random(0)
    rows = [
        {
            "question": " ".join(rng.sample(WORDS, 4)),
            "choices": rng.sample(WORDS[:30], 3),
            "label": rng.randrange(3),
        }
        for _ in range(ROWS)
    ]
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "metadata:\n  version: 1.0\n"
    )
    (root / "mc.yaml").write_text(
        "task: tiny_choice\noutput_type: multiple_choice\n" + common + "doc_to_target: label\n"
        'doc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (root / "gen.yaml").write_text(
        "task: tiny_words\noutput_type: generate_until\n"
        + common
        + 'doc_to_target: "{{choices[label]}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 3\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    return root


@pytest.fixture(scope="module")
def loaded(tiny_model):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model)
    return model, transformers.AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def no_network():
    """Every socket connection the process tries, seen by an audit hook (nothing is replaced)."""
    seen: list[str] = []
    _WATCHERS.append(seen)
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED.append(True)
    yield seen
    _WATCHERS.remove(seen)


_WATCHERS: list[list[str]] = []
_HOOKED: list[bool] = []


def _audit(event: str, args: tuple) -> None:
    if event == "socket.connect" and _WATCHERS and isinstance(args[1], tuple):
        for seen in _WATCHERS:
            seen.append(repr(args[1]))


def test_local_multiple_choice_task_plain_and_with_lora(tasks, loaded, no_network):
    import peft
    from tuneplex.inference.harness import run_harness

    model, tokenizer = loaded
    plain = run_harness(model=model, tokenizer=tokenizer, tasks=[str(tasks / "mc.yaml")])
    acc = plain.results["results"]["tiny_choice"]["acc,none"]
    assert isinstance(acc, float)
    assert 0.0 <= acc <= 1.0
    assert plain.results["n-samples"]["tiny_choice"]["effective"] == ROWS
    assert "tiny_choice" in plain.table
    assert "acc" in plain.table
    json.dumps(plain.results, allow_nan=False)

    # a fresh LoRA has B = 0: the same log-likelihoods through the PeftModel, so the same scores
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapted = run_harness(model=lora, tokenizer=tokenizer, tasks=[str(tasks / "mc.yaml")])
    assert adapted.results["results"] == plain.results["results"]
    # ... and it was the PeftModel that ran: its LoRA weights are counted
    params = [r.results["config"]["model_num_parameters"] for r in (plain, adapted)]
    assert params[1] > params[0]
    lora.unload()  # the module's model back to plain Linear layers
    assert no_network == []


def test_generation_task_and_folder(tasks, loaded, no_network, capfd):
    from tuneplex.inference.harness import check_tasks, run_harness

    model, tokenizer = loaded
    checked = check_tasks(tasks=[str(tasks)])  # a folder: both its tasks
    assert sorted(checked.names) == ["tiny_choice", "tiny_words"]
    result = run_harness(model=model, tokenizer=tokenizer, tasks=checked, limit=2, batch_size=2)
    words = result.results["results"]["tiny_words"]
    assert 0.0 <= words["exact_match,none"] <= 1.0
    assert result.results["n-samples"]["tiny_words"]["effective"] == 2
    assert result.results["n-shot"] == {"tiny_choice": 0, "tiny_words": 0}
    cells = {cell.strip() for cell in result.table.split("|")}
    assert {"tiny_words", "tiny_choice", "exact_match", "acc"} <= cells
    json.dumps(result.results, allow_nan=False)
    assert no_network == []
    assert capfd.readouterr().out == ""  # the harness's logs and bars stay off stdout


def _refusal(tasks) -> list[str]:
    from tuneplex.inference.harness import check_tasks

    with pytest.raises(UsageError) as caught:
        check_tasks(tasks=tasks)
    assert caught.value.exit_code == EXIT_USAGE
    return caught.value.lines()


def test_missing_or_unreadable_task_files(tmp_path, tasks):
    (tmp_path / "notask.yaml").write_text("dataset_path: json\n")
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    (tmp_path / "task.yml").write_text("task: x\n")
    (tmp_path / "nodata.yaml").write_text(
        (tasks / "mc.yaml")
        .read_text()
        .replace("tiny_choice", "tiny_nodata")
        .replace(str(tasks / "rows.jsonl"), str(tmp_path / "gone.jsonl"))
    )
    missing = tmp_path / "nope.yaml"
    assert _refusal([str(missing), str(tmp_path / "notask.yaml")]) == [
        f"--lm-eval: no such task file or folder: {missing}",
        f"--lm-eval: {tmp_path / 'notask.yaml'}: no 'task:' key naming the task",
    ]
    (line,) = _refusal([str(tmp_path / "broken.yaml")])
    assert line.startswith(f"--lm-eval: {tmp_path / 'broken.yaml'}: ")
    assert _refusal([str(tmp_path / "task.yml")]) == [
        f"--lm-eval: {tmp_path / 'task.yml'}: the harness reads task files named *.yaml"
    ]
    (line,) = _refusal([str(tmp_path / "nodata.yaml")])
    assert line.startswith("--lm-eval: task 'tiny_nodata' could not be loaded: ")
    assert "gone.jsonl" in line


@pytest.mark.slow  # indexes the harness's ~15,000 built-in tasks (7-10 s)
def test_unknown_or_taken_task_names(tmp_path, tasks):
    """One index build for both: a name the harness does not know, and two local files of one
    task name (the harness would run only the first)."""
    mc = (tasks / "mc.yaml").read_text().replace("tiny_choice", "tiny_twice")
    (tmp_path / "a.yaml").write_text(mc)
    (tmp_path / "b.yaml").write_text(mc)
    assert _refusal(["arc_easy,arc_eassy", str(tmp_path / "b.yaml")]) == [
        "--lm-eval: unknown task 'arc_eassy'; did you mean 'arc_easy'? "
        "(a name lm_eval knows, or a .yaml)",
        f"--lm-eval: {tmp_path / 'b.yaml'}: the task name 'tiny_twice' is also "
        f"{tmp_path / 'a.yaml'}'s; rename one",
    ]


def test_without_lm_eval_is_refused(monkeypatch, tasks):
    from tuneplex.inference.harness import check_tasks

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(EnvironmentNotReady) as caught:
        check_tasks(tasks=[str(tasks / "mc.yaml")])
    assert caught.value.exit_code == EXIT_USAGE
    assert caught.value.lines() == [
        "--lm-eval needs the package 'lm_eval': pip install 'tuneplex[eval]'"
    ]


def test_importing_the_module_imports_no_harness():
    import subprocess

    code = "import sys, tuneplex.inference.harness; print('lm_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
