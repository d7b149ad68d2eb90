"""Experiment trackers (W&B, MLflow, TensorBoard): the metrics of metrics.jsonl, mirrored.

Only rank 0 opens them. A tracker is a guest of the run: whatever it raises (a server down, a
bad URI, a full disk) is reported once, in one line without secrets, and that tracker stops;
training, metrics.jsonl and the other trackers go on. Each library is imported in `open`, never
at module import, and its own console output and log records are kept off the terminal.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tuneplex.errors import Problem, extra_of, first_line, one_line
from tuneplex.runs.directory import STATE_DIR
from tuneplex.runs.records import write_json_atomic

STATE_FILE = f"{STATE_DIR}/trackers.json"
"""The trackers' own run ids, so that a resumed run continues the same tracker runs."""
TENSORBOARD_DIR = "tensorboard"
STATUSES = ("completed", "interrupted", "diverged", "failed")
"""How a run ends, as summary.json says it."""

# tracker name -> (package that must be importable, pip extra, what messages call it)
_PACKAGES = {
    "wandb": ("wandb", extra_of("wandb"), "W&B"),
    "mlflow": ("mlflow", extra_of("mlflow"), "MLflow"),
    "tensorboard": ("tensorboard", extra_of("tensorboard"), "TensorBoard"),
}
_QUIET_LOGGERS = ("wandb", "mlflow", "absl", "tensorboard", "alembic", "git")
_MLFLOW_STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}  # else FAILED
# MLflow retries a dead server for minutes by default; training waits on each call meanwhile
_MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_MLFLOW_NAME = re.compile(r"[^\w./ :-]")


def tracker_metrics(event: Mapping[str, Any]) -> dict[str, float]:
    """One metrics.jsonl event as trackers name it: `train/loss`, `val/loss`, `train/lr`, ...

    Every numeric value is kept as it is under `<split>/<key>`; `step` is the x axis and `split`
    the prefix, so both go, and so do texts, bools and nested values no chart can draw."""
    split = event.get("split")
    prefix = split if isinstance(split, str) and split else "train"
    return {
        f"{prefix}/{key}": value
        for key, value in event.items()
        if key not in ("step", "split")
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }


def missing_packages(integrations: Any) -> list[Problem]:
    """One problem per configured tracker whose package is not installed, found before training
    starts rather than as a warning once the GPUs are busy. Nothing is imported."""
    problems = []
    for name in configured(integrations):
        package, extra, _ = _PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            problems.append(
                Problem(
                    f"integrations.{name}",
                    f'the {package} package is not installed (pip install "tuneplex[{extra}]")',
                )
            )
    mlflow = getattr(integrations, "mlflow", None)
    if mlflow is not None and not any(p.where == "integrations.mlflow" for p in problems):
        scheme = urlparse(mlflow.tracking_uri).scheme.partition("+")[0]
        if scheme in _DATABASE_SCHEMES and importlib.util.find_spec("sqlalchemy") is None:
            problems.append(
                Problem(
                    "integrations.mlflow.tracking_uri",
                    f"a {scheme}: store needs the sqlalchemy package "
                    f'(pip install "tuneplex[{extra_of("sqlalchemy")}]")',
                )
            )
    return problems


def configured(integrations: Any) -> list[str]:
    """The trackers a job turns on (W&B in mode disabled is off); none for None."""
    names = [name for name in _PACKAGES if getattr(integrations, name, None) is not None]
    if "wandb" in names and integrations.wandb.mode == "disabled":
        names.remove("wandb")
    return names


