"""GRPO on the unsloth backend: the schema's rules, the settings TRL's GRPOTrainer receives, the
rewards and advantages it is given, and whole runs through `tuneplex train` on CPU with
transformers + peft standing in for unsloth (the real path: tests/gpu/test_gpu_unsloth_grpo.py).

TRL computes GRPO's log-probabilities with a Triton kernel that needs a GPU; `plain_log_probs`
puts the same maths in plain torch for these CPU runs (a test fixture, never the product)."""

from __future__ import annotations

import json
import math

import pytest
from tuneplex.errors import UsageError
from tuneplex.schema.loading import validate_job
from tuneplex_unsloth.schema import UnslothJobInput

MINIMAL = {"model": {"name": "org/base"}, "dataset": {"path": "prompts.jsonl"}}
MATH = {"environment": {"name": "math"}}


def job(grpo=None, training=None, **sections):
    grpo = {**MATH, **(grpo or {})}
    data = {**MINIMAL, "training": {"training_type": "grpo", "grpo": grpo, **(training or {})}}
    data.update(sections)
    return data


def problems(data) -> list[str]:
    with pytest.raises(UsageError) as info:
        validate_job(UnslothJobInput, data)
    return info.value.lines()


def ok(data) -> UnslothJobInput:
    return validate_job(UnslothJobInput, data)


# ------------------------------------------------------------------ schema

SAMPLES = "num_prompts_per_step × num_generations_per_prompt"


def test_grpo_needs_its_block_and_the_block_needs_grpo():
    assert problems({**MINIMAL, "training": {"training_type": "grpo"}}) == [
        "training.grpo: required when training_type is grpo (its environment)"
    ]
    sft = {**MINIMAL, "training": {"grpo": MATH}}
    assert problems(sft) == ["training.grpo: only used when training_type is grpo"]
    assert problems({**MINIMAL, "training": {"training_type": "ppo"}})[0].startswith(
        "training.training_type: must be one of: sft, dpo, grpo (got 'ppo')"
    )


@pytest.mark.parametrize(
    ("grpo", "batch", "want"),
    [
        ({}, {}, (1, 8)),  # 1 prompt × 8 completions: micro batch 1 (the default), 8 passes
        ({"num_prompts_per_step": 4}, {"per_device_train_batch_size": 8}, (8, 4)),
        ({"num_generations_per_prompt": 4}, {"gradient_accumulation_steps": 4}, (1, 4)),
        ({}, {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}, (2, 4)),
    ],
)
def test_samples_per_step_size_the_step(grpo, batch, want):
    b = ok(job(grpo, batch=batch)).batch
    assert (b.per_device_train_batch_size, b.gradient_accumulation_steps) == want


def test_a_batch_that_contradicts_the_samples_per_step_is_refused_in_one_line():
    assert problems(job(batch={"gradient_accumulation_steps": 3})) == [
        "batch.gradient_accumulation_steps: 3: per_device_train_batch_size × "
        "gradient_accumulation_steps = 1 × 3 = 3 contradicts training.grpo: "
        f"{SAMPLES} = 1 × 8 = 8; leave it out (derived) or set it to 8"
    ]
    assert problems(job(batch={"per_device_train_batch_size": 3})) == [
        "batch.per_device_train_batch_size: 3 does not divide training.grpo's samples per "
        f"step ({SAMPLES} = 1 × 8 = 8); use a divisor of 8"
    ]
    both = {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 3}
    assert problems(job(batch=both))[0].endswith(
        "set batch.per_device_train_batch_size to a divisor of 8"
    )


