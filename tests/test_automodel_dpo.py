"""Preference tuning with the automodel backend, end to end through `tuneplex train`: the first
step's loss is ln 2 with every reward 0, a tiny model learns a preference, resume equals an
uninterrupted run, data and tensor parallelism equal one process, final/ loads."""

from __future__ import annotations

import json
import math
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers import (  # noqa: E402
    assert_same_final,
    assert_same_run,
    cli,
    layout,
    load_final,
    preference_rows,
    write_rows,
)
from tuneplex.runs import read_metrics  # noqa: E402

pytestmark = pytest.mark.slow  # whole runs through the CLI: the slow tier


JOB = """\
model: {model}
dataset: {{training: {root}/pairs.jsonl, validation: {root}/val-pairs.jsonl}}
training:
  training_type: dpo
  finetuning_type: {ft}
  max_seq_length: 64
  precision: fp32
  dpo: {{ref_policy_kl_penalty: 0.1{dpo}}}
schedule: {{epochs: {epochs}, seed: 3, val_check_interval: 0.5}}
batch: {{global_batch_size: 4, micro_batch_size: 2}}
optimizer: {{learning_rate: {lr}, warmup_steps: 1}}
output: {{checkpoint_steps: 3}}
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    for name, n, seed in (("pairs", 14, 0), ("val-pairs", 8, 1)):
        write_rows(root / f"{name}.jsonl", preference_rows(n, seed=seed))
    return root


def job(root, tiny_model, name: str, *, ft="lora", epochs=1, lr=5e-3, dpo="") -> str:
    path = root / f"{name}.yaml"
    text = JOB.format(model=tiny_model, root=root, ft=ft, epochs=epochs, lr=lr, dpo=dpo)
    path.write_text(text)
    return path


def events(run, split: str) -> list[dict]:
    return [e for e in read_metrics(run) if e["split"] == split]


@pytest.fixture(scope="module")
def single(root, tiny_model):
    """One-process runs: {finetuning type: run}."""
    runs = {}
    for ft in ("lora", "all_weights"):
        runs[ft] = root / f"single-{ft}"
        cli(job(root, tiny_model, ft, ft=ft), "-o", runs[ft])
    return runs


@pytest.mark.parametrize("ft", ["lora", "all_weights"])
def test_first_step_is_ln2_and_final_loads(single, ft):
    train, val = events(single[ft], "train"), events(single[ft], "val")
    assert len(train) == 4  # 14 pairs, 4 per step
    first = train[0]
    assert math.isclose(first["loss"], math.log(2), rel_tol=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
        assert abs(first[key]) < 1e-5, (key, first)
    assert val[0]["step"] == 0 and math.isclose(val[0]["loss"], math.log(2), rel_tol=1e-5)
    assert "sft_loss" not in first
    summary = json.loads((single[ft] / "summary.json").read_text())
    assert summary["status"] == "completed"
    model = load_final(single[ft], ft)
    assert model is not None


def test_a_tiny_model_learns_the_preference(root, tiny_model):
    """Three epochs: reward accuracy on the validation pairs well above chance, and the policy's
    log-prob gap (chosen − rejected) grows beyond the reference's (the margin grows)."""
    run = root / "learns"
    cli(job(root, tiny_model, "learns", epochs=3, lr=1e-2), "-o", run)
    val = events(run, "val")
    assert val[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    last = val[-1]
    assert last["rewards/accuracy"] >= 0.75, val
    assert last["rewards/margin"] > 0.05, val
    assert last["loss"] < val[0]["loss"] - 0.02, val


def test_sft_part_is_reported_and_weighted(root, tiny_model):
    run = root / "with-sft"
    cli(job(root, tiny_model, "with-sft", dpo=", sft_loss_weight: 0.5"), "-o", run)
    first = events(run, "train")[0]
    assert first["sft_loss"] > 0
    # step 1: the preference part is ln 2, so the loss is ln 2 + 0.5 × the SFT part
    assert math.isclose(first["loss"], math.log(2) + 0.5 * first["sft_loss"], rel_tol=1e-5)
    assert "sft_loss" in events(run, "val")[-1]


def test_resume_equals_an_uninterrupted_run(root, tiny_model, single):
    run = root / "resumed"
    path = job(root, tiny_model, "lora")
    cli(path, "-o", run)
    shutil.rmtree(run / "final")
    for step in (4,):
        shutil.rmtree(run / "checkpoints" / f"step_{step}", ignore_errors=True)
    cli(path, "-o", run, "--resume")
    assert_same_run(single["lora"], run)
    assert_same_final(single["lora"], run)


@pytest.mark.parametrize("ft", ["lora", "all_weights"])
@pytest.mark.parametrize("tp", [1, 2], ids=["dp2", "tp2"])
def test_parallel_runs_equal_one_process(root, tiny_model, single, ft, tp):
    run = root / f"p2-tp{tp}-{ft}"
    cli(job(root, tiny_model, ft, ft=ft), "-o", run, *layout(2, tensor_parallel_size=tp))
    assert_same_run(single[ft], run)
    assert_same_final(single[ft], run)
