"""On a CUDA GPU with unsloth installed: the reference-free preference losses through TRL's
ORPOTrainer (orpo) and CPOTrainer (simpo) as unsloth patches them, LoRA on a 4-bit and a 16-bit
base and full weights.

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

DPO = {
    "orpo": "{loss_type: orpo, ref_policy_kl_penalty: 0.5}",
    "simpo": "{loss_type: simpo, ref_policy_kl_penalty: 2.0, simpo_gamma: 0.5}",
}


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


@pytest.mark.parametrize(
    ("bits4", "ft", "lr"),
    [(True, "lora", 5e-4), (False, "lora", 5e-4), (False, "all_weights", 5e-5)],
)
@pytest.mark.parametrize("loss_type", sorted(DPO))
def test_unsloth_reference_free_loss_learns_a_preference(
    model_dir, tmp_path, loss_type, bits4, ft, lr
):
    """The held-out reward accuracy (β × average log-prob, chosen over rejected) rises from the
    starting model's to above chance, the loss falls, and final/ loads."""
    from helpers import preference_rows, write_rows

    def swapped(rows):  # "no." preferred: the side a fresh model has no reason to favour
        return [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]

    train, val = tmp_path / "pairs.jsonl", tmp_path / "val-pairs.jsonl"
    write_rows(train, swapped(preference_rows(64, seed=0)))
    write_rows(val, swapped(preference_rows(16, seed=1)))
    job = tmp_path / "job.yaml"
    job.write_text(
        f"model: {{name: {model_dir}, max_seq_length: 256, load_in_4bit: {str(bits4).lower()}}}\n"
        f"dataset: {{path: {train}, validation_path: {val}}}\n"
        f"training: {{training_type: dpo, finetuning_type: {ft}, dpo: {DPO[loss_type]}}}\n"
        "schedule: {max_steps: 32, eval_steps: 16}\n"
        "batch: {per_device_train_batch_size: 4}\n"
        f"optimizer: {{learning_rate: {lr}}}\n"
    )
    run = tmp_path / "run"
    command = ["train", str(job), "--backend", "unsloth", "-o", str(run)]
    proc = subprocess.run(
        [sys.executable, "-m", "tuneplex", *command],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["loader"] == "unsloth" and summary["status"] == "completed"
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val_events = [e for e in events if e["split"] == "val"]
    before, after = val_events[0], val_events[-1]
    assert after["rewards/accuracy"] > max(0.5, before["rewards/accuracy"]), val_events
    assert after["loss"] < before["loss"], val_events
    assert not (run / "final" / "ref").exists()  # no reference adapter
    from transformers import AutoModelForCausalLM

    if ft == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
        PeftModel.from_pretrained(base, run / "final")
    else:
        AutoModelForCausalLM.from_pretrained(run / "final", device_map="cuda")
    print(loss_type, ft, "4-bit" if bits4 else "16-bit", summary["tokens_per_s"], "tok/s")