@pytest.mark.parametrize(
    ("grpo", "line"),
    [
        (
            {"use_importance_sampling_correction": True},
            "training.grpo.use_importance_sampling_correction: true: TRL generates with the "
            "trained model itself and keeps no generator log-probabilities (its correction is "
            "for vLLM); set it to false (or train with --backend automodel)",
        ),
        (
            {"use_on_policy_kl_approximation": True},
            "training.grpo.use_on_policy_kl_approximation: true: TRL weights the KL by the "
            "importance ratio with its gradient (use_bias_correction_kl), not by the detached "
            "ratio this setting means; set it to false (or train with --backend automodel)",
        ),
        (
            {"ratio_clip_c": 1.1, "ratio_clip_max": 0.28},
            "training.grpo.ratio_clip_c: 1.1: TRL's dual clip (delta) equals this one only "
            "above 1 + ratio_clip_max = 1.28; raise it (typically 3) or set it to null (or "
            "train with --backend automodel)",
        ),
        (
            {"overlong_filtering": True, "token_level_loss": False},
            "training.grpo.overlong_filtering: true with token_level_loss false: TRL's mean "
            "over completions (loss_type grpo) counts the filtered ones as zeros; set "
            "token_level_loss: true or overlong_filtering: false (or train with --backend "
            "automodel)",
        ),
    ],
)
def test_what_trl_cannot_compute_is_refused_in_one_line(grpo, line):
    assert problems(job(grpo)) == [line]


def test_the_kl_weighting_is_only_refused_where_there_is_a_kl():
    no_kl = {"use_on_policy_kl_approximation": True, "ref_policy_kl_penalty": 0}
    assert ok(job(no_kl)).training.grpo.use_on_policy_kl_approximation


def test_what_grpo_cannot_use_is_refused():
    lora = {"target_modules": ["q_proj", "lm_head"]}
    assert problems(job(training={"lora": lora})) == [
        "training.lora.target_modules: lm_head: TRL's GRPO scores with lm_head's weight "
        "directly, so an adapter there would never train; remove it"
    ]
    data = {"path": "p.jsonl", "packing": True, "validation_path": "v.jsonl"}
    assert problems(job(dataset=data, model={"name": "m", "max_seq_length": 256})) == [
        "dataset.packing: true: grpo trains on the completions it generates, unpacked; set it "
        "to false",
        "dataset.validation_path: grpo on the unsloth backend has no validation in this "
        "version; remove it",
        "training.grpo.max_completion_length: 256: a prompt and its completion must fit in "
        "model.max_seq_length (256); lower it or raise model.max_seq_length",
    ]


def test_the_backend_asks_the_pipeline_for_prompts_with_the_math_reference():
    from tuneplex_unsloth.backend import UnslothBackend

    math_env = {"environment": {"name": "math", "reference_column": "answer"}}
    spec = UnslothBackend().data_spec(ok(job(math_env)))
    assert (spec.prompts, spec.preference, spec.packing) == (True, False, False)
    assert (spec.reference_column, spec.reference_required) == ("answer", True)
    sft = UnslothBackend().data_spec(ok(MINIMAL))
    assert (sft.prompts, sft.reference_column, sft.reference_required) == (False, None, False)


# ------------------------------------------------------------------ what TRL receives


