"""On a CUDA GPU with unsloth installed: GRPO through TRL's GRPOTrainer as unsloth patches it
(its own log-probabilities and loss), LoRA on a 4-bit and a 16-bit base and full weights with a
frozen reference copy.

Skipped without CUDA. Each run is a fresh `tuneplex train` process (unsloth must be imported
before transformers, which this test process has already imported).
"""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)

REWARDS = """\
def e_share(prompts, completions, **columns):
    return [c.count("e") / max(len(c), 1) for c in completions]

def brevity(prompts, completions, **columns):
    return [1.0 / (1 + len(c)) for c in completions]
"""

FIGURES = (
    "reward",
    "reward_std",
    "reward/e_share",
    "reward/brevity",
    "kl",
    "clip_fraction",
    "completion_length",
    "truncated_fraction",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tuneplex.testing.tiny import build_llama, build_tokenizer

    out = tmp_path_factory.mktemp("llama-shaped")
    tok = build_tokenizer(out, style="llama3")
    build_llama(
        out,
        tokenizer=tok,
        hidden=512,
        layers=4,
        heads=8,
        kv_heads=4,
        intermediate=1536,
        init_std=0.1,
    )
    return out


def grpo_job(tmp_path, model_dir, *, bits4: bool, ft: str, lr: float) -> str:
    from helpers import chat_rows, write_rows

    data = tmp_path / "prompts.jsonl"
    write_rows(data, chat_rows(64))
    (tmp_path / "rewards.py").write_text(REWARDS)
    return (
        f"model: {{name: {model_dir}, max_seq_length: 256, load_in_4bit: {str(bits4).lower()}}}\n"
        f"dataset: {{path: {data}, apply_chat_template: true}}\n"
        f"training:\n  training_type: grpo\n  finetuning_type: {ft}\n"
        "  grpo:\n"
        "    environment: {name: multi, rewards: [{name: python, function: rewards.py:e_share},"
        " {name: python, function: rewards.py:brevity}], weights: [1.0, 0.1]}\n"
        "    num_prompts_per_step: 2\n"
        "    num_generations_per_prompt: 8\n"
        "    max_completion_length: 32\n"
        "    ref_policy_kl_penalty: 0.04\n"
        "    rollout_log_steps: 10\n"
        "schedule: {max_steps: 30}\n"
        "batch: {per_device_train_batch_size: 8}\n"
        f"optimizer: {{learning_rate: {lr}}}\n"
    )


def tuneplex_train(job, run, cwd) -> tuple[dict, list[dict]]:
    """`tuneplex train JOB --backend unsloth` in a fresh process: (summary, metrics events)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tuneplex", "train", str(job), "--backend", "unsloth", "-o", run],
        capture_output=True,
        text=True,
        cwd=cwd,  # the reward file is found from the working directory
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["loader"] == "unsloth" and summary["status"] == "completed"
    return summary, [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("bits4", "ft", "lr"),
    [(True, "lora", 1e-3), (False, "lora", 1e-3), (False, "all_weights", 2e-5)],
)
def test_unsloth_grpo_raises_the_reward(model_dir, tmp_path, bits4, ft, lr):
    """Every mapped figure on every step, the first step's KL zero (policy = reference), the
    reward higher at the end than at the start, rollouts written, and a final/ that loads."""
    job = tmp_path / "job.yaml"
    job.write_text(grpo_job(tmp_path, model_dir, bits4=bits4, ft=ft, lr=lr))
    run = tmp_path / "run"
    summary, events = tuneplex_train(job, run, tmp_path)
    train = [e for e in events if e["split"] == "train"]
    assert len(train) == 30
    assert all(set(FIGURES) <= set(e) for e in train), train[0]
    assert abs(train[0]["kl"]) < 1e-3, train[0]
    first = sum(e["reward"] for e in train[:5]) / 5
    last = sum(e["reward"] for e in train[-5:]) / 5
    assert last > first, [e["reward"] for e in train]
    rollouts = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rollouts}) == [10, 20, 30]
    from transformers import AutoModelForCausalLM

    if ft == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
        PeftModel.from_pretrained(base, run / "final")
    else:
        AutoModelForCausalLM.from_pretrained(run / "final", device_map="cuda")
    print(
        "grpo",
        ft,
        "4-bit" if bits4 else "16-bit",
        f"reward {first:.3f} -> {last:.3f},",
        summary["tokens_per_s"],
        "tok/s",
    )
