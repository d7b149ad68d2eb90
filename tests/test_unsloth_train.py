"""`tuneplex train --backend unsloth`: the whole wiring on CPU, with transformers + peft (+
bitsandbytes 4-bit) standing in for unsloth's FastLanguageModel behind the loader seam.

The real unsloth path needs CUDA: see tests/gpu/test_gpu_unsloth.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("bitsandbytes")

from helpers import chat_rows, losses, merge_yaml, train, write_rows  # noqa: E402
from tuneplex.runs import read_metrics  # noqa: E402
from tuneplex.testing import assert_run_directory, reference_val_loss  # noqa: E402


@pytest.fixture
def job(tmp_path, tiny_model):
    train_path, val_path = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    write_rows(train_path, chat_rows(16))
    write_rows(val_path, chat_rows(6, seed=1))

    def _job(extra: str = "") -> str:
        text = f"""\
model: {{name: {tiny_model}, max_seq_length: 128, load_in_4bit: false}}
dataset: {{path: {train_path}, validation_path: {val_path}, apply_chat_template: true}}
training: {{use_gradient_checkpointing: false}}
schedule: {{epochs: 4, seed: 1, eval_steps: 8}}
batch: {{per_device_train_batch_size: 2, gradient_accumulation_steps: 2}}
optimizer: {{learning_rate: 1.0e-2}}
"""
        path = tmp_path / "job.yaml"
        path.write_text(merge_yaml(text, extra))
        return str(path)

    return _job


def run(capsys, path, out, *extra):
    return train(capsys, path, "--backend", "unsloth", "-o", out, *extra)


def test_without_a_gpu_train_stops_first_with_one_line(capsys, job, tmp_path):
    code, _, err = run(capsys, job(), tmp_path / "r")
    assert code == 2
    assert err.strip().splitlines() == [
        "unsloth: needs a CUDA GPU (unsloth's kernels run on CUDA only; none visible here); "
        "use --backend automodel to train on CPU"
    ]
    assert not (tmp_path / "r").exists()


def test_lora_16bit_trains_and_the_adapter_reproduces_the_validation_loss(
    cpu_seam, capsys, job, tmp_path, tiny_model
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    code, stdout, err = run(capsys, job(), out)
    assert code == 0, err
    assert_run_directory(out)
    train_losses = losses(out)
    assert len(train_losses) == 16
    assert sum(train_losses[-4:]) / 4 < sum(train_losses[:4]) / 4 - 0.5
    val = losses(out, "val")
    assert [e["step"] for e in read_metrics(out) if e["split"] == "val"] == [0, 8, 16]
    assert val[-1] < val[0]
    assert "{'loss'" not in stdout  # HF's own log printer is off; our lines only
    assert "[val] step 16 | epoch 4.00 | loss" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loader"] == "transformers+peft" and summary["backend"] == "unsloth"
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), out / "final"
    )
    assert abs(reference_val_loss(model, out, "unsloth") - summary["val_loss"]) < 1e-4


def test_4bit_lora_trains_on_bitsandbytes(cpu_seam, capsys, job, tmp_path):
    out = tmp_path / "run"
    code, _, err = run(capsys, job("model: {load_in_4bit: true}"), out)
    assert code == 0, err
    train_losses = losses(out)
    assert sum(train_losses[-4:]) / 4 < sum(train_losses[:4]) / 4 - 0.3
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["r"] == 16 and set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_merged_16bit_is_16_bit_and_equals_base_plus_adapter(
    cpu_seam, capsys, job, tmp_path, tiny_model
):
    from transformers import AutoModelForCausalLM
    from tuneplex_unsloth.export import weight_dtypes

    out = tmp_path / "run"
    code, _, err = run(
        capsys, job("output: {save_method: merged_16bit}\nschedule: {epochs: 2}"), out
    )
    assert code == 0, err
    final = out / "final"
    assert set(weight_dtypes(final)) == {"BF16"}
    merged = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ckpt = sorted((out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else []
    assert not ckpt  # save_steps null: no intermediate checkpoints
    summary = json.loads((out / "summary.json").read_text())
    # bf16 weights: the merged model reproduces the run's validation loss to bf16 precision
    assert abs(reference_val_loss(merged, out, "unsloth") - summary["val_loss"]) < 0.05
    from peft import PeftModel

    plain = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.randint(0, merged.config.vocab_size, (1, 16))
    with torch.no_grad():
        base_logits = plain(input_ids=ids).logits
        assert not torch.allclose(base_logits, merged(input_ids=ids).logits, atol=1e-2)
        # the adapter it was made from is kept beside it; base + adapter = the merged model
        # within the bf16 rounding of the merged weights
        adapted = PeftModel.from_pretrained(plain, final / "adapter").eval()
        want, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    assert set(weight_dtypes(final / "adapter")) == {"F32"}
    assert (got - want).abs().max() < 0.02 * want.abs().max(), (got - want).abs().max()
    assert (got - want).abs().max() < (base_logits - want).abs().max() / 4


def test_resume_continues_the_same_losses(cpu_seam, capsys, job, tmp_path, monkeypatch):
    import tuneplex_unsloth.trainer as trainer

    path = job("schedule: {save_steps: 4}")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run(capsys, path, whole)[0] == 0

    real = trainer.TokenCounter.__call__
    calls = {"n": 0}

    def interrupt(self, rows):
        calls["n"] += 1
        if calls["n"] == 12:  # two micro-batches per step: inside step 6
            raise KeyboardInterrupt
        return real(self, rows)

    monkeypatch.setattr(trainer.TokenCounter, "__call__", interrupt)
    code, _, err = run(capsys, path, broken)
    assert code == 130 and "checkpoints/step_4" in err
    monkeypatch.setattr(trainer.TokenCounter, "__call__", real)
    (broken / "checkpoints" / "checkpoint-8").mkdir()  # a save that never finished
    code, stdout, err = run(capsys, path, broken, "--resume")
    assert code == 0, err
    assert "resuming from" in stdout and "step_4" in stdout
    assert not (broken / "checkpoints" / "checkpoint-8").exists()
    a, b = read_metrics(whole), read_metrics(broken)
    assert [(e["step"], e["split"]) for e in a] == [(e["step"], e["split"]) for e in b]
    for x, y in zip(a, b, strict=True):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5, abs_tol=1e-6), (x, y)
    assert_run_directory(broken)


def test_nan_loss_stops_with_the_step(cpu_seam, capsys, job, tmp_path, tiny_model):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_model, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "run"
    code, _, err = run(capsys, job(f"model: {{name: {broken}}}"), out)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("step 1: loss is nan; training stopped")
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"
    assert not (out / "final").exists()


def test_masks_are_the_automodel_masks(job, tiny_model, tmp_path):
    """The same data through both backends' data specs gives the same tokens and labels."""
    import yaml
    from tuneplex.data.pipeline import prepare
    from tuneplex.plugins import registry
    from tuneplex.schema.loading import validate_job

    doc = yaml.safe_load(Path(job()).read_text())
    reg = registry().backends
    u = reg["unsloth"].backend
    a = reg["automodel"].backend
    ujob = validate_job(u.job_schema, doc)
    ajob = validate_job(
        a.job_schema,
        {
            "model": tiny_model,
            "dataset": {"training": doc["dataset"]["path"]},
            "training": {"max_seq_length": 128},
        },
    )
    x = prepare(u.data_spec(ujob)).train.examples
    y = prepare(a.data_spec(ajob)).train.examples
    assert x["input_ids"] == y["input_ids"] and x["labels"] == y["labels"]


