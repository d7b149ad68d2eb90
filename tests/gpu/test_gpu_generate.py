"""On a CUDA GPU: generate / eval on CUDA (the device picked when present), in the run's own
precision, and the unsloth backend's 4-bit outputs (merged_4bit, a LoRA on a 4-bit base).

Skipped without CUDA. Runs are trained in fresh `tuneplex train` processes.
"""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)


def tuneplex(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "tuneplex", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from helpers import chat_rows, write_rows

    root = tmp_path_factory.mktemp("data")
    write_rows(root / "train.jsonl", chat_rows(64))
    write_rows(root / "val.jsonl", chat_rows(8, seed=1))
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tuneplex.testing.tiny import build_llama, build_tokenizer

    out = tmp_path_factory.mktemp("llama-shaped")
    tok = build_tokenizer(out, style="llama3")
    build_llama(out, tokenizer=tok, hidden=256, layers=2, heads=4, kv_heads=2, init_std=0.1)
    return out


def test_automodel_bf16_run_on_cuda_reproduces_its_validation_loss(tmp_path, data, model_dir):
    job = tmp_path / "job.yaml"
    job.write_text(
        f"model: {model_dir}\n"
        f"dataset: {{training: {data / 'train.jsonl'}, validation: {data / 'val.jsonl'}}}\n"
        "training: {finetuning_type: lora, max_seq_length: 128, precision: bf16}\n"
        "schedule: {epochs: 2, seed: 3}\n"
        "batch: {global_batch_size: 8, micro_batch_size: 8}\n"
        "optimizer: {learning_rate: 5.0e-3}\n"
    )
    run = tmp_path / "run"
    tuneplex("train", job, "-o", run)
    got = json.loads(
        tuneplex("eval", run, "--data", data / "val.jsonl", "--json", "--no-generate").stdout
    )
    summary = json.loads((run / "summary.json").read_text())
    assert got["model"]["loss"] == pytest.approx(summary["val_loss"], abs=2e-3)
    out = tuneplex("generate", run, "--file", data / "val.jsonl", "--json").stdout
    assert len(out.splitlines()) == 8


@pytest.mark.parametrize("save", ["merged_4bit", "lora"])
def test_unsloth_4bit_outputs_generate_on_cuda(tmp_path, data, model_dir, save):
    pytest.importorskip("unsloth")
    job = tmp_path / "job.yaml"
    job.write_text(
        f"model: {{name: {model_dir}, max_seq_length: 128, load_in_4bit: true}}\n"
        f"dataset: {{path: {data / 'train.jsonl'}, apply_chat_template: true}}\n"
        "schedule: {epochs: 1, seed: 1}\n"
        "batch: {per_device_train_batch_size: 8, gradient_accumulation_steps: 1}\n"
        f"output: {{save_method: {save}}}\n"
    )
    run = tmp_path / "run"
    tuneplex("train", job, "--backend", "unsloth", "-o", run)
    out = tuneplex("generate", run, "--file", data / "val.jsonl", "--json", "--max-new-tokens", 8)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 8 and all(r["completion_tokens"] <= 8 for r in rows)