def test_grpo_config_translates_every_field(tmp_path):
    pytest.importorskip("trl")
    from tuneplex_unsloth.grpo import grpo_config
    from tuneplex_unsloth.trainer import training_args

    parsed = ok(
        job(
            {
                "num_prompts_per_step": 2,
                "num_generations_per_prompt": 4,
                "max_completion_length": 48,
                "policy_updates_per_step": 2,
                "ref_policy_kl_penalty": 0.05,
                "ratio_clip_min": 0.1,
                "ratio_clip_max": 0.28,
                "ratio_clip_c": 3.0,
                "overlong_filtering": True,
                "normalize_rewards": False,
                "generation_temperature": 0.7,
                "generation_top_p": 0.95,
                "generation_top_k": None,
            },
            batch={"per_device_train_batch_size": 4},
            schedule={"max_steps": 7, "seed": 5},
        )
    )
    c = grpo_config(parsed, common=training_args(parsed, tmp_path, cuda=False), weights=[1, -0.5])
    assert (c.num_generations, c.max_completion_length, c.num_iterations) == (4, 48, 2)
    assert (c.beta, c.epsilon, c.epsilon_high, c.delta) == (0.05, 0.1, 0.28, 3.0)
    assert (c.loss_type, c.scale_rewards, c.mask_truncated_completions) == ("dapo", "none", True)
    assert (c.temperature, c.top_p, c.top_k) == (0.7, 0.95, 0)
    assert not c.use_bias_correction_kl and c.reward_weights == [1, -0.5]
    assert (c.per_device_train_batch_size, c.gradient_accumulation_steps) == (4, 2)
    assert (c.generation_batch_size, c.steps_per_generation) == (8, 2)  # one generation a step
    assert (c.max_steps, c.seed, c.use_cpu, c.remove_unused_columns) == (7, 5, True, False)
    assert c.model_init_kwargs is None  # LoRA: the reference is the base, no copy
    sequence = ok(job({"token_level_loss": False, "generation_top_k": 20}))
    c = grpo_config(sequence, common=training_args(sequence, tmp_path, cuda=False), weights=None)
    assert (c.loss_type, c.scale_rewards, c.top_k, c.delta, c.reward_weights) == (
        "grpo",
        "group",
        20,
        None,
        None,
    )