class Trackers:
    """The open trackers of one run. Every call returns normally, whatever a tracker does."""

    def __init__(self, trackers: list[_Tracker], *, warn: Callable[[str], None], secrets: list):
        self._live = trackers
        self._warn = warn
        self._secrets = secrets

    @classmethod
    def open(
        cls,
        integrations: Any,
        *,
        run_dir: Path,
        run_name: str,
        config: dict[str, Any],
        resume: bool,
        warn: Callable[[str], None],
    ) -> Trackers:
        """Start a tracker run for each configured integration; `config` is the job, redacted.

        With `resume`, the tracker runs this run directory started before are continued where
        the tracker allows it (W&B, MLflow); TensorBoard drops the steps logged again."""
        run_dir = Path(run_dir)
        ids = _read_ids(run_dir) if resume else {}
        secrets = _secret_values(integrations)
        live: list[_Tracker] = []
        opened = cls(live, warn=warn, secrets=secrets)
        for name in configured(integrations):
            _quiet_loggers()
            with opened._guard(name, "cannot start"):
                live.append(
                    _OPENERS[name](
                        getattr(integrations, name),
                        run_dir=run_dir,
                        run_name=run_name,
                        config=config,
                        resume=resume,
                        run_id=ids.get(name),
                    )
                )
            _quiet_loggers()  # again: a library sets up its own handlers when imported
        new_ids = {t.name: t.run_id for t in live if t.run_id is not None}
        if new_ids:
            with opened._guard(None, "cannot record the tracker run ids"):
                (run_dir / STATE_FILE).parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(run_dir / STATE_FILE, {**ids, **new_ids})
        return opened

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the trackers still logging (`wandb`, `mlflow`, `tensorboard`)."""
        return tuple(t.name for t in self._live)

    def log(self, metrics: dict[str, float], *, step: int) -> None:
        """Send one step's metrics (`tracker_metrics` of an event) to every live tracker."""
        if not metrics:
            return
        for tracker in list(self._live):
            with self._guard(tracker.name, "cannot log"):
                tracker.log(metrics, step=step)

    def finish(self, *, status: str, summary: dict[str, Any]) -> None:
        """Close every tracker run with the run's ending (one of STATUSES; another counts as
        failed) and summary.json's figures."""
        for tracker in list(self._live):
            with self._guard(tracker.name, "cannot finish"):
                tracker.finish(status=status, summary=summary)
            if tracker in self._live:
                self._live.remove(tracker)

    @contextlib.contextmanager
    def _guard(self, name: str | None, doing: str) -> Iterator[None]:
        """Whatever the tracker raises (or warns) stays here: one line to `warn`, tracker off."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        except (Exception, SystemExit) as exc:  # a tracker must never stop training
            # (a stop signal is a KeyboardInterrupt: it goes through)
            tracker = next((t for t in self._live if t.name == name), None)
            if tracker is not None:
                self._live.remove(tracker)
                tracker.abandon()
            title = _PACKAGES[name][2] if name else "tracker"
            where = f"integrations.{name}" if name else "integrations"
            message = self._hide(f"{type(exc).__name__}: {first_line(exc)}")
            then = f"; {title} logging stopped" if name else ""
            self._warn(f"{where}: {doing} ({message}){then}, metrics.jsonl continues")

    def _hide(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = re.sub(r"(//)[^/@\s]+@", r"\1***@", text)  # user:password@ in a URL
        return one_line(text, limit=300)


class _Tracker:
    """One tracker run: what `Trackers` needs from each library."""

    name = ""
    run_id: str | None = None

    def log(self, metrics: dict[str, float], *, step: int) -> None:
        raise NotImplementedError

    def finish(self, *, status: str, summary: dict[str, Any]) -> None:
        raise NotImplementedError

    def abandon(self) -> None:
        """Let go after a failure, without waiting on what failed."""


class _Wandb(_Tracker):
    name = "wandb"

    def __init__(
        self, cfg, *, run_dir: Path, run_name: str, config: dict, resume: bool, run_id: str | None
    ):
        import wandb

        if cfg.api_key is not None and cfg.mode == "online":
            # where wandb looks first; a key in its Settings would also reset the server URL
            # (WANDB_BASE_URL) to the default, and one given to wandb.login lands in ~/.netrc
            os.environ["WANDB_API_KEY"] = cfg.api_key.get_secret_value()
        # silent: no banners, links or warnings on the terminal; console off: stdout untouched
        settings = wandb.Settings(silent=True, console="off")
        wandb.setup(settings=settings)  # the terminal stays quiet from the first line on
        try:
            if cfg.mode == "online" and not _wandb_logged_in(wandb):
                raise RuntimeError(
                    "no API key: set WANDB_API_KEY, run `wandb login` or set api_key"
                )
            (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name or run_name,
                tags=list(cfg.tags) or None,
                mode=cfg.mode,
                dir=str(run_dir),  # its files go to run_dir/wandb
                config=config,
                id=run_id,
                resume="allow" if run_id else None,
                settings=settings,
            )
        except BaseException:
            with contextlib.suppress(Exception):
                wandb.teardown()  # no service left behind by a run that never started
            raise
        self.run_id = self.run.id

    def log(self, metrics: dict[str, float], *, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, *, status: str, summary: dict[str, Any]) -> None:
        import wandb

        self.run.summary.update(summary)
        self.run.finish(exit_code=0 if status == "completed" else 1)
        wandb.teardown()  # the wandb-core service ends with the run, not with the process


def _wandb_logged_in(wandb: Any) -> bool:
    """A key from the environment or saved by `wandb login`: found here, or the run fails now
    rather than wait at a login prompt in the middle of a launch."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    if "prompt" not in inspect.signature(wandb.login).parameters:
        return True  # an older wandb: its own init decides
    return bool(wandb.login(prompt=False, verify=False))


