"""The backend contract suite every backend runs (subclass `BackendContract`), and the checks
of a run directory that backends' own tests share."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from tuneplex.backend import (
    NO_LAUNCH_OPTIONS,
    Backend,
    EnvironmentStatus,
    JobSettings,
    TrainedModel,
)
from tuneplex.data.spec import DataSpec
from tuneplex.schema import JobSchema
from tuneplex.schema.base import model_in

HEAVY_MODULES = ("torch", "transformers", "peft", "trl", "unsloth", "bitsandbytes", "datasets")


def _iter_models(model: type[BaseModel], path: str = ""):
    yield path, model
    for name, field in model.model_fields.items():
        sub = model_in(field.annotation)
        if sub is not None:
            yield from _iter_models(sub, f"{path}.{name}" if path else name)


def _set_path(data: dict[str, Any], path: str, key: str, value: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(data))
    node = data
    for part in filter(None, path.split(".")):
        node = node.setdefault(part, {})
        if node is None:
            raise AssertionError(f"{path}: cannot reach section")
    node[key] = value
    return data


def imported_heavy_modules(code: str) -> list[str]:
    """Run `code` in a fresh interpreter; return which heavy modules it imported."""
    probe = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import sys, json
        print("\\n" + json.dumps([m for m in {HEAVY_MODULES!r} if m in sys.modules]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


TRAIN_EVENT_KEYS = frozenset(
    {"step", "epoch", "split", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"}
)
VAL_EVENT_KEYS = frozenset({"step", "epoch", "split", "loss"})


def assert_run_directory(run_dir, *, completed: bool = True) -> None:
    """The run-directory format every backend writes (see README, "the run directory")."""
    import json
    from importlib.util import find_spec

    from tuneplex.runs import (
        FINAL_DIR,
        JOB_FILE,
        SUMMARY_FILE,
        complete_checkpoints,
        read_metrics,
    )

    run_dir = Path(run_dir)
    json.loads((run_dir / JOB_FILE).read_text())
    events = read_metrics(run_dir)
    train = [e for e in events if e["split"] == "train"]
    assert train, "metrics.jsonl has no train event"
    for e in events:
        need = TRAIN_EVENT_KEYS if e["split"] == "train" else VAL_EVENT_KEYS
        assert need <= set(e), f"event lacks {sorted(need - set(e))}: {e}"
    steps = [e["step"] for e in train]
    assert steps == sorted(steps) and len(set(steps)) == len(steps), "train steps repeat"
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["status"] == ("completed" if completed else summary["status"])
    if find_spec("matplotlib") is not None:  # the plots extra, which both backends bring
        assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG", "no curves.png"
    if completed:
        assert summary["steps"] == steps[-1]
        final = run_dir / FINAL_DIR
        adapter = (final / "adapter_config.json").is_file() and (
            final / "adapter_model.safetensors"
        ).is_file()
        full = (final / "config.json").is_file() and any(final.glob("*.safetensors"))
        assert adapter or full, "final/ holds neither an adapter nor a model"
    for _, path in complete_checkpoints(run_dir):
        # weights in any format (safetensors, DCP shards): some file that is not JSON
        held = [p for p in path.rglob("*") if p.is_file() and p.suffix != ".json"]
        assert any(p.stat().st_size for p in held), f"{path} holds no weights"


def reference_val_loss(model, run_dir, backend: str) -> float:
    """Mean loss over every answer token of a run's validation rows, one row at a time (no
    padding, no packing, the model's logits only): independent of any trainer's loss code."""
    import json

    import torch

    from tuneplex.data.pipeline import prepare
    from tuneplex.plugins import registry

    b = registry().backends[backend].backend
    job = b.job_schema.model_validate(json.loads((Path(run_dir) / "job.json").read_text()))
    split = prepare(b.data_spec(job)).validation.examples
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for row in split:
            ids = torch.tensor([row["input_ids"]], device=device)
            labels = torch.tensor(row["labels"], device=device)
            logits = model(input_ids=ids).logits[0].double()
            keep = labels[1:] != -100
            total += torch.nn.functional.cross_entropy(
                logits[:-1][keep], labels[1:][keep], reduction="sum"
            ).item()
            count += int(keep.sum())
    return total / count


class BackendContract:
    """What every backend must honour. Subclass in a test module; pytest collects it."""

    backend_name: ClassVar[str]
    minimal_job: ClassVar[dict[str, Any]]
    model_key: ClassVar[str] = "model"
    """Where the job names its model (dotted: "model.name")."""

    # -- helpers
    @property
    def backend(self) -> Backend:
        from tuneplex.plugins import registry

        return registry().get(self.backend_name).backend

    def _validate(self, data):
        from tuneplex.schema.loading import validate_job

        return validate_job(self.backend.job_schema, data)

    # -- the contract
    def test_discovered_through_entry_point(self):
        from tuneplex.plugins import registry

        item = registry().get(self.backend_name)
        assert isinstance(item.backend, Backend)
        assert item.distribution != "?" and item.version != "?"

    def test_identity(self):
        b = self.backend
        assert b.name == self.backend_name
        assert b.name.isidentifier() and b.name.islower()
        assert b.description.strip() and "\n" not in b.description

    def test_schema_is_strict_and_documented(self):
        schema = self.backend.job_schema
        assert issubclass(schema, JobSchema)
        for path, model in _iter_models(schema):
            assert model.model_config.get("extra") == "forbid", path or "<root>"
            for name, field in model.model_fields.items():
                assert field.description, f"{path}.{name} has no description"

    def test_json_schema_closed_everywhere(self):
        js = self.backend.job_schema.model_json_schema()
        assert js["title"] == self.backend.job_schema.__name__
        objects = [js, *js.get("$defs", {}).values()]
        for obj in objects:
            if obj.get("type") == "object":
                assert obj.get("additionalProperties") is False, obj.get("title")

    def test_minimal_job_valid_and_round_trips(self):
        job = self._validate(self.minimal_job)
        dumped = job.model_dump(mode="json")
        assert self._validate(dumped).model_dump(mode="json") == dumped

    def test_unknown_key_rejected_at_every_level(self):
        from tuneplex.errors import UsageError

        full = self._validate(self.minimal_job).model_dump(mode="json")
        for path, _ in _iter_models(self.backend.job_schema):
            node: Any = full
            for part in filter(None, path.split(".")):
                node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                continue  # an optional section that is off (null) in the minimal job
            bad = _set_path(full, path, "zz_not_a_key", 1)
            try:
                self._validate(bad)
            except UsageError as exc:
                where = f"{path}.zz_not_a_key" if path else "zz_not_a_key"
                assert any(str(p).startswith(f"{where}: unknown key") for p in exc.problems), (
                    exc.lines()
                )
            else:
                raise AssertionError(f"{path}: unknown key accepted")

    def test_job_is_frozen(self):
        job = self._validate(self.minimal_job)
        try:
            job.model = "other"  # type: ignore[misc]
        except Exception:
            return
        raise AssertionError("job object is mutable")

    def test_environment_check_is_cheap(self):
        status = self.backend.check_environment()
        assert isinstance(status, EnvironmentStatus) and status.detail
        heavy = imported_heavy_modules(
            f"""
            from tuneplex.plugins import registry
            registry().get({self.backend_name!r}).backend.check_environment()
            """
        )
        assert heavy == []

    def test_train_takes_launch_options_by_keyword(self):
        import inspect

        params = inspect.signature(self.backend.train).parameters
        assert list(params)[:2] == ["job", "run_dir"], list(params)
        for name, default in (("resume", False), ("launch", NO_LAUNCH_OPTIONS)):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
            assert params[name].default == default, name

    def test_launch_defaults_accepted(self):
        assert self.backend.check_launch(NO_LAUNCH_OPTIONS) is None

    def test_describe_reads_the_job(self):
        job = self._validate(self.minimal_job)
        settings = self.backend.describe(job)
        assert isinstance(settings, JobSettings)
        spec = self.backend.data_spec(job)
        assert settings.model == _get(self.minimal_job, self.model_key)
        assert settings.train_data == spec.train == _get(self.minimal_job, spec.train_key)
        assert settings.validation_data == spec.validation
        assert settings.max_seq_length == spec.max_seq_length
        assert all(isinstance(v, int | float | bool | str) for v in settings.batch.values())
        json.dumps(settings.as_dict())  # what `runs show --json` prints
        # the job's own values, not constants that happen to match the minimal job
        other = _set_path(self.minimal_job, *_split(self.model_key), "contract/other-model")
        other = _set_path(other, *_split(spec.train_key), "contract-other.jsonl")
        moved = self.backend.describe(self._validate(other))
        assert (moved.model, moved.train_data) == ("contract/other-model", "contract-other.jsonl")

    def test_describe_is_cheap(self):
        heavy = imported_heavy_modules(
            f"""
            from tuneplex.plugins import registry
            from tuneplex.schema.loading import validate_job
            backend = registry().get({self.backend_name!r}).backend
            backend.describe(validate_job(backend.job_schema, {self.minimal_job!r}))
            """
        )
        assert heavy == []

    def test_trained_model_of_a_final_directory(self, tmp_path):
        """final/ (a peft adapter or a whole model) loads as it is, on the job's base model,
        in a dtype transformers knows; the run directory is not written."""
        job = self._validate(self.minimal_job)
        final = tmp_path / "final"
        final.mkdir()
        (final / "adapter_config.json").write_text("{}")
        scratch = tmp_path / "scratch"
        trained = self.backend.trained_model(job, final, device="cpu", scratch=scratch)
        assert isinstance(trained, TrainedModel)
        assert trained.path == final
        assert trained.base == self.backend.describe(job).model
        known = (None, "float32", "bfloat16", "float16")
        assert trained.dtype in known and trained.autocast in known
        assert trained.quantization is None  # nothing quantized on a CPU
        assert sorted(p.name for p in final.iterdir()) == ["adapter_config.json"]

    def test_data_spec_names_the_job_keys(self):
        spec = self.backend.data_spec(self._validate(self.minimal_job))
        assert isinstance(spec, DataSpec)
        assert spec.train_key.startswith("dataset.") and spec.max_seq_length >= 1

    def test_derived_values_are_scalars(self):
        derived = self.backend.derived(self._validate(self.minimal_job))
        assert derived and all(isinstance(v, int | float | str) for v in derived.values())

    def test_yaml_template_is_valid_once_required_keys_filled(self):
        import yaml

        from tuneplex.schema.template import yaml_template

        text = yaml_template(self.backend.job_schema, backend=self.backend_name)
        data = yaml.safe_load(text)
        filled = _fill(data, self.minimal_job)
        job = self._validate(filled)
        assert job == self._validate(self.minimal_job)


def _split(key: str) -> tuple[str, str]:
    """`a.b.c` -> ("a.b", "c"): the section and the key, as `_set_path` takes them."""
    section, _, name = key.rpartition(".")
    return section, name


def _get(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def _fill(template: Any, minimal: Any) -> Any:
    """The template with the minimal job's values put where the template has placeholders."""
    if isinstance(template, dict) and isinstance(minimal, dict):
        out = dict(template)
        for key, value in minimal.items():
            out[key] = _fill(template.get(key), value)
        return out
    return minimal
