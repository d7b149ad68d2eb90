"""A training objective is the unit of the automodel backend: a fourth one, written here and
put in the registry, trains through the unchanged recipe and loop (its loss, figures,
validation and checkpoint state all its own, resume included); the three shipped objectives
fit the protocol and the training types of the schema; and the loop, the recipe and the
parallel layer name none of them."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import get_args

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers import assert_same_run, chat_rows, train, write_rows  # noqa: E402
from tuneplex.data.collate import RowTable  # noqa: E402
from tuneplex.runs import read_metrics  # noqa: E402
from tuneplex_automodel import objectives  # noqa: E402
from tuneplex_automodel.loop import backward_micro_batches, device_batch  # noqa: E402
from tuneplex_automodel.objectives.sft import token_mean_loss  # noqa: E402

PACKAGE = Path(objectives.__file__).resolve().parents[1]

STATE_KEY = "half_steps"


class HalfSft:
    """SFT's loss halved: reports the whole loss as `full_loss`, validates at half SFT's
    validation loss, and counts its steps in the checkpoint's trainer state."""

    unit = "rows"
    separate_head = False
    models: tuple[tuple[str, str], ...] = ()
    updates_per_step = 1

    def __init__(self, job):
        self.steps = 0
        MADE.append(self)

    def tables(self, prepared):
        val = prepared.validation
        return RowTable(prepared.train.dataset), RowTable(val.dataset) if val else None

    def setup_model(self, model, *, tokenizer, runtime, dist) -> None:
        pass

    def begin(self, parts) -> None:
        pass

    def gradients(self, parts, *, micro_batches, step_rows, update, step):
        n = max(int(parts.train_rows.target_counts[step_rows].sum()), 1)

        def loss_of(indices):
            batch = device_batch(
                parts.train_rows, indices, pad_id=parts.pad_id, device=parts.runtime.device
            )
            full = parts.loss(parts.model, batch, autocast=parts.runtime.autocast) / n
            return 0.5 * full, full.detach().reshape(1)

        self.steps += 1
        return backward_micro_batches(parts, micro_batches, loss_of=loss_of)

    def figures(self, sums):
        return {"full_loss": sums[0]}

    def validate(self, parts):
        full = token_mean_loss(parts)
        return 0.5 * full, {"full_loss": full}

    def state(self):
        return {STATE_KEY: self.steps}

    def restore(self, state) -> None:
        self.steps = state[STATE_KEY]


MADE: list[HalfSft] = []


@pytest.fixture
def job(tmp_path, tiny_model):
    write_rows(tmp_path / "train.jsonl", chat_rows(12))
    write_rows(tmp_path / "val.jsonl", chat_rows(4, seed=1))
    path = tmp_path / "job.yaml"
    path.write_text(
        f"""\
model: {tiny_model}
dataset: {{training: {tmp_path / "train.jsonl"}, validation: {tmp_path / "val.jsonl"}}}
training: {{max_seq_length: 96, precision: fp32}}
schedule: {{epochs: 1, seed: 4, val_check_interval: 0.5}}
batch: {{global_batch_size: 4, micro_batch_size: 2}}
optimizer: {{learning_rate: 1.0e-2, warmup_steps: 1}}
output: {{checkpoint_steps: 2}}
"""
    )
    return path


def events(run, split: str) -> list[dict]:
    return [e for e in read_metrics(run) if e["split"] == split]


def test_a_fourth_objective_trains_through_the_unchanged_loop(capsys, job, tmp_path, monkeypatch):
    sft, half = tmp_path / "sft", tmp_path / "half"
    code, _, err = train(capsys, job, "-o", sft)
    assert code == 0, err
    MADE.clear()
    monkeypatch.setitem(objectives.OBJECTIVES, "sft", HalfSft)
    code, out, err = train(capsys, job, "-o", half)
    assert code == 0, err
    assert len(MADE) == 1 and MADE[0].steps == 3  # 12 rows, 4 a step

    a, b = events(sft, "train"), events(half, "train")
    assert [e["step"] for e in b] == [1, 2, 3]
    # step 1: the same weights and rows, half the loss and (before clipping) half the gradient
    assert math.isclose(b[0]["loss"], 0.5 * a[0]["loss"], rel_tol=1e-6), (a[0], b[0])
    assert math.isclose(b[0]["full_loss"], a[0]["loss"], rel_tol=1e-6), (a[0], b[0])
    assert math.isclose(b[0]["grad_norm"], 0.5 * a[0]["grad_norm"], rel_tol=1e-5)
    assert b[0]["tokens"] == a[0]["tokens"]
    for e in b:
        assert math.isclose(e["full_loss"], 2 * e["loss"], rel_tol=1e-6), e
    assert "full_loss" not in a[0]
    val_a, val_b = events(sft, "val"), events(half, "val")
    assert [e["step"] for e in val_b] == [e["step"] for e in val_a] and val_b[0]["step"] == 0
    assert math.isclose(val_b[0]["loss"], 0.5 * val_a[0]["loss"], rel_tol=1e-6)
    assert math.isclose(val_b[0]["full_loss"], val_a[0]["loss"], rel_tol=1e-6)
    assert "data: 12 training rows, 4 validation rows; 3 steps" in out

    state = json.loads((half / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state[STATE_KEY] == 2
    summary = json.loads((half / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3

    # resumed from step 2: the objective gets its state back, and the run is the same
    resumed = tmp_path / "resumed"
    shutil.copytree(half, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step_3")
    code, _, err = train(capsys, job, "-o", resumed, "--resume")
    assert code == 0, err
    assert MADE[-1].steps == 3
    assert_same_run(half, resumed)
    assert events(resumed, "train")[-1]["full_loss"] == pytest.approx(b[-1]["full_loss"])


def test_the_registry_holds_one_objective_per_training_type():
    from tuneplex_automodel.schema import AutomodelJobInput, AutomodelTraining

    types = get_args(AutomodelTraining.model_fields["training_type"].annotation)
    assert set(objectives.OBJECTIVES) == set(types) == {"sft", "distillation", "dpo", "grpo"}
    extra = {
        "distillation": {"teacher_model": "/t", "finetuning_type": "all_weights"},
        "grpo": {"grpo": {"environment": {"name": "math"}}},
    }
    for kind in types:
        job = AutomodelJobInput.model_validate(
            {
                "model": "/m",
                "dataset": {"training": "train.jsonl"},
                "training": {"training_type": kind, **extra.get(kind, {})},
            }
        )
        made = objectives.objective_for(job)
        assert isinstance(made, objectives.Objective), kind
        assert made.unit == {"dpo": "pairs", "grpo": "prompts"}.get(kind, "rows")
        assert made.separate_head == (kind == "distillation")
        teacher = (("training.teacher_model", "/t"),) if kind == "distillation" else ()
        assert made.models == teacher
        assert made.updates_per_step == 1


NAMES = (
    "dpo",
    "preference",
    "teacher",
    "distill",
    "sft",
    "kd_loss",
    "ce_loss",
    "reward",
    "grpo",
    "rollout",
)
"""What only an objective may say."""


GENERIC = [
    "loop.py",
    "trainer.py",
    "plan.py",
    "checkpoint.py",
    *sorted(p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "parallel").glob("*.py")),
]
"""The loop, the recipe, the plan, checkpoints and the parallel layer."""


@pytest.mark.parametrize("module", GENERIC)
def test_the_loop_the_recipe_and_the_parallel_layer_name_no_objective(module):
    text = (PACKAGE / module).read_text(encoding="utf-8").lower()
    assert [n for n in NAMES if n in text] == []
