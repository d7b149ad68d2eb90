"""Experiment trackers with the real libraries: W&B offline, MLflow file stores, TensorBoard event
files, each read back through the library's own reader; failures stay one warning line."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import free_port
from tuneplex.errors import Problem, redact
from tuneplex.runs.trackers import STATE_FILE, Trackers, missing_packages, tracker_metrics
from tuneplex.schema import IntegrationsConfig

SECRET = "tuneplex-test-secret-" + "7f3a9c" * 7  # 40+ characters, as W&B keys are
TRAIN = [
    {"split": "train", "step": s, "epoch": s / 4, "loss": 3.0 - 0.25 * s, "lr": 1e-3 * s}
    for s in range(1, 5)
]
VAL = [{"split": "val", "step": 2, "loss": 2.4}, {"split": "val", "step": 4, "loss": 2.1}]
SUMMARY = {"status": "completed", "steps": 4, "train_loss": 2.0, "val_loss": 2.1, "final": "final"}


@pytest.fixture(autouse=True)
def _tracker_env(tmp_path, monkeypatch):
    """No credentials or modes from the machine; W&B's own files under tmp_path. Every variable
    a tracker may set is restored afterwards."""
    for name in (
        "WANDB_MODE",
        "WANDB_API_KEY",
        "WANDB_DIR",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_ALLOW_FILE_STORE",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
    ):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


def integrations(**sections) -> IntegrationsConfig:
    return IntegrationsConfig.model_validate(sections)


def job_config(section: IntegrationsConfig) -> dict:
    """The resolved job as the caller hands it over: redacted."""
    job = {"model": "tiny", "optimizer": {"learning_rate": 1e-3}, "dataset": {"training": "t"}}
    job["integrations"] = section.model_dump(exclude_none=True) if section is not None else {}
    for tracker in job["integrations"].values():  # SecretStr -> its value, as in the job file
        for key, value in tracker.items():
            if hasattr(value, "get_secret_value"):
                tracker[key] = value.get_secret_value()
    return redact(job)


def run_all(section, run_dir: Path, *, status="completed", resume=False, events=None, name="r"):
    """Open, log TRAIN and VAL (or `events`), finish: the warnings it gave."""
    warnings: list[str] = []
    trackers = Trackers.open(
        section,
        run_dir=run_dir,
        run_name=name,
        config=job_config(section),
        resume=resume,
        warn=warnings.append,
    )
    for event in events if events is not None else [*TRAIN[:2], VAL[0], *TRAIN[2:], VAL[1]]:
        trackers.log(tracker_metrics(event), step=event["step"])
    trackers.finish(status=status, summary={**SUMMARY, "status": status})
    return warnings


def assert_no_secret(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------- the mapping and the imports


def test_tracker_metrics_names_train_and_validation_values():
    train = {"split": "train", "step": 3, "epoch": 0.75, "loss": 2.1, "lr": 1e-3, "grad_norm": 0.8}
    train |= {"tokens_per_s": 1234.5, "ce_loss": 1.5, "kd_loss": 0.6, "tokens": 512}
    assert tracker_metrics(train) == {
        "train/epoch": 0.75,
        "train/loss": 2.1,
        "train/lr": 1e-3,
        "train/grad_norm": 0.8,
        "train/tokens_per_s": 1234.5,
        "train/ce_loss": 1.5,
        "train/kd_loss": 0.6,
        "train/tokens": 512,
    }
    assert tracker_metrics({"split": "val", "step": 4, "loss": 1.9, "tokens": 80}) == {
        "val/loss": 1.9,
        "val/tokens": 80,
    }


def test_tracker_metrics_drops_what_no_chart_draws():
    event = {"split": "train", "step": 1, "loss": 2.0, "note": "x", "nan_seen": True, "d": {"a": 1}}
    event |= {"none": None, "list": [1, 2]}
    assert tracker_metrics(event) == {"train/loss": 2.0}
    assert math.isnan(tracker_metrics({"split": "train", "loss": float("nan")})["train/loss"])


def test_importing_trackers_imports_no_tracker_library():
    code = (
        "import sys, tuneplex.runs.trackers\n"
        "print([m for m in ('wandb', 'mlflow', 'tensorboard', 'torch') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_packages_names_each_uninstalled_tracker(monkeypatch):
    every = integrations(
        wandb={"project": "p"}, mlflow={"tracking_uri": "file:./m"}, tensorboard={}
    )
    assert missing_packages(every) == []
    assert missing_packages(None) == []
    assert missing_packages(integrations()) == []
    # None in sys.modules is the import system's own "not importable"
    for package in ("wandb", "mlflow", "tensorboard"):
        monkeypatch.setitem(sys.modules, package, None)
    assert missing_packages(every) == [
        Problem(
            "integrations.wandb",
            'the wandb package is not installed (pip install "tuneplex[wandb]")',
        ),
        Problem(
            "integrations.mlflow",
            'the mlflow package is not installed (pip install "tuneplex[mlflow]")',
        ),
        Problem(
            "integrations.tensorboard",
            'the tensorboard package is not installed (pip install "tuneplex[tensorboard]")',
        ),
    ]
    # W&B switched off needs no package
    assert missing_packages(integrations(wandb={"project": "p", "mode": "disabled"})) == []


def test_missing_packages_names_a_database_store_without_sqlalchemy(monkeypatch):
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    sqlite = integrations(mlflow={"tracking_uri": "sqlite:///mlflow.db"})
    assert [str(p) for p in missing_packages(sqlite)] == [
        "integrations.mlflow.tracking_uri: a sqlite: store needs the sqlalchemy package "
        '(pip install "tuneplex[mlflow]")'
    ]
    assert missing_packages(integrations(mlflow={"tracking_uri": "http://h:5000"})) == []


def test_no_integrations_is_a_quiet_no_op(tmp_path):
    for section in (None, integrations(), integrations(wandb={"project": "p", "mode": "disabled"})):
        assert run_all(section, tmp_path) == []
        assert (
            Trackers.open(
                section, run_dir=tmp_path, run_name="r", config={}, resume=False, warn=print
            ).active
            == ()
        )
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- W&B, offline


def wandb_records(run_dir: Path) -> list:
    """Every record of the run's .wandb files, oldest run first, through W&B's own protobufs.

    The file is W&B's LevelDB-style log: a 7-byte header (`:W&B`, magic, version), then 32 KiB
    blocks of records, each a 7-byte header (crc32, length, type: full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        offset, pending = 7, b""
        while offset + 7 <= len(data):
            left = 32768 - offset % 32768
            if left < 7:  # too little room for a header: the block is padded
                offset += left
                continue
            _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
            if kind == 0:  # zero padding up to the end of the block
                offset += left
                continue
            pending += data[offset + 7 : offset + 7 + length]
            offset += 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


def wandb_history(records) -> dict[str, dict[int, float]]:
    history: dict[str, dict[int, float]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    history.setdefault(key, {})[record.history.step.num] = json.loads(
                        item.value_json
                    )
    return history


def test_wandb_offline_run_holds_every_step_and_the_redacted_job(tmp_path, capfd, caplog):
    section = integrations(
        wandb={"project": "proj", "mode": "offline", "tags": ["t1"], "api_key": SECRET}
    )
    assert run_all(section, tmp_path, name="run-7") == []

    records = wandb_records(tmp_path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name, list(run.tags)) == ("proj", "run-7", ["t1"])
    history = wandb_history(records)
    assert history["train/loss"] == {e["step"]: e["loss"] for e in TRAIN}
    assert history["train/lr"] == {e["step"]: e["lr"] for e in TRAIN}
    assert history["train/epoch"] == {e["step"]: e["epoch"] for e in TRAIN}
    assert history["val/loss"] == {e["step"]: e["loss"] for e in VAL}

    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["integrations"]["wandb"]["api_key"] == "***"
    assert config["optimizer"] == {"learning_rate": 1e-3}
    summary = {
        u.key: json.loads(u.value_json)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for u in r.summary.update
        if u.key
    }
    assert summary["status"] == "completed" and summary["train_loss"] == 2.0
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0]
    assert_no_secret(tmp_path)
    # nothing on the terminal, nothing through the root logger
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert not [r for r in caplog.records if r.name.split(".")[0] in ("wandb", "mlflow")]


def test_wandb_resumed_run_continues_the_same_run_id(tmp_path):
    section = integrations(wandb={"project": "proj", "mode": "offline"})
    assert run_all(section, tmp_path, status="interrupted", events=TRAIN[:2]) == []
    first = json.loads((tmp_path / STATE_FILE).read_text())["wandb"]
    assert run_all(section, tmp_path, resume=True, events=TRAIN[2:]) == []
    assert json.loads((tmp_path / STATE_FILE).read_text())["wandb"] == first

    records = wandb_records(tmp_path)
    runs = [r.run.run_id for r in records if r.WhichOneof("record_type") == "run"]
    assert runs == [first, first]
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [1, 0]
    assert wandb_history(records)["train/loss"] == {e["step"]: e["loss"] for e in TRAIN}
    # a fresh (not resumed) run in the same directory is a new W&B run
    assert run_all(section, tmp_path, events=TRAIN[:1]) == []
    assert json.loads((tmp_path / STATE_FILE).read_text())["wandb"] != first


# ---------------------------------------------------------------- MLflow, local stores


def mlflow_run(uri: str, run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(json.loads((run_dir / STATE_FILE).read_text())["mlflow"])
    history = {
        key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        for key in ("train/loss", "train/lr", "val/loss")
    }
    return client, run, history


def test_mlflow_file_store_holds_metrics_params_tags_and_status(tmp_path):
    store = tmp_path / "mlruns"
    section = integrations(
        mlflow={
            "tracking_uri": store.as_uri(),
            "experiment": "exp-1",
            "tags": {"team": "nlp"},
            "token": SECRET,
        }
    )
    warnings: list[str] = []
    config = job_config(section)
    config["long"] = "x" * 7000  # past MLflow's limit on a param's value
    config["many"] = {f"k{i}": i for i in range(150)}  # past 100 params in one batch
    trackers = Trackers.open(
        section,
        run_dir=tmp_path,
        run_name="run-9",
        config=config,
        resume=False,
        warn=warnings.append,
    )
    for event in [*TRAIN, *VAL]:
        trackers.log(tracker_metrics(event), step=event["step"])
    trackers.finish(status="completed", summary=SUMMARY)
    assert warnings == []

    client, run, history = mlflow_run(store.as_uri(), tmp_path)
    assert history["train/loss"] == {e["step"]: e["loss"] for e in TRAIN}
    assert history["train/lr"] == {e["step"]: e["lr"] for e in TRAIN}
    assert history["val/loss"] == {e["step"]: e["loss"] for e in VAL}
    assert run.info.status == "FINISHED" and run.info.run_name == "run-9"
    assert client.get_experiment(run.info.experiment_id).name == "exp-1"
    params = run.data.params
    assert params["optimizer.learning_rate"] == "0.001" and params["model"] == "tiny"
    assert params["integrations.mlflow.token"] == "***"
    assert params["integrations.mlflow.tags.team"] == "nlp"
    assert params["many.k149"] == "149" and len(params["long"]) == 6000
    assert run.data.tags["team"] == "nlp" and run.data.tags["summary/status"] == "completed"
    assert run.data.metrics["summary/train_loss"] == 2.0
    assert_no_secret(store)


def test_mlflow_plain_path_store_killed_then_resumed(tmp_path):
    store = tmp_path / "plain-store"
    section = integrations(mlflow={"tracking_uri": str(store)})
    assert run_all(section, tmp_path, status="interrupted", events=TRAIN[:2]) == []
    _, run, history = mlflow_run(str(store), tmp_path)
    assert run.info.status == "KILLED" and run.info.run_name == "r"
    assert history["train/loss"] == {e["step"]: e["loss"] for e in TRAIN[:2]}

    assert run_all(section, tmp_path, resume=True, events=TRAIN[2:]) == []
    _, resumed, history = mlflow_run(str(store), tmp_path)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert history["train/loss"] == {e["step"]: e["loss"] for e in TRAIN}


@pytest.mark.parametrize(
    ("status", "mlflow_status"),
    [
        ("completed", "FINISHED"),
        ("interrupted", "KILLED"),
        ("diverged", "FAILED"),
        ("failed", "FAILED"),
    ],
)
def test_mlflow_run_status_follows_how_the_run_ended(tmp_path, status, mlflow_status):
    store = (tmp_path / "mlruns").as_uri()
    assert run_all(integrations(mlflow={"tracking_uri": store}), tmp_path, status=status) == []
    _, run, _ = mlflow_run(store, tmp_path)
    assert run.info.status == mlflow_status
    assert run.data.tags["summary/status"] == status


def test_mlflow_sqlite_store_holds_every_step(tmp_path, capfd):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert run_all(integrations(mlflow={"tracking_uri": uri}), tmp_path) == []
    _, run, history = mlflow_run(uri, tmp_path)
    assert run.info.status == "FINISHED"
    assert history["train/loss"] == {e["step"]: e["loss"] for e in TRAIN}
    assert history["val/loss"] == {e["step"]: e["loss"] for e in VAL}
    out, err = capfd.readouterr()
    assert out == err == ""  # MLflow's database set-up lines stay off the terminal


def test_library_log_records_stay_off_the_terminal(tmp_path, capfd, caplog):
    """MLflow sets up its own stderr handler when imported; after open none of it prints."""
    import logging

    section = integrations(mlflow={"tracking_uri": (tmp_path / "m").as_uri()})
    Trackers.open(section, run_dir=tmp_path, run_name="r", config={}, resume=False, warn=print)
    for name in ("mlflow.tracking.client", "mlflow", "tensorboard", "absl"):
        logging.getLogger(name).warning("probe from %s", name)
    assert capfd.readouterr() == ("", "")
    assert not [r for r in caplog.records if "probe" in r.getMessage()]


# ---------------------------------------------------------------- TensorBoard


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    scalars = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}
    for events in scalars.values():  # one value per step: nothing logged twice survives
        assert len({e.step for e in events}) == len(events), events
    return {tag: {e.step: e.value for e in events} for tag, events in scalars.items()}


def test_tensorboard_event_files_hold_every_scalar_and_the_job(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run_all(integrations(tensorboard={}), tmp_path) == []
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == pytest.approx({e["step"]: e["loss"] for e in TRAIN})
    assert scalars["train/lr"] == pytest.approx({e["step"]: e["lr"] for e in TRAIN})
    assert scalars["val/loss"] == pytest.approx({e["step"]: e["loss"] for e in VAL})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    text = acc.Tensors("config")[0].tensor_proto.string_val[0].decode()
    assert '"learning_rate": 0.001' in text
    assert '"status": "completed"' in acc.Tensors("summary")[0].tensor_proto.string_val[0].decode()


def test_tensorboard_own_dir_and_a_resume_replacing_the_steps_logged_again(tmp_path):
    log_dir = tmp_path / "tb-elsewhere"
    section = integrations(tensorboard={"dir": str(log_dir)})
    assert run_all(section, tmp_path, status="interrupted", events=TRAIN) == []
    again = [{**e, "loss": e["loss"] + 10} for e in TRAIN[2:]]  # steps 3, 4 after a resume
    assert run_all(section, tmp_path, resume=True, events=again) == []
    assert not (tmp_path / "tensorboard").exists()
    assert tensorboard_scalars(log_dir)["train/loss"] == pytest.approx(
        {e["step"]: e["loss"] for e in [*TRAIN[:2], *again]}
    )


# ---------------------------------------------------------------- failures stay warnings


def test_unreachable_mlflow_server_is_one_warning_and_the_rest_goes_on(
    tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://user:{SECRET}@127.0.0.1:{free_port()}"
    section = integrations(mlflow={"tracking_uri": uri, "token": SECRET}, tensorboard={})
    warnings = run_all(section, tmp_path)
    assert len(warnings) == 1, warnings
    line = warnings[0]
    assert line.startswith("integrations.mlflow: cannot start (MlflowException: ")
    assert line.endswith("; MLflow logging stopped, metrics.jsonl continues")
    assert SECRET not in line and "\n" not in line
    assert capfd.readouterr() == ("", "")
    assert tensorboard_scalars(tmp_path / "tensorboard")["train/loss"] == pytest.approx(
        {e["step"]: e["loss"] for e in TRAIN}
    )


def test_mlflow_server_error_is_one_warning_after_the_token_reached_it(tmp_path, monkeypatch):
    """A real HTTP server that takes the token and refuses the request, quoting it back."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Failing(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization", ""))
            body = json.dumps({"error_code": "BAD_REQUEST", "message": f"bad {SECRET}"})
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        do_POST = do_GET

        def log_message(self, *args):
            pass

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        warnings = run_all(integrations(mlflow={"tracking_uri": uri, "token": SECRET}), tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert seen and seen[0] == f"Bearer {SECRET}"
    assert len(warnings) == 1 and warnings[0].startswith("integrations.mlflow: cannot start (")
    assert SECRET not in warnings[0] and "bad ***" in warnings[0], warnings


def test_unreachable_wandb_server_is_one_warning_and_the_key_stays_secret(
    tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    section = integrations(wandb={"project": "p", "api_key": SECRET}, tensorboard={})
    warnings = run_all(section, tmp_path)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("integrations.wandb: cannot start (CommError: ")
    assert SECRET not in warnings[0]
    assert_no_secret(tmp_path)  # W&B's debug logs included; nothing saved to a netrc either
    assert not (tmp_path / "netrc").exists()
    assert capfd.readouterr() == ("", "")
    assert "train/loss" in tensorboard_scalars(tmp_path / "tensorboard")


def test_tracker_failing_midway_is_one_warning_and_later_logs_skip_it(tmp_path, capfd):
    store = tmp_path / "mlruns"
    section = integrations(mlflow={"tracking_uri": store.as_uri()}, tensorboard={})
    warnings: list[str] = []
    trackers = Trackers.open(
        section, run_dir=tmp_path, run_name="r", config={}, resume=False, warn=warnings.append
    )
    assert trackers.active == ("mlflow", "tensorboard")
    trackers.log(tracker_metrics(TRAIN[0]), step=1)
    shutil.rmtree(store)  # the store goes away under a running job
    for event in TRAIN[1:]:
        trackers.log(tracker_metrics(event), step=event["step"])
    trackers.finish(status="diverged", summary=SUMMARY)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("integrations.mlflow: cannot log (")
    assert trackers.active == ()
    assert capfd.readouterr() == ("", "")
    assert tensorboard_scalars(tmp_path / "tensorboard")["train/loss"] == pytest.approx(
        {e["step"]: e["loss"] for e in TRAIN}
    )


def test_tensorboard_dir_that_is_a_file_is_one_warning(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    section = integrations(
        tensorboard={"dir": str(blocker)}, wandb={"project": "p", "mode": "offline"}
    )
    warnings = run_all(section, tmp_path)
    assert len(warnings) == 1 and warnings[0].startswith("integrations.tensorboard: cannot start (")
    assert wandb_history(wandb_records(tmp_path))["train/loss"] == {
        e["step"]: e["loss"] for e in TRAIN
    }