def test_scorer_scores_once_per_batch_and_hands_trl_each_part(tmp_path):
    """Each TRL reward function returns its part of one `score` call; rollouts.jsonl gets the
    first prompts' completions when a step is due, and the part names are TRL's log names."""
    from tuneplex.inference.rewards import load_python_reward, multi_reward
    from tuneplex_unsloth.grpo import Scorer, figure_keys

    (tmp_path / "r.py").write_text(
        "def size(prompts, completions, **columns):\n"
        "    return [float(len(c)) for c in completions]\n"
        "def tagged(prompts, completions, tag, **columns):\n"
        "    return [1.0 if t == 'x' else 0.0 for t in tag]\n"
    )
    parts = [
        load_python_reward(f"r.py:{n}", base_dir=tmp_path, key="k") for n in ("size", "tagged")
    ]
    reward = multi_reward(rewards=parts, weights=[1.0, -2.0])
    written = []
    scorer = Scorer(reward, group=2, every=3, record=lambda **kw: written.append(kw))
    functions = scorer.functions()
    assert [f.__name__ for f in functions] == ["size", "tagged"] and scorer.weights == (1.0, -2.0)

    class State:
        global_step = 2

    kw = {
        "reference": [None, None, "7", "7"],
        "columns": [json.dumps({"tag": t}) for t in ("x", "x", "y", "y")],
        "trainer_state": State(),
        "input_ids": [[1]] * 4,
    }
    batch = (["p", "p", "q", "q"], ["a", "bb", "ccc", ""])
    got = [f(*batch, **kw) for f in functions]
    assert got == [[1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    assert scorer.last.total == [-1.0, 0.0, 3.0, 0.0]
    assert [w["step"] for w in written] == [3]  # the step being trained: global_step + 1
    first = written[0]["records"][0]
    assert first == {
        "prompt": "p",
        "completion": "a",
        "reward": -1.0,
        "reference": None,
        "rewards": {"size": 1.0, "tagged": 1.0},
    }
    State.global_step = 3  # step 4: not due (every 3)
    functions[0](*batch, **kw)
    assert len(written) == 1
    assert figure_keys(scorer.names)["reward/tagged"] == "rewards/tagged/mean"


@pytest.mark.parametrize(("use_rloo", "normalize"), [(True, True), (False, False), (True, False)])
def test_advantages_are_the_core_rule(use_rloo, normalize):
    torch = pytest.importorskip("torch")
    from tuneplex.schema.grpo import GrpoConfig
    from tuneplex_unsloth.grpo import advantage_rule

    g = GrpoConfig(environment=MATH["environment"], use_rloo=use_rloo, normalize_rewards=normalize)
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    got = advantage_rule(g)(rewards)
    r = rewards[0]
    if use_rloo:
        baseline = (r.sum() - r) / 3
        want = r - baseline
        if normalize:  # each sample's baseline members' spread
            std = torch.stack(
                [
                    torch.cat([r[:i], r[i + 1 :]]).sub(baseline[i]).square().mean().sqrt()
                    for i in range(4)
                ]
            )
            want = want / std
    else:
        want = r - r.mean()
    torch.testing.assert_close(got[0], want.float())
    assert got[1].abs().max() == 0  # equal rewards: exactly 0, never sharpened


def test_plain_log_probs_equal_trls_formula():
    """The CPU stand-in for TRL's kernel against the maths it documents: log-softmax of
    (scale × softcap(h·W + b)) / T at the target, its entropy, values and gradients."""
    torch = pytest.importorskip("torch")

    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 8, generator=g, requires_grad=True)
    w = torch.randn(11, 8, generator=g, requires_grad=True)
    b = torch.randn(11, generator=g)
    t = torch.randint(0, 11, (5,), generator=g)
    got = PlainLogProbs.apply(h, w, b, t, 0.7, 4, 3.0, 0.5, ("log_probs", "entropy", "is_top1"))
    z = 3.0 * torch.tanh((h @ w.T + b) * 0.5 / 3.0) / 0.7
    logp = z.log_softmax(-1)
    want = logp.gather(-1, t[:, None]).squeeze(-1)
    torch.testing.assert_close(got[0], want)
    torch.testing.assert_close(got[1], -(logp.exp() * logp).sum(-1))
    assert got[2] is None and got[3] is None and torch.equal(got[4], z.argmax(-1) == t)
    (gw,) = torch.autograd.grad(got[0].sum(), [w])
    (ww,) = torch.autograd.grad(want.sum(), [w])
    torch.testing.assert_close(gw, ww)


# ------------------------------------------------------------------ whole runs (CPU seam)


class PlainLogProbs:
    """`trl.trainer.utils._ChunkedLogProbFunction` in plain torch: the same arguments and the
    same five outputs (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, scale, outputs):
        import torch.nn.functional as F

        z = F.linear(hidden, weight, bias).float() * scale
        if softcap is not None:
            z = softcap * (z / softcap).tanh()
        z = z / temperature
        logp = z.log_softmax(-1)
        picked = logp.gather(-1, targets[:, None]).squeeze(-1)
        detached = logp.detach()
        return (
            picked,
            -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None,
            (2 * detached).logsumexp(-1) if "log_sum_sq_probs" in outputs else None,
            z.detach().mean(-1) if "mean_logits" in outputs else None,
            detached.argmax(-1) == targets if "is_top1" in outputs else None,
        )


@pytest.fixture
def plain_log_probs(monkeypatch):
    """TRL's Triton log-probabilities replaced by `PlainLogProbs` (CPU runs only)."""
    import trl.trainer.utils as utils

    assert hasattr(utils, "_ChunkedLogProbFunction")  # the name TRL's fused head calls
    monkeypatch.setattr(utils, "_ChunkedLogProbFunction", PlainLogProbs)


REWARDS = """\
def brevity(prompts, completions, **columns):
    return [1.0 / (1 + len(c)) for c in completions]

def echoes(prompts, completions, answer, **columns):
    return [float(a in c) for a, c in zip(answer, completions)]

def broken(prompts, completions, **columns):
    calls.append(len(completions))
    if len(calls) > 1:  # the second step
        raise ValueError("no score for " + completions[0][:10])
    return [0.0] * len(completions)

calls = []
"""

JOB = """\
model: {{name: {model}, max_seq_length: 64, load_in_4bit: false}}
dataset: {{path: {root}/prompts.jsonl}}
training:
  training_type: grpo
  use_gradient_checkpointing: false
  grpo:
    environment: {environment}
    num_prompts_per_step: 2
    num_generations_per_prompt: 4
    max_completion_length: 6
    ref_policy_kl_penalty: 0.1
    rollout_log_steps: 2
    generation_batch_size: 3
schedule: {{max_steps: {steps}, seed: 3}}
batch: {{per_device_train_batch_size: 4}}
optimizer: {{learning_rate: 5.0e-3, optim: adamw_torch}}
"""

MULTI = (
    "{name: multi, rewards: [{name: python, function: rewards.py:brevity}, "
    "{name: python, function: rewards.py:echoes}], weights: [1.0, 0.5]}"
)


def grpo_run(capsys, tmp_path, tiny_model, *, environment: str, steps: int, extra: str = ""):
    from helpers import merge_yaml, train, write_rows
    from tuneplex.testing.tiny import WORDS

    write_rows(
        tmp_path / "prompts.jsonl",
        [{"prompt": f"Say {w}", "completion": w, "answer": w} for w in WORDS[:8]],
    )
    (tmp_path / "rewards.py").write_text(REWARDS)
    text = JOB.format(model=tiny_model, root=tmp_path, environment=environment, steps=steps)
    path = tmp_path / "job.yaml"
    path.write_text(merge_yaml(text, extra))
    out = tmp_path / "run"
    return (out, *train(capsys, path, "--backend", "unsloth", "-o", out))


def test_lora_grpo_trains_logs_the_mapped_figures_and_rollouts(
    cpu_seam, plain_log_probs, capsys, tmp_path, tiny_model, monkeypatch
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from tuneplex.runs import read_metrics
    from tuneplex.testing import assert_run_directory

    monkeypatch.chdir(tmp_path)  # the reward file is found from the working directory
    out, code, stdout, err = grpo_run(capsys, tmp_path, tiny_model, environment=MULTI, steps=2)
    assert code == 0, err
    assert_run_directory(out)
    train = [e for e in read_metrics(out) if e["split"] == "train"]
    assert [e["step"] for e in train] == [1, 2]
    for e in train:
        for key in (
            "reward",
            "reward_std",
            "reward/brevity",
            "reward/echoes",
            "kl",
            "clip_fraction",
            "completion_length",
            "truncated_fraction",
        ):
            assert math.isfinite(e[key]), (key, e)
        assert e["reward"] == pytest.approx(e["reward/brevity"] + 0.5 * e["reward/echoes"])
        assert 1 <= e["completion_length"] <= 6 and 0 <= e["truncated_fraction"] <= 1
        # 8 completions a step, each after its prompt (all 3 tokens long here)
        assert e["tokens"] == 8 * (3 + e["completion_length"])
    assert train[0]["kl"] == pytest.approx(0, abs=1e-6)  # the first step is the reference
    assert "8 training prompts" in stdout
    rollouts = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rollouts} == {2} and len(rollouts) == 8  # 2 prompts × 4
    assert set(rollouts[0]) == {"step", "prompt", "completion", "reward", "reference", "rewards"}
    assert rollouts[0]["prompt"].startswith("Say ") and set(rollouts[0]["rewards"]) == {
        "brevity",
        "echoes",
    }
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training_type"] == "grpo" and summary["status"] == "completed"
    assert summary["data"]["train"]["tokens"] == 8 * 3
    assert not (out / "final" / "ref").exists()  # the reference is the base, not a saved copy
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), out / "final"
    )
    assert model.active_adapters == ["default"]


