"""On a CUDA GPU: GRPO with the automodel backend learns a python reward (bf16 mixed precision,
generation on the GPU, the reference as the base with the adapter off), in one process and
with two data-parallel ranks where two GPUs are visible.

Skipped without CUDA. Run: `pytest -q -s -m gpu tests/gpu/test_gpu_grpo.py`.
"""

import json
import statistics
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)

REWARD = """
def a_share(prompts, completions, **columns):
    out = []
    for text in completions:
        letters = [ch for ch in text.lower() if ch.isalpha()]
        out.append(sum(ch == "a" for ch in letters) / max(len(letters), 1))
    return out
"""

JOB = """\
model: {model}
dataset: {{training: {root}/prompts.jsonl}}
training:
  training_type: grpo
  finetuning_type: lora
  lora: {{rank: 8, alpha: 16, target_modules: [q_proj, v_proj, lm_head]}}
  max_seq_length: 128
  grpo:
    environment: {{name: python, function: {root}/rewards.py:a_share}}
    num_prompts_per_step: 4
    num_generations_per_prompt: 8
    max_completion_length: 16
    ref_policy_kl_penalty: 0.01
    generation_top_p: 1.0
    generation_top_k: null
schedule: {{epochs: 3, max_steps: 30, seed: 0}}
optimizer: {{learning_rate: 2e-2, warmup_steps: 0}}
"""


def rewards(run) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e["reward"] for e in map(json.loads, lines) if e["split"] == "train"]


def test_grpo_learns_on_the_gpu(tmp_path, tiny_model):
    import torch

    (tmp_path / "rewards.py").write_text(REWARD)
    with (tmp_path / "prompts.jsonl").open("w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"Say something {i}"}) + "\n")
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(model=tiny_model, root=tmp_path))
    layouts = [[]] + (
        [["--set", "parallelism.num_gpus_per_node=2"]] if torch.cuda.device_count() > 1 else []
    )
    for extra in layouts:
        run = tmp_path / f"run{len(extra)}"
        proc = subprocess.run(
            [sys.executable, "-m", "tuneplex", "train", str(job), "-o", str(run), *extra],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "cuda" in proc.stdout
        r = rewards(run)
        assert statistics.mean(r[-5:]) > statistics.mean(r[:5]) + 0.1, r
