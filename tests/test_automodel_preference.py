"""The preference objectives after DPO on the automodel backend (orpo, simpo, kto_pair), whole
runs through `tuneplex train` in this process: a tiny model learns the preference with each
(the reward accuracy on held-out pairs rises), the reference-free ones make no reference pass
and keep no reference in their checkpoints, and data parallelism equals one process."""

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
    preference_rows,
    train,
    write_rows,
)
from tuneplex.runs import read_metrics  # noqa: E402
from tuneplex_automodel.objectives import dpo as dpo_objective  # noqa: E402

JOB = """\
model: {model}
dataset: {{training: {root}/{data}pairs.jsonl, validation: {root}/{data}val-pairs.jsonl}}
training:
  training_type: dpo
  finetuning_type: lora
  max_seq_length: 64
  precision: fp32
  dpo: {dpo}
schedule: {{epochs: {epochs}, seed: 3, val_check_interval: 1.0}}
batch: {{global_batch_size: 4, micro_batch_size: 2}}
optimizer: {{learning_rate: {lr}, warmup_steps: 1}}
output: {{checkpoint_steps: 4}}
"""

LEARNS = {  # loss type -> its settings (β as each paper's examples use it), learning rate
    "orpo": ("{loss_type: orpo, ref_policy_kl_penalty: 0.5}", 1e-2),
    "simpo": ("{loss_type: simpo, ref_policy_kl_penalty: 2.0, simpo_gamma: 0.5}", 1e-2),
    "kto_pair": ("{loss_type: kto_pair, ref_policy_kl_penalty: 0.1}", 1e-2),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("preference")
    for name, n, seed in (("pairs", 16, 0), ("val-pairs", 8, 1)):
        rows = preference_rows(n, seed=seed)
        write_rows(root / f"{name}.jsonl", rows)
        swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
        write_rows(root / f"no-{name}.jsonl", swapped)  # "no." preferred
    return root


def job(root, model, name: str, *, dpo: str, epochs: int = 1, lr: float = 1e-2, data: str = ""):
    path = root / f"{name}.yaml"
    text = JOB.format(model=model, root=root, dpo=dpo, epochs=epochs, lr=lr, data=data)
    path.write_text(text)
    return path


def events(run, split: str) -> list[dict]:
    return [e for e in read_metrics(run) if e["split"] == split]


def spy_reference_passes(monkeypatch) -> list[int]:
    """Counts the objective's reference passes (one per split it computes)."""
    calls: list[int] = []
    real = dpo_objective.reference_log_probs

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dpo_objective, "reference_log_probs", counted)
    return calls


@pytest.mark.parametrize("loss_type", sorted(LEARNS))
def test_a_tiny_model_learns_the_preference(root, tiny_model, capsys, monkeypatch, loss_type):
    """Three epochs of 16 pairs: the reward accuracy on the 8 held-out pairs rises from where
    the starting model stands to at least 7 of 8, the margin with it."""
    dpo, lr = LEARNS[loss_type]
    passes = spy_reference_passes(monkeypatch)
    run = root / f"learns-{loss_type}"
    path = job(root, tiny_model, run.name, dpo=dpo, epochs=3, lr=lr, data="no-")
    code, _, err = train(capsys, path, "-o", run)
    assert code == 0, err
    val = events(run, "val")
    before, after = val[0], val[-1]
    print(
        f"{loss_type}: held-out reward accuracy {before['rewards/accuracy']:.3f} -> "
        f"{after['rewards/accuracy']:.3f}, margin {before['rewards/margin']:.4f} -> "
        f"{after['rewards/margin']:.4f}, loss {before['loss']:.4f} -> {after['loss']:.4f}"
    )
    assert after["rewards/accuracy"] >= 0.875, val
    assert after["rewards/accuracy"] > before["rewards/accuracy"], val
    assert after["rewards/margin"] > before["rewards/margin"] + 0.05, val
    assert after["loss"] < before["loss"], val
    assert len(passes) == (0 if loss_type in ("orpo", "simpo") else 2)  # train and validation


def test_orpo_reports_its_nll_term(root, tiny_model, capsys):
    """orpo's `sft_loss` figure is its NLL term, in the loss with weight 1: on step 1 the loss
    is that term plus λ times the odds-ratio term, which is ≥ 0 and (the policy holding no
    preference yet) near ln 2."""
    run = root / "orpo-nll"
    dpo = "{loss_type: orpo, ref_policy_kl_penalty: 0.5}"
    code, _, err = train(capsys, job(root, tiny_model, run.name, dpo=dpo), "-o", run)
    assert code == 0, err
    first = events(run, "train")[0]
    odds_ratio_term = (first["loss"] - first["sft_loss"]) / 0.5
    assert first["sft_loss"] > 1.0 and 0.3 < odds_ratio_term < 1.2, first
    val = events(run, "val")[0]
    assert val["sft_loss"] > 1.0 and val["loss"] > val["sft_loss"], val


