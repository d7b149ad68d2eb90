"""Real runs of both backends log to W&B (offline), MLflow (a local store) and TensorBoard, the
same values as metrics.jsonl, through the run recorder; only rank 0 logs in a 2-process run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

from helpers import chat_rows, cli, merge_yaml, train, write_rows  # noqa: E402
from test_trackers import (  # noqa: E402, F401 (the autouse fixture isolates tracker settings)
    _tracker_env,
    assert_no_secret,
    tensorboard_scalars,
    wandb_history,
    wandb_records,
)
from tuneplex.runs import read_metrics  # noqa: E402

SECRET = "tuneplex-train-secret-" + "5b1e" * 10


def integrations_yaml(run_dir: Path) -> str:
    store = run_dir.parent / f"{run_dir.name}-mlruns"
    return f"""\
integrations:
  wandb: {{project: tiny, mode: offline, tags: [cpu]}}
  mlflow: {{tracking_uri: "file:{store}", experiment: tiny, token: {SECRET}}}
  tensorboard: {{}}
"""


def expected(run_dir: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {"train/loss": {}, "val/loss": {}}
    for e in read_metrics(run_dir):
        out[f"{e['split']}/loss"][e["step"]] = e["loss"]
    return out


def mlflow_history(run_dir: Path) -> tuple[list, dict[str, dict[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{run_dir.parent / f'{run_dir.name}-mlruns'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    history = {
        key: {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, key)}
        for key in ("train/loss", "val/loss")
    }
    return runs, history


def assert_logged_everywhere(run_dir: Path, *, wandb: bool = True) -> None:
    want = expected(run_dir)
    assert want["train/loss"] and want["val/loss"]
    board = tensorboard_scalars(run_dir / "tensorboard")
    runs, flow = mlflow_history(run_dir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    for name in ("train/loss", "val/loss"):
        assert flow[name] == want[name]
        assert board[name] == pytest.approx(want[name], rel=1e-6)  # stored as float32
    if wandb:
        history = wandb_history(wandb_records(run_dir))
        for name in ("train/loss", "val/loss"):
            assert history[name] == want[name]
    assert_no_secret(run_dir)


@pytest.fixture
def automodel_job(tmp_path, tiny_model):
    data = tmp_path / "train.jsonl"
    val = tmp_path / "val.jsonl"
    write_rows(data, chat_rows(16))
    write_rows(val, chat_rows(6, seed=1))

    def _job(run_dir: Path, extra: str = "") -> Path:
        text = f"""\
model: {tiny_model}
dataset: {{training: {data}, validation: {val}}}
training: {{max_seq_length: 128}}
schedule: {{epochs: 2, seed: 7, val_check_interval: 0.5}}
batch: {{global_batch_size: 4, micro_batch_size: 2}}
optimizer: {{learning_rate: 1.0e-2, warmup_steps: 1}}
"""
        path = tmp_path / "job.yaml"
        path.write_text(merge_yaml(merge_yaml(text, integrations_yaml(run_dir)), extra))
        return path

    return _job


def test_an_automodel_run_logs_the_same_values_to_every_tracker(capsys, automodel_job, tmp_path):
    run = tmp_path / "run"
    code, out, err = train(capsys, automodel_job(run), "-o", run)
    assert code == 0, err
    assert SECRET not in out + err
    assert_logged_everywhere(run)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_only_rank_0_logs_in_a_two_process_run(automodel_job, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the store back here
    run = tmp_path / "run2"
    proc = cli(automodel_job(run), "-o", run, "--set", "parallelism.num_gpus_per_node=2")
    assert "2 processes" in proc.stdout
    assert SECRET not in proc.stdout + proc.stderr
    assert_logged_everywhere(run)  # one MLflow run, one value per step on every chart
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1


def test_the_unsloth_backend_logs_through_the_same_recorder(
    capsys, tmp_path, tiny_model, monkeypatch
):
    pytest.importorskip("trl")
    import tuneplex_unsloth.trainer as trainer
    from tuneplex.backend import EnvironmentStatus
    from tuneplex.plugins import registry
    from tuneplex_unsloth.model import PeftLoader

    monkeypatch.setattr(trainer, "LOADER", PeftLoader)  # the CPU seam (tests/test_unsloth_train)
    backend = registry().backends["unsloth"].backend
    monkeypatch.setattr(
        type(backend), "check_environment", lambda self: EnvironmentStatus(True, "test")
    )
    data, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    write_rows(data, chat_rows(16))
    write_rows(val, chat_rows(6, seed=1))
    run = tmp_path / "u"
    job = tmp_path / "u.yaml"
    text = f"""\
model: {{name: {tiny_model}, max_seq_length: 128, load_in_4bit: false}}
dataset: {{path: {data}, validation_path: {val}, apply_chat_template: true}}
training: {{use_gradient_checkpointing: false}}
schedule: {{epochs: 2, seed: 1, eval_steps: 4}}
batch: {{per_device_train_batch_size: 2, gradient_accumulation_steps: 2}}
optimizer: {{learning_rate: 1.0e-2}}
"""
    job.write_text(merge_yaml(text, integrations_yaml(run)))
    code, out, err = train(capsys, job, "--backend", "unsloth", "-o", run)
    assert code == 0, err
    assert SECRET not in out + err
    assert_logged_everywhere(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["backend"] == "unsloth" and summary["status"] == "completed"


def test_a_tracker_package_missing_is_refused_before_anything_loads(
    capsys, automodel_job, tmp_path, monkeypatch
):
    import sys

    from tuneplex.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # the import system's own "not installed"
    job = automodel_job(tmp_path / "never")
    for command in ("validate", "train"):
        assert main([command, str(job)]) == 2
        assert capsys.readouterr().err == (
            "integrations.wandb: the wandb package is not installed "
            '(pip install "tuneplex[wandb]")\n'
        )
    assert not (tmp_path / "never").exists()
