"""`tuneplex train --backend automodel` for real on CPU: tiny local model, real data files."""

from __future__ import annotations

import json
import math
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers import chat_rows, load_final, losses, merge_yaml, train, write_rows  # noqa: E402
from tuneplex.runs import read_metrics  # noqa: E402
from tuneplex.testing import assert_run_directory, reference_val_loss  # noqa: E402


@pytest.fixture
def data(tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    write_rows(train, chat_rows(16))
    write_rows(val, chat_rows(6, seed=1))
    return train, val


@pytest.fixture
def job(tmp_path, tiny_model, data):
    """job(**sections) -> path of a job file; defaults: LoRA, 4 epochs of 4 steps."""

    def _job(extra: str = "", name: str = "job.yaml"):
        text = f"""\
model: {tiny_model}
dataset:
  training: {data[0]}
  validation: {data[1]}
training:
  max_seq_length: 128
  precision: fp32
schedule:
  epochs: 4
  seed: 7
batch:
  global_batch_size: 4
  micro_batch_size: 2
optimizer:
  learning_rate: 1.0e-2
  warmup_steps: 2
"""
        path = tmp_path / name
        path.write_text(merge_yaml(text, extra))
        return path

    return _job


def val_loss_of(model, run) -> float:
    return reference_val_loss(model, run, "automodel")


def test_lora_learns_and_final_adapter_reproduces_the_validation_loss(
    capsys, job, tmp_path, tiny_model
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    code, out, err = train(capsys, job(), "-o", run)
    assert code == 0, err
    train_losses = losses(run)
    assert len(train_losses) == 16
    assert sum(train_losses[-4:]) / 4 < sum(train_losses[:4]) / 4 - 0.5
    val = losses(run, "val")
    assert val[-1] < val[0] - 0.3  # step 0 baseline, then the end
    assert "[val] step 16 | epoch 4.00 | loss" in out
    assert f"final: {run / 'final'}" in out
    assert_run_directory(run)
    final = run / "final"
    assert (final / "adapter_config.json").is_file()
    assert (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, str(final))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["steps"] == summary["total_steps"] == 16
    assert abs(val_loss_of(model, run) - summary["val_loss"]) < 1e-4
    events = read_metrics(run)
    assert {
        "step",
        "epoch",
        "split",
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_per_s",
        "elapsed_s",
    } <= set(events[1])


def test_lora_merged_equals_base_plus_adapter(capsys, job, tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    code, _, err = train(
        capsys, job("training: {finetuning_type: lora_merged}\nschedule: {epochs: 2}"), "-o", run
    )
    assert code == 0, err
    assert_run_directory(run)
    final = run / "final"
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    adapted = PeftModel.from_pretrained(base, str(final / "adapter")).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, adapted(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, a, atol=1e-3)  # it did train
    summary = json.loads((run / "summary.json").read_text())
    assert abs(val_loss_of(merged, run) - summary["val_loss"]) < 1e-4


def test_a_peft_wrapper_is_seen_through_by_the_one_helper(tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from tuneplex.nn.models import adapter_names, is_peft, unwrap_peft
    from tuneplex_automodel.model import apply_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not is_peft(base) and unwrap_peft(base) is base and adapter_names(base) == []
    wrapped = apply_lora(base, rank=4, alpha=8, target_modules=None)
    assert isinstance(wrapped, PeftModel) and is_peft(wrapped)
    assert unwrap_peft(wrapped) is base
    assert adapter_names(wrapped) == ["default"]
    assert hasattr(base, "peft_config") and not is_peft(base)  # peft marks the model it wraps


def test_full_weights_with_packing(capsys, job, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    extra = (
        "training: {finetuning_type: all_weights, max_seq_length: 64}\n"
        "batch: {sequence_packing: true}\nschedule: {epochs: 6}\noptimizer: {learning_rate: 3.0e-3}"
    )
    code, _, err = train(capsys, job(extra), "-o", run)
    assert code == 0, err
    val = losses(run, "val")
    assert val[-1] < val[0] - 1.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["train"]["packed_rows"] < 16
    model = AutoModelForCausalLM.from_pretrained(str(run / "final"))
    assert summary["trainable_parameters"] == summary["total_parameters"]
    assert abs(val_loss_of(model, run) - summary["val_loss"]) < 1e-4


@pytest.mark.parametrize("finetuning", ["lora", "all_weights"])
def test_resume_after_an_interruption_continues_the_same_losses(
    capsys, job, tmp_path, monkeypatch, finetuning
):
    import tuneplex_automodel.trainer as trainer

    path = job(f"training: {{finetuning_type: {finetuning}}}\noutput: {{checkpoint_steps: 3}}")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    code, _, err = train(capsys, path, "-o", whole)
    assert code == 0, err

    calls = {"n": 0}
    real = trainer.loss_function

    def interrupt_in_step_5(dist, **kw):  # the loss the layout gives, stopping in step 5
        loss = real(dist, **kw)

        def counted(model, batch, **kw):  # 2 micro-batches per step
            calls["n"] += model.training
            if calls["n"] == 9:
                raise KeyboardInterrupt
            return loss(model, batch, **kw)

        return counted

    monkeypatch.setattr(trainer, "loss_function", interrupt_in_step_5)
    code, _, err = train(capsys, path, "-o", broken)
    assert code == 130
    assert "interrupted at step 4" in err and "checkpoints/step_3" in err
    assert json.loads((broken / "summary.json").read_text())["status"] == "interrupted"
    assert (broken / "curves.png").is_file()  # the picture of a stopped run too
    assert not (broken / "final").exists()
    monkeypatch.setattr(trainer, "loss_function", real)

    # a crash while writing a later checkpoint leaves only ignorable debris
    (broken / "checkpoints" / ".step_6.tmp-4242").mkdir()
    (broken / "checkpoints" / "step_9").mkdir()  # no trainer_state.json: never completed
    code, out, err = train(capsys, path, "-o", broken, "--resume")
    assert code == 0, err
    assert "resuming from" in out and "step_3" in out
    assert not (broken / "checkpoints" / ".step_6.tmp-4242").exists()
    a, b = read_metrics(whole), read_metrics(broken)
    assert [(e["step"], e["split"]) for e in a] == [(e["step"], e["split"]) for e in b]
    for x, y in zip(a, b, strict=True):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-6, abs_tol=1e-7), (x, y)
    assert_run_directory(broken)


def test_nan_stops_at_the_step_and_keeps_the_last_good_checkpoint(capsys, job, tmp_path):
    run = tmp_path / "run"
    path = job(
        "optimizer: {learning_rate: 1.0e+30, warmup_steps: 0}\noutput: {checkpoint_steps: 1}\n"
        "training: {finetuning_type: all_weights}"
    )
    code, _, err = train(capsys, path, "-o", run)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(("step 2: loss is ", "step 2: gradient norm is ")), err
    assert "checkpoints/step_1" in lines[0]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_1"]
    assert (run / "checkpoints" / "step_1" / "trainer_state.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["failed_step"] == 2
    assert (run / "curves.png").is_file()
    assert not (run / "final").exists()


def test_nan_loss_names_the_step(capsys, job, tmp_path, tiny_model):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_model, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    run = tmp_path / "run"
    code, _, err = train(capsys, job(f"model: {broken}\ndataset: {{validation: null}}"), "-o", run)
    assert code == 1
    assert err.strip().splitlines() == [
        "step 1: loss is nan; training stopped, nothing of this step was saved (last good "
        "checkpoint: none yet); lower optimizer.learning_rate or check the data"
    ]


def test_keep_checkpoints_prunes_older_ones(capsys, job, tmp_path):
    run = tmp_path / "run"
    code, _, err = train(
        capsys, job("output: {checkpoint_steps: 2, keep_checkpoints: 2}"), "-o", run
    )
    assert code == 0, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_14", "step_16"]


def test_bad_model_path_is_one_line(capsys, job, tmp_path):
    code, _, err = train(capsys, job(f"model: {tmp_path / 'nope'}"), "-o", tmp_path / "r")
    assert code == 2
    assert err.strip().splitlines() == [
        f"model: {tmp_path / 'nope'}: no such local directory, and the Hub is offline "
        "(HF_HUB_OFFLINE)"
    ]


def test_model_without_safetensors_is_refused(capsys, job, tmp_path, tiny_model):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    code, _, err = train(capsys, job(f"model: {pickled}"), "-o", tmp_path / "r")
    assert code == 2
    assert err.strip() == (
        f"model: {pickled}: no .safetensors weights (found pytorch_model.bin; pickled weights "
        "are not loaded)"
    )


def test_bad_dataset_line_is_one_line(capsys, job, data, tmp_path):
    with data[0].open("a") as fh:
        fh.write('{"messages": [\n')
    code, _, err = train(capsys, job(), "-o", tmp_path / "r")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{data[0]}:17: invalid JSON: "), err


def test_occupied_output_directory_is_refused(capsys, job, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    code, _, err = train(capsys, job(), "-o", run)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "not a tuneplex run directory" in err
    assert (run / "notes.txt").read_text() == "mine"


def test_same_seed_same_losses(capsys, job, tmp_path):
    path = job("schedule: {epochs: 1}")
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        assert train(capsys, path, "-o", run)[0] == 0
    assert losses(runs[0]) == losses(runs[1])


def test_packed_rows_give_the_same_loss_as_separate_rows(data, tiny_model):
    """The trainer's loss over packed rows equals the loss over the same samples one per row:
    no attention and no prediction crosses a sample boundary."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM
    from tuneplex.data.collate import RowTable
    from tuneplex.data.pipeline import prepare
    from tuneplex.data.spec import DataSpec
    from tuneplex.nn.evaluation import evaluate

    spec = DataSpec(train=str(data[0]), tokenizer=tiny_model, max_seq_length=96)
    plain = RowTable(prepare(spec).train.dataset)
    packed = RowTable(prepare(replace(spec, packing=True)).train.dataset)
    assert len(packed) < len(plain)
    assert packed.target_counts.sum() == plain.target_counts.sum()
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    a = evaluate(model, plain, micro=3, pad_id=0, device="cpu")
    b = evaluate(model, packed, micro=2, pad_id=0, device="cpu")
    assert math.isclose(a, b, rel_tol=1e-5), (a, b)


def test_skipped_rows_are_said_and_counted_in_the_summary(capsys, job, tmp_path, data):
    bad = {"messages": [{"role": "robot", "content": "x"}]}
    with data[0].open("a") as fh:
        fh.write(json.dumps(bad) + "\n{not json\n")
    run = tmp_path / "run"
    code, _, err = train(capsys, job("schedule: {epochs: 1}"), "-o", run)
    assert code == 2
    assert err.splitlines()[-1].startswith("dataset.training: 2 of 18 rows cannot be used")
    assert not run.exists()  # refused before training: no run directory left behind
    extra = "schedule: {epochs: 1}\ndataset: {skip_invalid_rows: true}"
    code, _, err = train(capsys, job(extra), "-o", run)
    assert code == 0, err
    assert "dataset.training: left out 2 of 18 rows that cannot be used" in err
    stats = json.loads((run / "summary.json").read_text())["data"]["train"]
    assert stats["rows"] == 18 and stats["skipped_invalid_rows"] == 2
    assert stats["first_skipped"].startswith(f"{data[0]}:17: messages[0].role: must be one of")


def test_a_max_steps_cap_above_the_epochs_is_the_first_line(capsys, job, tmp_path):
    code, out, err = train(
        capsys, job("schedule: {epochs: 1, max_steps: 60}"), "-o", tmp_path / "r"
    )
    assert code == 0, err
    assert out.splitlines()[0] == (
        "max_steps 60 > 1 epoch × 4 steps: stopping after 4; raise schedule.epochs"
    )
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == 4


@pytest.mark.parametrize("ft", ["lora", "all_weights"])
def test_bf16_mixed_precision_trains_like_fp32(capsys, job, tmp_path, ft):
    """`training.precision: bf16` on CPU: bf16 matmuls under autocast (LoRA: a bf16 frozen
    base; full weights: fp32 master weights, so final/ is fp32), the same losses as fp32 up to
    bf16 rounding, and a final/ that loads."""
    import torch

    runs = {}
    for precision in ("fp32", "bf16"):
        runs[precision] = tmp_path / precision
        extra = (
            f"training: {{finetuning_type: {ft}, precision: {precision}}}\nschedule: {{epochs: 1}}"
        )
        code, out, err = train(capsys, job(extra, name=f"{precision}.yaml"), "-o", runs[precision])
        assert code == 0, err
        assert f"on cpu, {'bf16 mixed' if precision == 'bf16' else 'fp32'}\n" in out
    a, b = losses(runs["fp32"]), losses(runs["bf16"])
    assert len(a) == len(b) == 4
    assert abs(b[0] - a[0]) < 0.02 * a[0], (a, b)  # the same start, up to bf16 rounding
    assert b[-1] < b[0]  # and it learns
    model = load_final(runs["bf16"], ft)
    assert next(model.parameters()).dtype == torch.float32


def test_auto_precision_is_bf16_where_the_device_computes_it():
    import torch
    from tuneplex_automodel.schema import AutomodelJobInput
    from tuneplex_automodel.trainer import native_bf16, pick_runtime

    def runtime(**training):
        job = AutomodelJobInput.model_validate(
            {"model": "m", "dataset": {"training": "t.jsonl"}, "training": training}
        )
        return pick_runtime(job, torch.device("cpu"))

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert native_bf16(torch.device("cpu")) == native
    assert (runtime().autocast is not None) == native
    assert runtime(precision="fp32").autocast is None
    assert runtime(precision="fp32").dtype == torch.float32
    lora = runtime(precision="bf16")
    assert (lora.autocast, lora.dtype) == (torch.bfloat16, torch.bfloat16)
    full = runtime(precision="bf16", finetuning_type="all_weights")
    assert (full.autocast, full.dtype) == (torch.bfloat16, torch.float32)


def test_compile_auto_is_off_on_a_cpu_and_true_compiles_every_decoder_layer(tokenizers):
    import torch
    from helpers import build_family
    from tuneplex_automodel.model import compile_layers

    model = build_family("LlamaForCausalLM", tokenizers["chatml"][1])
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compile_layers(model, setting="auto", device=cpu, data_parallel_only=True)
    assert not compile_layers(model, setting=True, device=cuda, data_parallel_only=False)
    assert all("forward" not in vars(layer) for layer in model.model.layers)
    assert compile_layers(model, setting=True, device=cpu, data_parallel_only=True)
    compiled = [vars(layer)["forward"] for layer in model.model.layers]
    assert len(compiled) == 2 and all(hasattr(f, "_torchdynamo_orig_callable") for f in compiled)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_loss_and_gradients(mode, tokenizers):
    """Recomputing layers in backward changes what is kept, not what is computed."""
    from helpers import build_family, packed_and_padded_batch
    from transformers.modeling_layers import GradientCheckpointingLayer
    from tuneplex.nn import evaluation
    from tuneplex_automodel.model import apply_lora, checkpoint_activations

    tok = tokenizers["chatml"][1]
    batch = packed_and_padded_batch(len(tok))
    results, saved = [], []
    for ac in ("none", mode):
        model = apply_lora(
            build_family("Qwen3ForCausalLM", tok), rank=4, alpha=8, target_modules=None
        ).train()
        checkpoint_activations(model, mode=ac)
        kept = []  # what autograd keeps for backward: less when layers are recomputed
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, kept=kept: kept.append(t.numel()) or t, lambda t: t
        ):
            loss = evaluation.chunked_loss_sum(model, batch)
        saved.append(sum(kept))
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        results.append((loss.detach(), grads, [m.gradient_checkpointing for m in layers]))
    (want, want_grads, off), (got, got_grads, on) = results
    assert off == [False, False]
    assert on == ([True, True] if mode == "full" else [True, False])
    assert saved[1] < saved[0], saved
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-6, atol=1e-9)
