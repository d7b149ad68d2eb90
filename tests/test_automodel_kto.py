"""Unpaired KTO (`training.dpo.loss_type: kto`) on the automodel backend, whole runs through
`tuneplex train` in this process: a tiny model learns which completions are desirable (the
held-out desirable rows' reward rises above the undesirable ones'), the reference values of
every row and of its mismatched pair are computed once and kept in checkpoints, and the
settings and backends that cannot take kto are refused in one line."""

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
    preference_rows,
    train,
    write_rows,
)
from tuneplex.runs import read_metrics  # noqa: E402
from tuneplex_automodel.objectives import dpo as dpo_objective  # noqa: E402

JOB = """\
model: {model}
dataset: {{training: {root}/kto.jsonl, validation: {root}/val-kto.jsonl}}
training:
  training_type: dpo
  finetuning_type: lora
  max_seq_length: 64
  precision: fp32
  dpo: {dpo}
schedule: {{epochs: {epochs}, seed: 3, val_check_interval: 1.0}}
batch: {{global_batch_size: 4, micro_batch_size: 2}}
optimizer: {{learning_rate: 1e-2, warmup_steps: 1}}
output: {{checkpoint_steps: 8}}
"""


def kto_rows(n: int, *, seed: int) -> list[dict]:
    """2n unpaired rows from n pairs: each prompt's "no." answer desirable, its "yes." answer
    undesirable (the starting model prefers neither); all desirable rows first, so each row's
    mismatched pair (the next row's prompt) has another prompt."""
    pairs = preference_rows(n, seed=seed)
    good = [{"prompt": r["prompt"], "completion": r["rejected"], "label": True} for r in pairs]
    bad = [{"prompt": r["prompt"], "completion": r["chosen"], "label": False} for r in pairs]
    return good + bad


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kto")
    write_rows(root / "kto.jsonl", kto_rows(16, seed=0))
    write_rows(root / "val-kto.jsonl", kto_rows(8, seed=1))
    return root


def job(root, model, name: str, *, dpo: str, epochs: int = 1):
    path = root / f"{name}.yaml"
    path.write_text(JOB.format(model=model, root=root, dpo=dpo, epochs=epochs))
    return path


def test_a_tiny_model_learns_which_completions_are_desirable(root, tiny_model, capsys):
    """Two epochs of 32 rows: on the 16 held-out rows the desirable ones' mean reward rises
    above the undesirable ones' (from about equal), and the validation loss falls; the
    reference values (a row and its mismatched pair each) are kept in the checkpoint."""
    run = root / "learns"
    dpo = "{loss_type: kto, ref_policy_kl_penalty: 0.1}"
    code, _, err = train(capsys, job(root, tiny_model, run.name, dpo=dpo, epochs=2), "-o", run)
    assert code == 0, err
    val = [e for e in read_metrics(run) if e["split"] == "val"]
    before, after = val[0], val[-1]
    print(
        f"kto: held-out reward margin (desirable - undesirable) {before['rewards/margin']:.4f}"
        f" -> {after['rewards/margin']:.4f}, rewards/chosen {after['rewards/chosen']:.4f}, "
        f"rewards/rejected {after['rewards/rejected']:.4f}, kl {after['kl']:.4f}, loss "
        f"{before['loss']:.4f} -> {after['loss']:.4f}"
    )
    assert abs(before["rewards/margin"]) < 0.05, before
    assert after["rewards/chosen"] > after["rewards/rejected"], after
    assert after["rewards/margin"] > before["rewards/margin"] + 0.1, val
    assert after["loss"] < before["loss"], val
    train_events = [e for e in read_metrics(run) if e["split"] == "train"]
    assert all(
        {"rewards/chosen", "rewards/rejected", "rewards/margin", "kl"} <= set(e)
        for e in train_events
    )
    assert all(e["kl"] >= 0 for e in train_events)
    (state, *_) = sorted((run / "checkpoints").glob("step_*/trainer_state.json"))
    saved = json.loads(state.read_text())[dpo_objective.REFERENCE_KEY]
    assert len(saved["train"]) == 64 and len(saved["validation"]) == 32  # row + mismatched
    assert all(math.isfinite(x) and x < 0 for x in saved["train"])


def test_resume_reads_the_reference_from_the_checkpoint(root, tiny_model, capsys, monkeypatch):
    """Resumed from its step-4 checkpoint, a kto run makes no reference pass (the values of
    every row and mismatched pair come from the checkpoint) and repeats the whole run."""
    calls: list[int] = []
    real = dpo_objective.reference_log_probs

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dpo_objective, "reference_log_probs", counted)
    run = root / "resume"
    path = job(root, tiny_model, run.name, dpo="{loss_type: kto, ref_policy_kl_penalty: 0.1}")
    every_4 = ("--set", "output.checkpoint_steps=4")
    code, _, err = train(capsys, path, "-o", run, *every_4)
    assert code == 0, err
    assert len(calls) == 2  # train and validation
    whole = root / "resume-whole"
    shutil.copytree(run, whole)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step_8")
    code, _, err = train(capsys, path, "-o", run, "--resume", *every_4)
    assert code == 0, err
    assert len(calls) == 2
    assert_same_run(whole, run)
    assert_same_final(whole, run)


REFUSED = [  # (backend, training.dpo, the one line `tuneplex validate` prints)
    (
        "automodel",
        "{loss_type: sigmoid, desirable_weight: 2.0}",
        "training.dpo.desirable_weight: only used with loss_type kto (got sigmoid)",
    ),
    (
        "automodel",
        "{loss_type: kto_pair, undesirable_weight: 0.5}",
        "training.dpo.undesirable_weight: only used with loss_type kto (got kto_pair)",
    ),
    (
        "automodel",
        "{loss_type: kto, sft_loss_weight: 1.0}",
        "training.dpo.sft_loss_weight: 1: kto rows are not pairs and its loss has no SFT part "
        "(TRL's KTOTrainer has none); set it to 0",
    ),
    (
        "unsloth",
        "{loss_type: kto}",
        "training.dpo.loss_type: kto: not on this backend yet (TRL's KTOTrainer tokenizes its "
        "own rows and builds its KL pairs per batch, outside the pre-tokenized seam the other "
        "losses use); train it with --backend automodel",
    ),
]


@pytest.mark.parametrize(("backend", "dpo", "line"), REFUSED)
def test_refusals_are_one_line(tmp_path, capsys, backend, dpo, line):
    """`tuneplex validate`: exit 2, nothing on stdout, the one line naming the key; the same
    job with a kto block that fits is valid (on automodel)."""
    from tuneplex.cli import main

    path = tmp_path / "job.yaml"
    model = "org/base" if backend == "automodel" else "{name: org/base}"
    data = "{training: p.jsonl}" if backend == "automodel" else "{path: p.jsonl}"
    path.write_text(
        f"model: {model}\ndataset: {data}\ntraining: {{training_type: dpo, dpo: {dpo}}}\n"
    )
    code = main(["validate", str(path), "--backend", backend])
    out = capsys.readouterr()
    assert (code, out.out, out.err) == (2, "", line + "\n")
    fits = "{loss_type: kto, desirable_weight: 1.33, undesirable_weight: 0.5}"
    path.write_text(path.read_text().replace(dpo, fits))
    assert main(["validate", str(path), "--backend", backend]) == (
        0 if backend == "automodel" else 2
    )