class _Mlflow(_Tracker):
    name = "mlflow"

    def __init__(
        self, cfg, *, run_dir: Path, run_name: str, config: dict, resume: bool, run_id: str | None
    ):
        for key, value in _MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        if cfg.token is not None:  # read by the client at each request
            os.environ["MLFLOW_TRACKING_TOKEN"] = cfg.token.get_secret_value()
        scheme = urlparse(cfg.tracking_uri).scheme
        if scheme == "file" or len(scheme) <= 1:  # a plain path (or a Windows drive letter)
            # MLflow 3 refuses a file store unless asked; the job's tracking_uri asks for it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        self.client = MlflowClient(tracking_uri=cfg.tracking_uri)
        if run_id is not None and self._continues(run_id):
            self.run_id = run_id
            return
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = self.client.create_experiment(cfg.experiment)
        run = self.client.create_run(
            experiment_id, run_name=cfg.run_name or run_name, tags=dict(cfg.tags)
        )
        self.run_id = run.info.run_id
        limit = _mlflow_limit("MAX_PARAM_VAL_LENGTH", 500)
        params = [Param(key, value[:limit]) for key, value in _unique(_flatten(config))]
        for start in range(0, len(params), 100):  # MLflow takes 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def _continues(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except Exception:  # deleted, or another store: a new run
            return False
        self.client.update_run(run_id, status="RUNNING")
        return True

    def log(self, metrics: dict[str, float], *, step: int) -> None:
        now = int(time.time() * 1000)
        batch = [self._metric(_mlflow_key(k), float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, *, status: str, summary: dict[str, Any]) -> None:
        now = int(time.time() * 1000)
        steps = summary.get("steps")
        step = steps if isinstance(steps, int) and not isinstance(steps, bool) else 0
        metrics, tags = [], {}
        for key, value in _flatten(summary, keep_numbers=True):
            name = _mlflow_key(f"summary/{key}")
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics.append(self._metric(name, float(value), now, step))
            elif value is not None:
                tags[name] = str(value)[: _mlflow_limit("MAX_TAG_VAL_LENGTH", 5000)]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        self.client.set_terminated(self.run_id, status=_MLFLOW_STATUS.get(status, "FAILED"))


class _Tensorboard(_Tracker):
    name = "tensorboard"

    def __init__(
        self, cfg, *, run_dir: Path, run_name: str, config: dict, resume: bool, run_id: str | None
    ):
        # the tensorboard package's own writer (what torch's SummaryWriter wraps): no torch
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = event_pb2, summary_pb2
        log_dir = Path(cfg.dir) if cfg.dir is not None else run_dir / TENSORBOARD_DIR
        self.writer = EventFileWriter(str(log_dir), flush_secs=30)
        # a resumed run logs again the steps after its checkpoint: a START event at the first
        # of them makes TensorBoard drop what the earlier attempt wrote from that step on
        self._purge = resume
        self._text("config", f"```json\n{json.dumps(config, indent=2, default=str)}\n```", 0)
        self.writer.flush()

    def log(self, metrics: dict[str, float], *, step: int) -> None:
        if self._purge:
            self._purge = False
            start = self._event.SessionLog(status=self._event.SessionLog.START)
            self.writer.add_event(
                self._event.Event(wall_time=time.time(), step=step, session_log=start)
            )
        values = [self._summary.Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()]
        summary = self._summary.Summary(value=values)
        self.writer.add_event(self._event.Event(wall_time=time.time(), step=step, summary=summary))
        self.writer.flush()  # `tensorboard --logdir` shows each step as it lands

    def finish(self, *, status: str, summary: dict[str, Any]) -> None:
        steps = summary.get("steps")
        step = steps if isinstance(steps, int) and not isinstance(steps, bool) else 0
        self._text("summary", f"```json\n{json.dumps(summary, indent=2, default=str)}\n```", step)
        self.writer.close()

    def abandon(self) -> None:
        with contextlib.suppress(Exception):  # already broken: nothing more to save
            self.writer.close()

    def _text(self, tag: str, text: str, step: int) -> None:
        from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.plugins.text.metadata import create_summary_metadata

        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            string_val=[text.encode("utf-8")],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]
            ),
        )
        value = self._summary.Summary.Value(
            tag=tag, metadata=create_summary_metadata(tag, ""), tensor=tensor
        )
        summary = self._summary.Summary(value=[value])
        self.writer.add_event(self._event.Event(wall_time=time.time(), step=step, summary=summary))


