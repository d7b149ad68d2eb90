"""GRPO with the automodel backend: the job settings and their refusals, then whole runs through
`tuneplex train` — a tiny model learns a python reward (full weights, and LoRA with the head
adapted), two data-parallel ranks equal one process, resume equals an uninterrupted run, a
reward that fails stops the run with its own file:line, the math reward and validation."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys

import pytest
from tuneplex.errors import UsageError
from tuneplex.runs import read_metrics
from tuneplex.schema.loading import validate_job
from tuneplex_automodel.schema import AutomodelJobInput

A_SHARE = '''
def a_share(prompts, completions, **columns):
    """The share of a completion's letters that are `a`: it varies across the tokens of the
    tiny vocabulary, so a random model has something to learn."""
    out = []
    for text in completions:
        letters = [ch for ch in text.lower() if ch.isalpha()]
        out.append(sum(ch == "a" for ch in letters) / max(len(letters), 1))
    return out


def broken(prompts, completions, **columns):
    values = []
    for text in completions:
        values.append(1.0 / 0)  # the line a failure names
    return values


def too_few(prompts, completions, **columns):
    return [0.0]


_calls = []


def fails_later(prompts, completions, **columns):
    _calls.append(1)
    if len(_calls) > 1:
        raise RuntimeError("the reward service is down")
    return [0.0] * len(completions)


def length(prompts, completions, **columns):
    return [float(len(text)) for text in completions]
'''

MINIMAL = {
    "model": "org/base",
    "dataset": {"training": "train.jsonl"},
    "training": {"training_type": "grpo", "grpo": {"environment": {"name": "math"}}},
}


def job(**over):
    data = json.loads(json.dumps(MINIMAL))
    for dotted, value in over.items():
        *path, last = dotted.split("__")
        node = data
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return data


def problems(data) -> list[str]:
    with pytest.raises(UsageError) as info:
        validate_job(AutomodelJobInput, data)
    return info.value.lines()


# -- settings ----------------------------------------------------------------------------------
def test_defaults_and_samples_per_step():
    ok = validate_job(AutomodelJobInput, job(training__grpo__num_prompts_per_step=4))
    g = ok.training.grpo
    assert (g.num_generations_per_prompt, g.max_completion_length, g.policy_updates_per_step) == (
        8,
        256,
        1,
    )
    assert (g.use_rloo, g.normalize_rewards, g.ref_policy_kl_penalty, g.token_level_loss) == (
        True,
        True,
        0.01,
        True,
    )
    assert (g.generation_temperature, g.generation_top_p, g.generation_top_k) == (1.0, 0.9, 50)
    assert ok.batch.global_batch_size == 32  # prompts × generations when not given
    given = validate_job(
        AutomodelJobInput, job(training__grpo__num_prompts_per_step=4, batch__global_batch_size=32)
    )
    assert given.batch.global_batch_size == 32


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        (
            {"training__grpo__num_generations_per_prompt": 1},
            "training.grpo.num_generations_per_prompt: 1 gives every completion a zero "
            "advantage; use 2 or more (typical 4-16)",
        ),
        (
            {"batch__global_batch_size": 16},
            "batch.global_batch_size: 16 contradicts training.grpo: num_prompts_per_step × "
            "num_generations_per_prompt = 1 × 8 = 8",
        ),
        (
            {"parallelism__num_gpus_per_node": 2, "parallelism__tensor_parallel_size": 2},
            "parallelism.tensor_parallel_size: 2: grpo runs with data parallelism only",
        ),
        (
            {"parallelism__num_gpus_per_node": 2, "training__grpo__num_prompts_per_step": 3},
            "training.grpo.num_prompts_per_step: 3 prompts cannot be shared evenly by 2 "
            "data-parallel ranks",
        ),
        ({"batch__sequence_packing": True}, "batch.sequence_packing: true: grpo trains"),
        ({"training__compile": True}, "training.compile: true: grpo generates"),
        ({"training__grpo__ratio_clip_c": 1.0}, "training.grpo.ratio_clip_c: must be > 1"),
        (
            {"training__grpo__generation_pipeline_parallel_size": 2},
            "training.grpo.generation_pipeline_parallel_size: 2: generation runs in the "
            "training processes",
        ),
        (
            {"training__grpo__environment": {"name": "pyton", "function": "r.py:f"}},
            "training.grpo.environment.name: must be one of: math, python, multi (got "
            "'pyton'); did you mean 'python'?",
        ),
        (
            {"training__grpo__environment": {"name": "python"}},
            "training.grpo.environment.function: required key is missing",
        ),
        (
            {
                "training__grpo__environment": {
                    "name": "multi",
                    "rewards": [{"name": "math"}],
                    "weights": [1, 2],
                }
            },
            "training.grpo.environment.weights: 2 weights for 1 rewards",
        ),
    ],
)
def test_refusals_are_one_line_each(over, expected):
    lines = problems(job(**over))
    assert any(line.startswith(expected) for line in lines), lines


def test_grpo_block_and_type_go_together():
    data = job(training__training_type="sft")
    assert any(
        line == "training.grpo: only used when training_type is grpo" for line in problems(data)
    )
    data = job()
    del data["training"]["grpo"]
    assert "training.grpo: required when training_type is grpo (its environment)" in problems(data)


def test_a_python_reward_is_checked_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards.py").write_text(
        "raise SystemExit('this file must not run at validation')\n"
        "def a_share(prompts, completions, **kw):\n    return [0.0] * len(completions)\n"
    )
    env = {"name": "python", "function": "rewards.py:a_share"}
    validate_job(AutomodelJobInput, job(training__grpo__environment=env))
    env["function"] = "rewards.py:a_shar"
    assert problems(job(training__grpo__environment=env)) == [
        f"training.grpo.environment.function: {tmp_path}/rewards.py: no function 'a_shar'; it "
        "defines a_share; did you mean 'a_share'?"
    ]
    env["function"] = "missing.py:f"
    assert problems(job(training__grpo__environment=env)) == [
        f"training.grpo.environment.function: {tmp_path}/missing.py: no such file"
    ]
    env["function"] = "no_such_module:f"
    assert problems(job(training__grpo__environment=env)) == [
        "training.grpo.environment.function: no module named 'no_such_module'"
    ]


# -- runs ---------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")

from helpers import assert_same_final, assert_same_run, cli, layout  # noqa: E402

JOB = """\
model: {model}
dataset: {{training: {root}/prompts.jsonl}}
training:
  training_type: grpo
  finetuning_type: {ft}
  precision: fp32
  max_seq_length: 128
{lora}  grpo:
    environment: {{name: python, function: {root}/rewards.py:{reward}}}
    num_prompts_per_step: 4
    num_generations_per_prompt: 8
    max_completion_length: 8
    ref_policy_kl_penalty: {beta}
    generation_top_p: 1.0
    generation_top_k: null
    rollout_log_steps: 5
{extra}schedule: {{epochs: 3, max_steps: {steps}, seed: 0}}
optimizer: {{learning_rate: {lr}, warmup_steps: 0}}
batch: {{micro_batch_size: 8}}
output: {{checkpoint_steps: 3}}
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    with (root / "prompts.jsonl").open("w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"Say something {i}", "answer": str(i)}) + "\n")
    (root / "rewards.py").write_text(A_SHARE)
    return root


def write_job(
    root,
    model,
    name,
    *,
    ft="all_weights",
    reward="a_share",
    beta=0.0,
    steps=30,
    lr=1e-2,
    lora="",
    extra="",
):
    path = root / f"{name}.yaml"
    path.write_text(
        JOB.format(
            model=model,
            root=root,
            ft=ft,
            reward=reward,
            beta=beta,
            steps=steps,
            lr=lr,
            lora=lora,
            extra=extra,
        )
    )
    return path


def train_events(run) -> list[dict]:
    return [e for e in read_metrics(run) if e["split"] == "train"]


def rewards(run) -> list[float]:
    return [e["reward"] for e in train_events(run)]


@pytest.fixture(scope="module")
def full(root, tiny_model):
    run = root / "full"
    cli(write_job(root, tiny_model, "full"), "-o", run)
    return run


@pytest.mark.slow
def test_full_weights_learn_a_python_reward(full):
    r = rewards(full)
    assert len(r) == 30
    first, last = statistics.mean(r[:5]), statistics.mean(r[-5:])
    assert last > first + 0.15, (first, last)  # measured: ~0.09 -> ~0.4
    event = train_events(full)[-1]
    for key in (
        "reward_std",
        "kl",
        "clip_fraction",
        "completion_length",
        "truncated_fraction",
        "advantage_std",
        "generation_s",
        "training_s",
        "tokens",
    ):
        assert key in event, key
    assert event["completion_length"] <= 8
    assert event["tokens"] > 32 * 8  # prompts and completions of 32 samples
    assert (full / "curves.png").is_file()
    generated = subprocess.run(
        [sys.executable, "-m", "tuneplex", "generate", str(full), "Say something 3",
         "--max-new-tokens", "8"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )  # fmt: skip
    assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr
    samples = [json.loads(x) for x in (full / "rollouts.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 5, 10, 15, 20, 25, 30}
    assert all({"prompt", "completion", "reward", "advantage"} <= set(s) for s in samples)


@pytest.mark.slow
def test_lora_with_the_head_adapted_learns(root, tiny_model):
    """LoRA on attention and MLP layers alone cannot move a random model's logits (its final
    norm pins them); with lm_head among the targets it learns."""
    run = root / "lora-head"
    lora = "  lora: {rank: 8, alpha: 16, target_modules: [q_proj, v_proj, lm_head]}\n"
    cli(write_job(root, tiny_model, "lora-head", ft="lora", lora=lora, lr=2e-2), "-o", run)
    r = rewards(run)
    assert statistics.mean(r[-5:]) > statistics.mean(r[:5]) + 0.1, r


@pytest.mark.slow
def test_two_data_parallel_ranks_equal_one_process(root, tiny_model, full):
    run = root / "dp2"
    cli(write_job(root, tiny_model, "full"), "-o", run, *layout(2))
    assert_same_run(full, run)
    assert rewards(run) == pytest.approx(rewards(full), rel=1e-5)
    assert_same_final(full, run)


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(root, tiny_model, full):
    run = root / "resumed"
    path = write_job(root, tiny_model, "full")
    cli(path, "-o", run, "--set", "schedule.max_steps=30")
    shutil.rmtree(run / "final")
    for step in range(12, 31, 3):
        shutil.rmtree(run / "checkpoints" / f"step_{step}", ignore_errors=True)
    cli(path, "-o", run, "--resume")
    assert_same_run(full, run)
    assert rewards(run) == pytest.approx(rewards(full), rel=1e-5)
    steps = [json.loads(x)["step"] for x in (run / "rollouts.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [1, 5, 10, 15, 20, 25, 30]


@pytest.mark.slow
@pytest.mark.parametrize("ft", ["lora", "all_weights"])
def test_kl_to_the_reference_and_several_updates(root, tiny_model, ft):
    """β > 0: the reference is the base with the adapter off (LoRA) or a frozen copy (full);
    the KL is 0 at the first update and grows; with μ = 2 the second update's ratio moves and
    the clip may bite."""
    run = root / f"kl-{ft}"
    extra = ""
    path = write_job(root, tiny_model, f"kl-{ft}", ft=ft, beta=0.1, steps=4, extra=extra)
    cli(path, "-o", run, "--set", "training.grpo.policy_updates_per_step=2")
    events = train_events(run)
    assert len(events) == 4
    assert all(e["kl"] >= 0 for e in events)
    assert events[-1]["kl"] > 0
    assert any(e["clip_fraction"] > 0 or e["kl"] > 0 for e in events)


@pytest.mark.slow
def test_a_reward_that_fails_stops_the_run_with_its_line(root, tiny_model):
    run = root / "broken"
    proc = cli(
        write_job(root, tiny_model, "broken", reward="broken", steps=3), "-o", run, check=False
    )
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.returncode == 1
    line = (
        A_SHARE.splitlines().index("        values.append(1.0 / 0)  # the line a failure names") + 1
    )
    assert f"{root}/rewards.py:{line}: reward 'broken' raised ZeroDivisionError" in proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["failed_step"]) == ("failed", 1)
    run = root / "fails-later"
    proc = cli(
        write_job(root, tiny_model, "later", reward="fails_later", steps=3), "-o", run, check=False
    )
    assert proc.returncode == 1
    assert "reward 'fails_later' raised RuntimeError: the reward service is down" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["failed_step"]) == ("failed", 2)
    assert summary["last_checkpoint"].endswith("step_1")  # resumable once the reward is fixed
    assert (run / "checkpoints" / "step_1").is_dir()
    run = root / "too-few"
    proc = cli(
        write_job(root, tiny_model, "too-few", reward="too_few", steps=3), "-o", run, check=False
    )
    assert proc.returncode == 1
    assert "reward 'too_few' returned 1 values for 32 completions" in proc.stderr


MATH_JOB = """\
model: {model}
dataset:
  training: {data}
  validation: {root}/sums.jsonl
  column_mapping: {{question: question, answer: answer}}
training:
  training_type: grpo
  finetuning_type: all_weights
  precision: fp32
  max_seq_length: 128
  grpo:
    environment: {{name: math}}
    num_prompts_per_step: 4
    num_generations_per_prompt: 4
    max_completion_length: 8
schedule: {{max_steps: 2, seed: 0}}
"""


@pytest.mark.slow
def test_math_reward_needs_a_reference_and_validates(tiny_model, tmp_path):
    pytest.importorskip("math_verify")
    with (tmp_path / "sums.jsonl").open("w") as f:
        for i in range(8):
            f.write(json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}))
            f.write("\n")
    (tmp_path / "no-answer.jsonl").write_text('{"question": "What is 1 + 1?", "answer": " "}\n')
    path = tmp_path / "math.yaml"
    path.write_text(MATH_JOB.format(model=tiny_model, root=tmp_path, data=tmp_path / "sums.jsonl"))
    run = tmp_path / "math-run"
    cli(path, "-o", run)
    val = [e for e in read_metrics(run) if e["split"] == "val"]
    assert val and all(e["loss"] == -e["reward"] for e in val)
    assert len(train_events(run)) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        MATH_JOB.format(model=tiny_model, root=tmp_path, data=tmp_path / "no-answer.jsonl")
    )
    proc = cli(bad, "-o", tmp_path / "bad-run", check=False)
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"{tmp_path}/no-answer.jsonl:1: no reference answer for the reward")
    )