def test_trl_generates_from_the_pipelines_prompts_and_trains_on_the_core_advantages(
    cpu_seam, plain_log_probs, capsys, tmp_path, tiny_model, monkeypatch
):
    """What TRL generates from is the pipeline's rendering, ids for ids (the chat template's
    generation prompt, no second BOS), at most generation_batch_size completions at once; the
    loss gets the core's advantages (leave-one-out, normalised), not TRL's group mean."""
    import torch
    from trl import GRPOTrainer
    from tuneplex.data.pipeline import prepare
    from tuneplex.nn.grpo import advantages
    from tuneplex.plugins import registry
    from tuneplex_unsloth.grpo import Scorer

    seen, sizes, totals, theirs, trained = [], [], [], [], []
    generate, score = GRPOTrainer._generate_single_turn, Scorer.score
    rollouts, loss = GRPOTrainer._generate_and_score_completions, GRPOTrainer._compute_loss

    def spy_generate(self, prompt_ids, *args, **kwargs):
        seen.extend(prompt_ids)
        sizes.append(len(prompt_ids))
        return generate(self, prompt_ids, *args, **kwargs)

    def spy_score(self, *args):
        scored = score(self, *args)
        totals.extend(scored.total)
        return scored

    def spy_rollouts(self, inputs):
        out = rollouts(self, inputs)
        theirs.extend(out["advantages"].tolist())
        return out

    def spy_loss(self, model, inputs):
        trained.extend(inputs["advantages"].tolist())
        return loss(self, model, inputs)

    for name, spy in (
        ("_generate_single_turn", spy_generate),
        ("_generate_and_score_completions", spy_rollouts),
        ("_compute_loss", spy_loss),
    ):
        monkeypatch.setattr(GRPOTrainer, name, spy)
    monkeypatch.setattr(Scorer, "score", spy_score)
    monkeypatch.chdir(tmp_path)
    chat = "dataset: {apply_chat_template: true}"
    out, code, _, err = grpo_run(
        capsys, tmp_path, tiny_model, environment=MULTI, steps=1, extra=chat
    )
    assert code == 0, err
    backend = registry().backends["unsloth"].backend
    parsed = validate_job(backend.job_schema, json.loads((out / "job.json").read_text()))
    ids = {tuple(r) for r in prepare(backend.data_spec(parsed)).train.dataset["input_ids"]}
    assert sizes == [3, 3, 2]  # 8 completions, 3 at a time
    assert {tuple(s) for s in seen} <= ids and len(seen) == 8
    want = advantages(
        torch.tensor(totals, dtype=torch.float64).view(2, 4), use_rloo=True, normalize_rewards=True
    )
    assert want.abs().max() > 0 and sorted(trained) == pytest.approx(sorted(want.view(-1).tolist()))
    assert sorted(theirs) != pytest.approx(sorted(trained))  # TRL's own rule differs


