"""Knowledge distillation with the automodel backend, on CPU with tiny local models."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from helpers import chat_rows, losses, merge_yaml, train, write_rows  # noqa: E402
from tuneplex.runs import read_metrics  # noqa: E402


@pytest.fixture
def job(tmp_path, tiny_model):
    write_rows(tmp_path / "train.jsonl", chat_rows(16))
    write_rows(tmp_path / "val.jsonl", chat_rows(6, seed=1))

    def _job(extra: str = "", name: str = "job.yaml") -> str:
        text = f"""\
model: {tiny_model}
dataset: {{training: {tmp_path / "train.jsonl"}, validation: {tmp_path / "val.jsonl"}}}
training:
  training_type: distillation
  finetuning_type: all_weights
  teacher_model: {tiny_model}
  teacher_precision: fp32
  max_seq_length: 96
  precision: fp32
schedule: {{epochs: 2, seed: 5}}
batch: {{global_batch_size: 4, micro_batch_size: 2}}
optimizer: {{learning_rate: 2.0e-3, warmup_steps: 1}}
"""
        path = tmp_path / name
        path.write_text(merge_yaml(text, extra))
        return str(path)

    return _job


def test_ratio_zero_is_exactly_sft(capsys, job, tmp_path):
    sft_job = job(
        "training: {training_type: sft, teacher_model: null, teacher_precision: bf16}",
        name="sft.yaml",
    )
    assert train(capsys, sft_job, "-o", tmp_path / "sft")[0] == 0
    code, _, err = train(capsys, job("training: {distillation_ratio: 0.0}"), "-o", tmp_path / "kd")
    assert code == 0, err
    a, b = read_metrics(tmp_path / "sft"), read_metrics(tmp_path / "kd")
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-6), (x, y)
    kd_events = [e for e in b if e["split"] == "train"]
    assert all({"ce_loss", "kd_loss"} <= set(e) for e in kd_events)
    assert all(math.isclose(e["ce_loss"], e["loss"], rel_tol=1e-6) for e in kd_events)


def test_ratio_one_with_the_teacher_as_student_has_no_kd_loss(capsys, job, tmp_path):
    code, _, err = train(
        capsys,
        job("training: {distillation_ratio: 1.0}\noptimizer: {learning_rate: 1.0e-9}"),
        "-o",
        tmp_path / "kd",
    )
    assert code == 0, err
    first = next(e for e in read_metrics(tmp_path / "kd") if e["split"] == "train")
    assert abs(first["kd_loss"]) < 1e-6 and abs(first["loss"]) < 1e-6
    assert first["ce_loss"] > 1.0  # the task itself is not learned


def test_distilled_student_gets_closer_to_a_trained_teacher(capsys, job, tmp_path, tokenizers):
    from tuneplex.testing.tiny import build_llama

    teacher_run = tmp_path / "teacher"
    teacher_job = job(
        "training: {training_type: sft, teacher_model: null, teacher_precision: bf16}\n"
        "schedule: {epochs: 12}",
        name="teacher.yaml",
    )
    assert train(capsys, teacher_job, "-o", teacher_run)[0] == 0
    student = tmp_path / "student"  # a different random initialisation
    build_llama(
        student, tokenizer=tokenizers["chatml"][1], hidden=64, layers=2, init_std=0.1, seed=11
    )
    runs = {}
    for r in (0.0, 0.9):
        runs[r] = tmp_path / f"r{r}"
        extra = (
            f"model: {student}\ntraining: {{teacher_model: {teacher_run / 'final'}, "
            f"distillation_temperature: 2.0, distillation_ratio: {r}}}\nschedule: {{epochs: 4}}"
        )
        code, _, err = train(capsys, job(extra, name=f"r{r}.yaml"), "-o", runs[r])
        assert code == 0, err
    kd = [e["kd_loss"] for e in read_metrics(runs[0.9]) if e["split"] == "train"]
    assert sum(kd[-2:]) / 2 < sum(kd[:2]) / 2 * 0.7  # the KL to the teacher falls
    assert losses(runs[0.9], "val")[-1] < losses(runs[0.0], "val")[-1]


def test_tokenizer_mismatch_is_refused(capsys, job, tmp_path, tokenizers):
    from tuneplex.testing.tiny import build_llama, build_tokenizer

    bigger = tmp_path / "bigger-vocab"
    build_llama(bigger, tokenizer=build_tokenizer(bigger, vocab_size=600), hidden=64, layers=2)
    code, _, err = train(
        capsys, job(f"training: {{teacher_model: {bigger}}}"), "-o", tmp_path / "r"
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"training.teacher_model: {bigger}: the teacher's vocabulary differs from the student's ("
    ), lines
    assert (
        "only the teacher has" in lines[0] and "distillation needs the same tokenizer" in lines[0]
    )
    assert not (tmp_path / "r" / "final").exists()

    # same vocabulary, other special tokens (a Llama-3-style template on the same BPE)
    other = tmp_path / "llama3-teacher"
    build_llama(other, tokenizer=tokenizers["llama3"][1], hidden=64, layers=2)
    code, _, err = train(
        capsys, job(f"training: {{teacher_model: {other}}}"), "-o", tmp_path / "r2"
    )
    assert code == 2
    assert f"training.teacher_model: {other}: eos_token_id is " in err


def test_distillation_with_tensor_parallel_is_refused(capsys, job, tmp_path):
    code, _, err = train(
        capsys,
        job("parallelism: {num_gpus_per_node: 2, tensor_parallel_size: 2}"),
        "-o",
        tmp_path / "r",
    )
    assert code == 2
    assert err.strip().splitlines() == [
        "parallelism.tensor_parallel_size: 2: distillation runs with data parallelism only in "
        "this version; set it to 1"
    ]


@pytest.mark.slow  # worker processes
def test_data_parallel_distillation_equals_one_process(job, tmp_path):
    import os
    import subprocess
    import sys

    path = job("training: {distillation_ratio: 0.5, distillation_temperature: 2.0}")
    runs = {}
    for procs in (1, 2):
        runs[procs] = tmp_path / f"p{procs}"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "tuneplex",
                "train",
                path,
                "-o",
                str(runs[procs]),
                "--set",
                f"parallelism.num_gpus_per_node={procs}",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_metrics(runs[1]), read_metrics(runs[2])
    assert [(e["step"], e["split"]) for e in a] == [(e["step"], e["split"]) for e in b]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "ce_loss", "kd_loss"):
            if key in x:
                assert math.isclose(x[key], y[key], rel_tol=1e-5, abs_tol=1e-7), (key, x, y)


def test_teacher_is_frozen_and_outside_the_optimizer(tiny_model):
    from transformers import AutoModelForCausalLM
    from tuneplex_automodel.objectives.distill import Teacher
    from tuneplex_automodel.trainer import build_optimizer

    student = AutoModelForCausalLM.from_pretrained(tiny_model)
    teacher = Teacher(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16),
        device=torch.device("cpu"),
        offload=True,
    )
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert next(teacher.model.parameters()).dtype == torch.bfloat16
    opt = build_optimizer(student, lr=1e-3, weight_decay=0.0, fused=False)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in teacher.model.parameters()}


@pytest.mark.parametrize(
    ("cls", "changes"),
    [
        ("GraniteForCausalLM", {"logits_scaling": 4.0}),
        ("Gemma2ForCausalLM", {"final_logit_softcapping": 0.5}),
    ],
)
def test_head_run_by_hand_matches_the_model(cls, changes, tokenizers):
    """Distillation's chunks and pipeline stages run the output head themselves:
    `finish_logits` must do what the family's forward does after it (Granite divides by
    logits_scaling, Gemma 2 soft-caps), or they train on other logits than the model's."""
    from helpers import build_family
    from tuneplex.nn.logits import finish_logits

    model = build_family(cls, tokenizers["chatml"][1], **changes).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state
        plain = model.get_output_embeddings()(hidden)
    torch.testing.assert_close(finish_logits(model.config, plain), want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(plain, want, atol=1e-3)  # the family really changes its logits


@pytest.mark.slow  # worker processes
def test_data_parallel_distillation_refuses_a_tied_head(job, tmp_path, tokenizers):
    """Data parallelism makes the student's head an FSDP unit of its own: not with a head
    that is the input embeddings (the objective refuses it before any step)."""
    from helpers import cli, family_config
    from transformers import AutoModelForCausalLM

    tok = tokenizers["chatml"][1]
    tied = tmp_path / "tied"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        family_config("LlamaForCausalLM", tok, tie_word_embeddings=True)
    )
    model.save_pretrained(tied)
    tok.save_pretrained(tied)
    path = job(f"model: {tied}\ntraining: {{teacher_model: {tied}}}")
    proc = cli(path, "-o", tmp_path / "r", "--set", "parallelism.num_gpus_per_node=2", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        "training.training_type: distillation across 2 data-parallel ranks needs an output head "
        "not tied to the input embeddings (this model ties them); train it in one process"
    ) in proc.stderr