def test_sft_config_translates_every_field(job, tmp_path):
    import yaml
    from tuneplex.plugins import registry
    from tuneplex.schema.loading import validate_job
    from tuneplex_unsloth.trainer import precision_flags, sft_config

    extra = (
        "schedule: {max_steps: 30, warmup_ratio: 0.1, lr_scheduler_type: cosine, logging_steps: 5,"
        " save_steps: 10, seed: 9}\n"
        "batch: {per_device_train_batch_size: 4, gradient_accumulation_steps: 8}\n"
        "optimizer: {learning_rate: 3.0e-4, weight_decay: 0.05, optim: adamw_8bit, "
        "max_grad_norm: 0.3}"
    )
    u = registry().backends["unsloth"].backend
    ujob = validate_job(u.job_schema, yaml.safe_load(Path(job(extra)).read_text()))
    c = sft_config(ujob, tmp_path / "run", cuda=False)
    assert (c.max_steps, c.warmup_steps, c.lr_scheduler_type) == (30, 0.1, "cosine")
    assert (c.logging_steps, c.save_strategy, c.save_steps, c.seed) == (5, "steps", 10, 9)
    assert (c.per_device_train_batch_size, c.gradient_accumulation_steps) == (4, 8)
    assert (c.learning_rate, c.weight_decay, c.optim) == (3e-4, 0.05, "adamw_8bit")
    assert c.max_grad_norm == 0.3
    assert c.use_cpu and not c.bf16 and not c.fp16
    assert c.output_dir == str(tmp_path / "run" / "checkpoints")
    assert c.report_to in ([], "none", ["none"])
    assert precision_flags(ujob, cuda=True) == {"bf16": True, "fp16": False, "use_cpu": False}
    fp16 = validate_job(
        u.job_schema, {**yaml.safe_load(Path(job()).read_text()), "hardware": {"precision": "fp16"}}
    )
    assert precision_flags(fp16, cuda=True) == {"bf16": False, "fp16": True, "use_cpu": False}
    c2 = sft_config(
        validate_job(u.job_schema, yaml.safe_load(Path(job()).read_text())), tmp_path, cuda=False
    )
    assert c2.save_strategy == "no" and c2.max_steps == -1 and c2.max_grad_norm == 1.0
    assert (c2.adam_beta1, c2.adam_beta2, c2.lr_scheduler_kwargs) == (0.9, 0.999, {})
    extra = "schedule: {lr_scheduler_type: cosine_with_min_lr}\noptimizer: {adam_beta1: 0.5}"
    c3 = sft_config(
        validate_job(u.job_schema, yaml.safe_load(Path(job(extra)).read_text())),
        tmp_path,
        cuda=False,
    )
    assert c3.lr_scheduler_kwargs == {"min_lr_rate": 0.1} and c3.adam_beta1 == 0.5


