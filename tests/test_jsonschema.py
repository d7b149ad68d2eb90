"""The printed JSON Schema, used by a standard validator, agrees with the live schema."""

import json

import jsonschema
import pytest
import yaml
from tuneplex.cli import app
from tuneplex.errors import UsageError
from tuneplex.plugins import registry
from tuneplex.schema.loading import validate_job
from typer.testing import CliRunner


def printed_schema(backend):
    result = CliRunner().invoke(app, ["schema", backend])
    assert result.exit_code == 0
    return json.loads(result.output)


AUTOMODEL_VALID = [
    {"model": "m", "dataset": {"training": "t.jsonl"}},
    {
        "model": "org/m",
        "dataset": {"training": "t", "validation": "v", "prompt_template": "{{ x }}"},
        "training": {
            "finetuning_type": "lora_merged",
            "lora": {"rank": 8, "alpha": 16.5, "target_modules": ["q_proj"]},
        },
        "schedule": {"epochs": 2, "max_steps": 100, "val_check_interval": 0.25, "seed": 1},
        "batch": {"global_batch_size": 32, "micro_batch_size": 4, "sequence_packing": True},
        "optimizer": {"learning_rate": 1e-5, "weight_decay": 0.0, "warmup_steps": 10},
        "parallelism": {
            "num_nodes": 2,
            "num_gpus_per_node": 8,
            "tensor_parallel_size": 2,
            "pipeline_parallel_size": 2,
            "context_parallel_size": 1,
            "expert_parallel_size": None,
        },
        "output": {"dir": "runs/x", "checkpoint_steps": 50, "keep_checkpoints": 2},
        "integrations": {
            "wandb": {"project": "p", "tags": ["a"], "mode": "offline"},
            "mlflow": {"tracking_uri": "file:./mlruns", "tags": {"k": "v"}},
        },
    },
    {
        "model": "s",
        "dataset": {"training": "t"},
        "training": {
            "training_type": "distillation",
            "finetuning_type": "all_weights",
            "teacher_model": "t",
            "teacher_precision": "fp16",
            "distillation_ratio": 1,
            "distillation_temperature": 2.0,
            "offload_teacher": True,
        },
    },
]

UNSLOTH_VALID = [
    {"model": {"name": "m"}, "dataset": {"path": "t.jsonl"}},
    {
        "model": {
            "name": "m",
            "max_seq_length": 4096,
            "load_in_4bit": False,
            "load_in_8bit": True,
            "dtype": "bfloat16",
            "trust_remote_code": True,
        },
        "dataset": {
            "path": "t",
            "text_field": "body",
            "apply_chat_template": True,
            "validation_path": "v",
            "packing": True,
        },
        "training": {
            "lora": {
                "rank": 32,
                "alpha": 64,
                "dropout": 0.05,
                "bias": "lora_only",
                "use_rslora": True,
                "random_state": 1,
                "target_modules": ["q_proj", "v_proj"],
            },
            "use_gradient_checkpointing": True,
        },
        "schedule": {
            "epochs": 3,
            "warmup_ratio": 0.03,
            "lr_scheduler_type": "cosine",
            "logging_steps": 5,
            "save_steps": 100,
            "eval_steps": 50,
            "seed": 0,
        },
        "batch": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4},
        "optimizer": {"learning_rate": 1e-4, "weight_decay": 0.01, "optim": "paged_adamw_8bit"},
        "hardware": {"gpus": "0,1", "precision": "fp16"},
        "output": {"save_method": "merged_16bit"},
    },
    {
        "model": {"name": "m"},
        "dataset": {"path": "t"},
        "hardware": {"gpus": 3},
        "training": {"use_gradient_checkpointing": "unsloth"},
    },
]

CASES = [("automodel", j) for j in AUTOMODEL_VALID] + [("unsloth", j) for j in UNSLOTH_VALID]


@pytest.mark.parametrize("backend,job", CASES)
def test_valid_jobs_accepted_by_both(backend, job):
    validator = jsonschema.Draft202012Validator(printed_schema(backend))
    assert list(validator.iter_errors(job)) == []
    validate_job(registry().get(backend).backend.job_schema, job)


@pytest.mark.parametrize("backend,job", CASES)
def test_resolved_jobs_accepted(backend, job):
    """What `validate` prints (every default filled in) is itself a valid job."""
    schema = registry().get(backend).backend.job_schema
    resolved = validate_job(schema, job).model_dump(mode="json")
    jsonschema.validate(resolved, printed_schema(backend))


def _paths(obj, prefix=()):
    if isinstance(obj, dict):
        yield prefix
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))


@pytest.mark.parametrize("backend,job", CASES)
def test_unknown_key_rejected_at_every_level_by_both(backend, job):
    validator = jsonschema.Draft202012Validator(printed_schema(backend))
    schema = registry().get(backend).backend.job_schema
    for path in list(_paths(job)):
        if path[-1:] == ("tags",):  # a free-form mapping (mlflow tags), not a section
            continue
        bad = json.loads(json.dumps(job))
        node = bad
        for part in path:
            node = node[part]
        node["surplus"] = 1
        assert not validator.is_valid(bad), path
        with pytest.raises(UsageError) as info:
            validate_job(schema, bad)
        assert f"{'.'.join((*path, 'surplus'))}: unknown key" in "\n".join(info.value.lines())


@pytest.mark.parametrize(
    "backend,patch",
    [
        ("automodel", {"training": {"lora": {"rank": "16"}}}),
        ("automodel", {"training": {"finetuning_type": "qlora"}}),
        ("automodel", {"optimizer": {"learning_rate": 0}}),
        ("automodel", {"batch": {"sequence_packing": "true"}}),
        ("unsloth", {"hardware": {"gpus": "0,a"}}),
        ("unsloth", {"training": {"use_gradient_checkpointing": "always"}}),
        ("unsloth", {"training": {"lora": {"dropout": 1}}}),
    ],
)
def test_type_and_bound_errors_rejected_by_both(backend, patch):
    base = json.loads(json.dumps(CASES[0][1] if backend == "automodel" else UNSLOTH_VALID[0]))
    for key, value in patch.items():
        base[key] = {**base.get(key, {}), **value}
    assert not jsonschema.Draft202012Validator(printed_schema(backend)).is_valid(base)
    with pytest.raises(UsageError):
        validate_job(registry().get(backend).backend.job_schema, base)


def test_yaml_template_passes_json_schema_once_filled():
    result = CliRunner().invoke(app, ["schema", "unsloth", "--format", "yaml"])
    data = yaml.safe_load(result.output)
    data["model"]["name"] = "m"
    data["dataset"]["path"] = "d"
    jsonschema.validate(data, printed_schema("unsloth"))