_OPENERS: dict[str, Callable[..., _Tracker]] = {
    "wandb": _Wandb,
    "mlflow": _Mlflow,
    "tensorboard": _Tensorboard,
}


def _flatten(
    value: Any, prefix: str = "", *, keep_numbers: bool = False
) -> Iterator[tuple[str, Any]]:
    """`{"a": {"b": 1}}` as `("a.b", "1")`: MLflow params are flat strings."""
    if isinstance(value, Mapping) and (value or not prefix):
        for key, inner in value.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            yield from _flatten(inner, name, keep_numbers=keep_numbers)
    elif keep_numbers:
        yield prefix, value
    else:
        yield prefix, str(value)


def _unique(pairs: Iterator[tuple[str, str]]) -> list[tuple[str, str]]:
    # two keys may become one name once cleaned; MLflow refuses a batch that repeats a key
    seen: dict[str, str] = {}
    for key, value in pairs:
        seen.setdefault(_mlflow_key(key), value)
    return list(seen.items())


def _mlflow_key(key: str) -> str:
    return _MLFLOW_NAME.sub("_", key)[:250] or "_"


def _mlflow_limit(name: str, fallback: int) -> int:
    try:
        from mlflow.utils import validation

        return int(getattr(validation, name))
    except (ImportError, AttributeError):
        return fallback


def _secret_values(integrations: Any) -> list[str]:
    """Every credential a library might echo back in an error: the job's and the environment's."""
    found = []
    for section, field in (("wandb", "api_key"), ("mlflow", "token")):
        secret = getattr(getattr(integrations, section, None), field, None)
        if secret is not None:
            found.append(secret.get_secret_value())
    for env in ("WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
        if os.environ.get(env):
            found.append(os.environ[env])
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


def _read_ids(run_dir: Path) -> dict[str, str]:
    try:
        ids = json.loads((run_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}


def _quiet_loggers() -> None:
    """The libraries' log records go nowhere near the terminal (nor the root logger's handlers);
    W&B keeps its own debug logs under run_dir/wandb."""
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        logger.propagate = False
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            ):
                logger.removeHandler(handler)
        if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
            logger.addHandler(logging.NullHandler())  # else logging's last resort prints