def test_merged_4bit_check_refuses_16_bit_weights(tmp_path, tiny_model):
    import shutil

    from tuneplex.errors import TrainingStopped
    from tuneplex_unsloth.export import verify

    fake = tmp_path / "fake"
    shutil.copytree(tiny_model, fake)
    with pytest.raises(TrainingStopped) as exc:
        verify(fake, "merged_4bit")
    assert str(exc.value).startswith("output.save_method merged_4bit: the saved model is not 4-bit")
    with pytest.raises(TrainingStopped):
        verify(fake, "merged_16bit")  # float32 weights are not 16-bit either


def test_min_lr_betas_and_dora_reach_hugging_faces_trainer(
    cpu_seam, capsys, job, tmp_path, tiny_model
):
    """cosine_with_min_lr ends at optimizer.min_learning_rate (the rates metrics.jsonl
    records), the adam betas are the optimizer's (its checkpointed state), and use_dora trains
    DoRA's magnitudes into the adapter."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    extra = (
        "schedule: {epochs: 2, eval_steps: null, save_steps: 8, lr_scheduler_type: "
        "cosine_with_min_lr}\n"
        "optimizer: {optim: adamw_torch, min_learning_rate: 2.0e-3, adam_beta1: 0.8, "
        "adam_beta2: 0.95}\n"
        "training: {lora: {use_dora: true}}"
    )
    code, _, err = run(capsys, job(extra), out)
    assert code == 0, err
    lrs = [e["lr"] for e in read_metrics(out) if e["split"] == "train"]
    expected = [2e-3 + 8e-3 * 0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    state = torch.load(out / "checkpoints" / "step_8" / "optimizer.pt", weights_only=True)
    assert {tuple(g["betas"]) for g in state["param_groups"]} == {(0.8, 0.95)}
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    start = base.model.layers[0].self_attn.q_proj.weight.norm(dim=1)  # DoRA's initial m
    assert (adapter[name] - start).abs().max() > 1e-4  # trained
    assert sum(k.endswith(".lora_magnitude_vector") for k in adapter) == 2 * 7


def test_the_unsloth_loader_hands_every_lora_setting_to_get_peft_model(job, monkeypatch):
    """unsloth's FastLanguageModel.get_peft_model (which needs CUDA) gets each LoRA field,
    use_dora among them (it passes it on to peft's LoraConfig)."""
    import sys
    import types

    import yaml
    from tuneplex.plugins import registry
    from tuneplex.schema.loading import validate_job
    from tuneplex_unsloth.model import UnslothLoader

    calls = []
    fake = types.ModuleType("unsloth")
    fake.FastLanguageModel = types.SimpleNamespace(
        get_peft_model=lambda model, **kw: calls.append(kw) or model
    )
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    extra = "training: {lora: {rank: 8, alpha: 4, dropout: 0.1, use_dora: true, use_rslora: true}}"
    u = registry().backends["unsloth"].backend
    ujob = validate_job(u.job_schema, yaml.safe_load(Path(job(extra)).read_text()))
    UnslothLoader().add_lora("model", ujob)
    (kw,) = calls
    assert (kw["r"], kw["lora_alpha"], kw["lora_dropout"]) == (8, 4, 0.1)
    assert kw["use_dora"] is True and kw["use_rslora"] is True