@pytest.mark.parametrize("loss_type", ["orpo", "simpo"])
def test_reference_free_runs_hold_no_reference(root, tiny_model, capsys, monkeypatch, loss_type):
    """No reference pass and no reference values in a checkpoint's trainer state; resumed from
    its step-2 checkpoint, the run needs none and repeats the uninterrupted one."""
    passes = spy_reference_passes(monkeypatch)
    run = root / f"free-{loss_type}"
    path = job(root, tiny_model, run.name, dpo=f"{{loss_type: {loss_type}}}")
    every_2 = ("--set", "output.checkpoint_steps=2")
    code, _, err = train(capsys, path, "-o", run, *every_2)
    assert code == 0, err
    assert passes == []
    states = sorted((run / "checkpoints").glob("step_*/trainer_state.json"))
    assert [p.parent.name for p in states] == ["step_2", "step_4"]
    for state in states:
        assert dpo_objective.REFERENCE_KEY not in json.loads(state.read_text())
    whole = root / f"free-{loss_type}-whole"
    shutil.copytree(run, whole)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step_4")
    code, _, err = train(capsys, path, "-o", run, "--resume", *every_2)
    assert code == 0, err
    assert passes == []
    assert_same_run(whole, run)
    assert_same_final(whole, run)


def test_dpo_checkpoints_keep_their_reference(root, tiny_model, capsys):
    """The counterpart that makes the test above able to fail: kto_pair keeps it."""
    run = root / "kto-pair-state"
    dpo = "{loss_type: kto_pair}"
    code, _, err = train(capsys, job(root, tiny_model, run.name, dpo=dpo), "-o", run)
    assert code == 0, err
    (state,) = (run / "checkpoints").glob("step_*/trainer_state.json")
    saved = json.loads(state.read_text())[dpo_objective.REFERENCE_KEY]
    assert len(saved["train"]) == 32 and len(saved["validation"]) == 16  # one per side row
    assert all(math.isfinite(x) and x < 0 for x in saved["train"])


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["orpo"])  # simpo: the same objective code, no NLL term
def test_data_parallel_equals_one_process(root, tiny_model, loss_type):
    """Two gloo processes, each its share of the pairs, train exactly as one process does."""
    dpo = f"{{loss_type: {loss_type}, ref_policy_kl_penalty: 1.0}}"
    single, pair = root / f"dp1-{loss_type}", root / f"dp2-{loss_type}"
    cli(job(root, tiny_model, single.name, dpo=dpo), "-o", single)
    cli(job(root, tiny_model, pair.name, dpo=dpo), "-o", pair, *layout(2))
    assert_same_run(single, pair)
    assert_same_final(single, pair)
    for a, b in zip(events(single, "val"), events(pair, "val"), strict=True):
        for key in ("rewards/accuracy", "rewards/margin"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-7), (key, a, b)


REFUSED = [  # (backend, training.dpo, the one line `tuneplex validate` prints)
    (
        "automodel",
        "{loss_type: orpo, sft_loss_weight: 1.0}",
        "training.dpo.sft_loss_weight: 1: orpo's loss holds the chosen responses' NLL already "
        "(ref_policy_kl_penalty weighs its odds-ratio term against it); set it to 0",
    ),
    (
        "automodel",
        "{loss_type: simpo, preference_average_log_probs: false}",
        "training.dpo.preference_average_log_probs: false: simpo compares per-token average "
        "log-probabilities by definition; set it to true or leave it out",
    ),
    (
        "automodel",
        "{loss_type: kto_pair, simpo_gamma: 2.0}",
        "training.dpo.simpo_gamma: only used with loss_type simpo (got kto_pair)",
    ),
    (
        "unsloth",
        "{loss_type: kto_pair}",
        "training.dpo.loss_type: kto_pair: no TRL trainer computes KTO on pairs (DPOTrainer "
        "dropped it, KTOTrainer takes unpaired rows); train it with --backend automodel",
    ),
]


@pytest.mark.parametrize(("backend", "dpo", "line"), REFUSED)
def test_contradictions_are_refused_in_one_line_by_validate(tmp_path, capsys, backend, dpo, line):
    """`tuneplex validate`: exit 2, nothing on stdout, the one line naming the key."""
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
    path.write_text(path.read_text().replace(dpo, "{loss_type: simpo}"))
    assert main(["validate", str(path), "--backend", backend]) == 0