def test_a_reward_that_raises_stops_the_run_with_its_line(
    cpu_seam, plain_log_probs, capsys, tmp_path, tiny_model, monkeypatch
):
    """One line with the reward's own file:line, exit 1, summary.json `failed` at the step in
    progress, and the last completed step saved as a checkpoint to resume from."""
    from helpers import train
    from tuneplex.runs.checkpoints import checkpoint_path, complete_checkpoints

    monkeypatch.chdir(tmp_path)
    env = "{name: python, function: rewards.py:broken}"
    out, code, _, err = grpo_run(capsys, tmp_path, tiny_model, environment=env, steps=3)
    assert code == 1
    at = REWARDS.splitlines().index(
        '        raise ValueError("no score for " + completions[0][:10])'
    )
    line = f"{tmp_path / 'rewards.py'}:{at + 1}: reward 'broken' raised ValueError: no score for "
    assert line in err, err
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["failed_step"], summary["steps"]) == ("failed", 2, 1)
    assert summary["error"].startswith(line)
    assert summary["last_checkpoint"] == str(checkpoint_path(out, 1))
    assert [s for s, _ in complete_checkpoints(out)] == [1]
    (tmp_path / "rewards.py").write_text(REWARDS.replace("len(calls) > 1", "False"))  # fixed
    code, _, err = train(
        capsys, tmp_path / "job.yaml", "--backend", "unsloth", "-o", out, "--resume"
    )
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["steps"]) == ("completed", 3)


def test_a_missing_reward_function_is_refused_before_training(
    capsys, tmp_path, tiny_model, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards.py").write_text(REWARDS)
    env = "{name: python, function: rewards.py:missing}"
    _, code, _, err = grpo_run(capsys, tmp_path, tiny_model, environment=env, steps=1)
    assert code == 2 and "training.grpo.environment.function: " in err
    assert "no function 'missing'" in err
