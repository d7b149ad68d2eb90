"""On a CUDA GPU with unsloth installed: the real unsloth path, 4-bit and 16-bit, every save method,
and preference tuning (DPO) with TRL's DPOTrainer under unsloth's patching.

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


def tuneplex_train(job, run) -> tuple[dict, list[dict]]:
    """`tuneplex train JOB --backend unsloth` in a fresh process: (summary, metrics events)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneplex",
            "train",
            str(job),
            "--backend",
            "unsloth",
            "-o",
            str(run),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["loader"] == "unsloth" and summary["status"] == "completed"
    return summary, [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("bits4", "save_method", "dora"),
    [
        (True, "lora", False),
        (False, "merged_16bit", False),
        (True, "merged_4bit", False),
        (False, "lora", False),
        (False, "merged_16bit", True),  # DoRA: its magnitudes merged too
    ],
)
def test_unsloth_trains_and_saves(model_dir, tmp_path, bits4, save_method, dora):
    from helpers import chat_rows, write_rows

    data = tmp_path / "train.jsonl"
    write_rows(data, chat_rows(64))
    job = tmp_path / "job.yaml"
    job.write_text(
        f"model: {{name: {model_dir}, max_seq_length: 256, load_in_4bit: {str(bits4).lower()}}}\n"
        f"dataset: {{path: {data}, validation_path: {data}, apply_chat_template: true}}\n"
        "schedule: {max_steps: 20, eval_steps: 10}\n"
        "batch: {per_device_train_batch_size: 4}\n"
        "optimizer: {learning_rate: 5.0e-4}\n"
        f"output: {{save_method: {save_method}}}\n"
        + ("training: {lora: {use_dora: true}}\n" if dora else "")
    )
    run = tmp_path / "run"
    summary, events = tuneplex_train(job, run)
    val = [e["loss"] for e in events if e["split"] == "val"]
    assert val[-1] < val[0]
    final = run / "final"
    from transformers import AutoModelForCausalLM

    if save_method == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
        PeftModel.from_pretrained(base, final)
    else:
        check_merged(final, model_dir, four_bit=save_method == "merged_4bit", base_4bit=bits4)
    adapter = final if save_method == "lora" else final / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is dora
    print(
        save_method,
        "4-bit" if bits4 else "16-bit",
        summary["tokens_per_s"],
        "tok/s",
        summary["peak_memory_gib"],
        "GiB",
    )


def check_merged(final, model_dir, *, four_bit: bool, base_4bit: bool) -> None:
    """A merged final/ reloads, is stored in the bits asked for, and its logits are base +
    adapter (final/adapter/, on the base loaded as training loaded it): within bf16 rounding
    for merged_16bit; for merged_4bit (weights quantized again after the merge, an error of
    the order of a short run's adapter effect: both are printed) the same next-token choice
    at nearly every position."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from tuneplex_unsloth.export import weight_dtypes

    dtypes = weight_dtypes(final)
    assert ("U8" in dtypes) == four_bit, dtypes
    merged = AutoModelForCausalLM.from_pretrained(final, device_map="cuda").eval()
    quant = BitsAndBytesConfig(load_in_4bit=True) if base_4bit else None
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, quantization_config=quant, device_map="cuda"
    ).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (4, 32), generator=g).cuda()
    with torch.no_grad():
        plain = base(input_ids=ids).logits.float()
        adapted = PeftModel.from_pretrained(base, final / "adapter").eval()
        want = adapted(input_ids=ids).logits.float()
        got = merged(input_ids=ids).logits.float()
    assert torch.isfinite(got).all()
    err, effect = (got - want).abs().max().item(), (plain - want).abs().max().item()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(
        "merged 4-bit" if four_bit else "merged 16-bit",
        "max |merged - (base+adapter)|",
        err,
        "max |base - (base+adapter)|",
        effect,
        "argmax agreement",
        agree,
    )
    if four_bit:
        assert agree >= 0.9, (err, effect, agree)
    else:
        assert err < 0.03 * want.abs().max().item() and agree >= 0.97, (err, effect, agree)


@pytest.mark.parametrize(
    ("bits4", "ft", "lr"),
    [(True, "lora", 5e-4), (False, "lora", 5e-4), (False, "all_weights", 5e-5)],
)
def test_unsloth_dpo_learns_a_preference(model_dir, tmp_path, bits4, ft, lr):
    """First step at ln 2 (policy = reference), the validation reward accuracy above chance
    after training, and a final/ that loads."""
    import math

    from helpers import preference_rows, write_rows

    train, val = tmp_path / "pairs.jsonl", tmp_path / "val-pairs.jsonl"
    write_rows(train, preference_rows(64, seed=0))
    write_rows(val, preference_rows(16, seed=1))
    job = tmp_path / "job.yaml"
    job.write_text(
        f"model: {{name: {model_dir}, max_seq_length: 256, load_in_4bit: {str(bits4).lower()}}}\n"
        f"dataset: {{path: {train}, validation_path: {val}}}\n"
        f"training: {{training_type: dpo, finetuning_type: {ft}, "
        "dpo: {ref_policy_kl_penalty: 0.1}}\n"
        "schedule: {max_steps: 32, eval_steps: 16}\n"
        "batch: {per_device_train_batch_size: 4}\n"
        f"optimizer: {{learning_rate: {lr}}}\n"
    )
    run = tmp_path / "run"
    summary, events = tuneplex_train(job, run)
    train_events = [e for e in events if e["split"] == "train"]
    val_events = [e for e in events if e["split"] == "val"]
    assert abs(train_events[0]["loss"] - math.log(2)) < 1e-2, train_events[0]
    assert abs(train_events[0]["rewards/margin"]) < 1e-2, train_events[0]
    assert val_events[-1]["rewards/accuracy"] > 0.5, val_events
    from transformers import AutoModelForCausalLM

    if ft == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
        PeftModel.from_pretrained(base, run / "final")
    else:
        AutoModelForCausalLM.from_pretrained(run / "final", device_map="cuda")
    print("dpo", ft, "4-bit" if bits4 else "16-bit", summary["tokens_per_s"], "tok/s")
