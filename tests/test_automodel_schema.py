"""AutomodelJobInput: the spec's defaults, bounds and cross-field rules."""

import pytest
from tuneplex.errors import UsageError
from tuneplex.schema.loading import validate_job
from tuneplex_automodel.schema import AutomodelJobInput

MINIMAL = {"model": "org/base", "dataset": {"training": "train.jsonl"}}


def job(**sections):
    data = {**MINIMAL}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


def ok(data):
    return validate_job(AutomodelJobInput, data)


def problems(data):
    with pytest.raises(UsageError) as info:
        validate_job(AutomodelJobInput, data)
    return info.value.lines()


# the spec's tables, verbatim
SPEC_DEFAULTS = {
    "dataset.validation": None,
    "dataset.prompt_template": None,
    "training.training_type": "sft",
    "training.finetuning_type": "lora",
    "training.lora.rank": 16,
    "training.lora.alpha": 32,
    "training.lora.merge": False,
    "training.lora.target_modules": None,
    "training.max_seq_length": 2048,
    "training.teacher_model": None,
    "training.teacher_precision": "bf16",
    "training.distillation_ratio": 0.5,
    "training.distillation_temperature": 1.0,
    "training.offload_teacher": False,
    "schedule.epochs": 1,
    "schedule.max_steps": None,
    "schedule.val_check_interval": None,
    "schedule.seed": None,
    "batch.global_batch_size": 8,
    "batch.micro_batch_size": 1,
    "batch.sequence_packing": False,
    "optimizer.learning_rate": 5e-6,
    "optimizer.weight_decay": 0.01,
    "optimizer.warmup_steps": 0,
    "parallelism.num_nodes": 1,
    "parallelism.num_gpus_per_node": 1,
    "parallelism.tensor_parallel_size": 1,
    "parallelism.pipeline_parallel_size": 1,
    "parallelism.context_parallel_size": 1,
    "parallelism.expert_parallel_size": None,
}


@pytest.mark.parametrize("path,expected", SPEC_DEFAULTS.items())
def test_spec_defaults(path, expected):
    node = ok(MINIMAL).model_dump()
    for part in path.split("."):
        node = node[part]
    assert (node == expected and type(node) is type(expected)) or (
        isinstance(expected, int) and isinstance(node, float) and node == expected
    )


def test_required_keys():
    assert problems({}) == ["model: required key is missing", "dataset: required key is missing"]
    assert problems({"model": "m", "dataset": {}}) == ["dataset.training: required key is missing"]
    assert problems({"model": None, "dataset": {"training": "d"}}) == [
        "model: must be set (got null)"
    ]


@pytest.mark.parametrize(
    "data,line",
    [
        (job(training={"lora": {"rank": 0}}), "training.lora.rank: must be >= 1 (got 0)"),
        (job(training={"lora": {"alpha": 0}}), "training.lora.alpha: must be > 0 (got 0)"),
        (job(training={"max_seq_length": 0}), "training.max_seq_length: must be >= 1 (got 0)"),
        (
            job(
                training={
                    "training_type": "distillation",
                    "finetuning_type": "all_weights",
                    "teacher_model": "t",
                    "distillation_ratio": 1.5,
                }
            ),
            "training.distillation_ratio: must be <= 1 (got 1.5)",
        ),
        (
            job(
                training={
                    "training_type": "distillation",
                    "finetuning_type": "all_weights",
                    "teacher_model": "t",
                    "distillation_temperature": 0,
                }
            ),
            "training.distillation_temperature: must be > 0 (got 0)",
        ),
        (job(schedule={"epochs": 0}), "schedule.epochs: must be >= 1 (got 0)"),
        (job(schedule={"max_steps": 0}), "schedule.max_steps: must be >= 1 (got 0)"),
        (
            job(dataset={"validation": "v"}, schedule={"val_check_interval": 1.5}),
            "schedule.val_check_interval: must be <= 1 (got 1.5)",
        ),
        (job(schedule={"seed": -1}), "schedule.seed: must be >= 0 (got -1)"),
        (job(batch={"micro_batch_size": 0}), "batch.micro_batch_size: must be >= 1 (got 0)"),
        (job(optimizer={"learning_rate": 0}), "optimizer.learning_rate: must be > 0 (got 0)"),
        (job(optimizer={"weight_decay": -0.1}), "optimizer.weight_decay: must be >= 0 (got -0.1)"),
        (job(optimizer={"warmup_steps": -1}), "optimizer.warmup_steps: must be >= 0 (got -1)"),
        (job(parallelism={"num_nodes": 0}), "parallelism.num_nodes: must be >= 1 (got 0)"),
        (
            job(parallelism={"expert_parallel_size": 0}),
            "parallelism.expert_parallel_size: must be >= 1 (got 0)",
        ),
        (job(model=""), "model: must not be empty (got '')"),
        (
            job(training={"lora": {"rank": "16"}}),
            "training.lora.rank: expected an integer (got '16')",
        ),
        (
            job(batch={"sequence_packing": "yes"}),
            "batch.sequence_packing: expected true or false (got 'yes')",
        ),
        (
            job(training={"lora": {"target_modules": []}}),
            "training.lora.target_modules: needs at least 1 item(s) (got [])",
        ),
    ],
)
def test_bounds_and_types(data, line):
    assert line in problems(data)


@pytest.mark.parametrize(
    "value,choices",
    [
        (
            {"training_type": "rlhf"},
            "training.training_type: must be one of: sft, distillation, dpo, grpo (got 'rlhf')",
        ),
        (
            {"finetuning_type": "lora_merge"},
            "training.finetuning_type: must be one of: lora, lora_merged, all_weights "
            "(got 'lora_merge'); did you mean 'lora_merged'?",
        ),
        (
            {
                "training_type": "distillation",
                "finetuning_type": "all_weights",
                "teacher_model": "t",
                "teacher_precision": "fp8",
            },
            "training.teacher_precision: must be one of: bf16, fp16, fp32 (got 'fp8')",
        ),
    ],
)
def test_enums_list_choices(value, choices):
    assert choices in problems(job(training=value))


# ------------------------------------------------------------------ GPU arithmetic
@pytest.mark.parametrize(
    "nodes,gpus,tp,pp,cp,gbs,mbs,dp,accum",
    [
        (1, 1, 1, 1, 1, 8, 1, 1, 8),
        (1, 8, 2, 1, 1, 32, 2, 4, 4),
        (2, 8, 2, 2, 1, 16, 1, 4, 4),
        (4, 8, 4, 2, 1, 64, 4, 4, 4),
        (2, 8, 2, 1, 2, 32, 2, 4, 4),
        (1, 4, 1, 1, 1, 4, 1, 4, 1),
    ],
)
def test_derived_sizes(nodes, gpus, tp, pp, cp, gbs, mbs, dp, accum):
    parsed = ok(
        job(
            parallelism={
                "num_nodes": nodes,
                "num_gpus_per_node": gpus,
                "tensor_parallel_size": tp,
                "pipeline_parallel_size": pp,
                "context_parallel_size": cp,
            },
            batch={"global_batch_size": gbs, "micro_batch_size": mbs},
        )
    )
    dims = parsed.parallel_dims()
    assert (dims.world_size, dims.dp, dims.grad_accum_steps) == (nodes * gpus, dp, accum)


def test_gpus_not_divisible_by_model_parallel():
    lines = problems(
        job(parallelism={"num_nodes": 2, "num_gpus_per_node": 3, "tensor_parallel_size": 4})
    )
    assert lines == [
        "parallelism.tensor_parallel_size: total GPUs (num_nodes × num_gpus_per_node = 2 × 3 = "
        "6) must be divisible by tensor × pipeline × context parallel size (4 × 1 × 1 = 4)"
    ]
    lines = problems(
        job(
            parallelism={
                "num_gpus_per_node": 6,
                "tensor_parallel_size": 2,
                "pipeline_parallel_size": 2,
            }
        )
    )
    message = (
        "total GPUs (num_nodes × num_gpus_per_node = 1 × 6 = 6) must be divisible by tensor × "
        "pipeline × context parallel size (2 × 2 × 1 = 4)"
    )
    assert lines == [
        f"parallelism.tensor_parallel_size: {message}",
        f"parallelism.pipeline_parallel_size: {message}",
    ]


def test_global_batch_not_divisible():
    lines = problems(
        job(
            parallelism={"num_gpus_per_node": 4},
            batch={"global_batch_size": 10, "micro_batch_size": 2},
        )
    )
    assert lines == [
        "batch.global_batch_size: 10 must be divisible by micro_batch_size × data_parallel_size "
        "(2 × 4 = 8); nearest valid: 8 or 16"
    ]


def test_global_batch_smaller_than_one_step():
    lines = problems(job(parallelism={"num_gpus_per_node": 8}, batch={"global_batch_size": 4}))
    assert lines[0].endswith("(1 × 8 = 8); nearest valid: 8")


def test_tp_must_be_one_with_expert_parallel():
    lines = problems(
        job(
            parallelism={
                "num_gpus_per_node": 4,
                "tensor_parallel_size": 2,
                "expert_parallel_size": 2,
            }
        )
    )
    assert lines == [
        "parallelism.tensor_parallel_size: must be 1 when expert_parallel_size > 1 "
        "(got tensor_parallel_size=2, expert_parallel_size=2)"
    ]
    ok(job(parallelism={"num_gpus_per_node": 4, "expert_parallel_size": 4}))
    ok(
        job(
            parallelism={
                "num_gpus_per_node": 4,
                "tensor_parallel_size": 2,
                "expert_parallel_size": 1,
            }
        )
    )


# ------------------------------------------------------------------ training method
def test_lora_autofilled_for_lora_variants_and_dropped_for_full():
    assert ok(MINIMAL).training.lora.rank == 16
    merged = ok(job(training={"finetuning_type": "lora_merged"})).training
    assert merged.lora.merge is True and merged.merges_adapter
    assert ok(job(training={"lora": {"merge": True}})).training.merges_adapter
    assert not ok(MINIMAL).training.merges_adapter
    full = ok(job(training={"finetuning_type": "all_weights"})).training
    assert full.lora is None
    # a block of pure defaults is harmless (e.g. the YAML template with finetuning_type changed)
    assert (
        ok(job(training={"finetuning_type": "all_weights", "lora": {"rank": 16}})).training.lora
        is None
    )


def test_lora_settings_refused_with_full_weights():
    assert problems(job(training={"finetuning_type": "all_weights", "lora": {"rank": 8}})) == [
        "training.lora: only used with finetuning_type lora or lora_merged (got all_weights)"
    ]


def test_lora_merged_with_merge_false_contradicts():
    assert problems(job(training={"finetuning_type": "lora_merged", "lora": {"merge": False}})) == [
        "training.lora.merge: false contradicts finetuning_type lora_merged; drop one"
    ]


def test_distillation_needs_teacher_and_full_weights():
    assert problems(job(training={"training_type": "distillation"})) == [
        "training.teacher_model: required when training_type is distillation",
        "training.finetuning_type: distillation trains full weights: set finetuning_type to "
        "all_weights (got lora)",
    ]
    parsed = ok(
        job(
            training={
                "training_type": "distillation",
                "finetuning_type": "all_weights",
                "teacher_model": "org/teacher",
                "distillation_ratio": 1.0,
                "teacher_precision": "fp32",
                "offload_teacher": True,
            }
        )
    )
    assert parsed.training.teacher_model == "org/teacher"
    assert parsed.training.distillation_ratio == 1.0


def test_distillation_settings_refused_for_sft():
    assert problems(job(training={"teacher_model": "t", "distillation_ratio": 0.2})) == [
        "training.teacher_model: only used when training_type is distillation",
        "training.distillation_ratio: only used when training_type is distillation",
    ]
    ok(job(training={"distillation_ratio": 0.5}))  # the default, harmless


def test_val_check_interval_needs_validation_data():
    assert problems(job(schedule={"val_check_interval": 0.5})) == [
        "schedule.val_check_interval: needs dataset.validation (no validation data)"
    ]
    ok(job(dataset={"validation": "val.jsonl"}, schedule={"val_check_interval": 0.5}))


def test_integrations_secrets_masked():
    parsed = ok(job(integrations={"wandb": {"project": "p", "api_key": "sekrit"}}))
    assert parsed.integrations.wandb.api_key.get_secret_value() == "sekrit"
    assert "sekrit" not in str(parsed.to_public_dict())
    assert "sekrit" not in repr(parsed)


def test_all_problems_reported_at_once():
    lines = problems(
        job(training={"lora": {"rank": 0, "alpah": 3}}, schedule={"epochs": 0}, extra=1)
    )
    assert len(lines) == 4


def test_expert_parallel_borrows_data_parallel_ranks():
    lines = problems(
        job(
            parallelism={"num_gpus_per_node": 6, "expert_parallel_size": 4},
            batch={"global_batch_size": 12},
        )
    )
    assert lines == [
        "parallelism.expert_parallel_size: 4 must divide data_parallel_size (6): experts are "
        "split across data-parallel ranks"
    ]


@pytest.mark.parametrize(
    ("sizes", "line"),
    [
        (
            {"pipeline_parallel_size": 2, "context_parallel_size": 2},
            "parallelism: pipeline parallelism with context parallelism is not supported; set "
            "pipeline_parallel_size or context_parallel_size to 1",
        ),
        (
            {"pipeline_parallel_size": 2, "expert_parallel_size": 2},
            "parallelism: pipeline parallelism with expert parallelism is not supported; set "
            "pipeline_parallel_size or expert_parallel_size to 1",
        ),
        (
            {"context_parallel_size": 2, "expert_parallel_size": 2},
            "parallelism: context parallelism with expert parallelism is not supported; set "
            "context_parallel_size or expert_parallel_size to 1",
        ),
    ],
    ids=["pp+cp", "pp+ep", "cp+ep"],
)
def test_unsupported_combinations_are_named(sizes, line):
    assert problems(job(parallelism={"num_gpus_per_node": 8, **sizes})) == [line]


@pytest.mark.parametrize("key", ["pipeline", "context", "expert", "tensor"])
def test_distillation_runs_with_data_parallelism_only(key):
    lines = problems(
        job(
            parallelism={"num_gpus_per_node": 4, f"{key}_parallel_size": 2},
            training={
                "training_type": "distillation",
                "teacher_model": "/m",
                "finetuning_type": "all_weights",
            },
        )
    )
    assert lines == [
        f"parallelism.{key}_parallel_size: 2: distillation runs with data parallelism only in "
        "this version; set it to 1"
    ]


@pytest.mark.parametrize("key", ["pipeline", "context", "expert", "tensor"])
def test_compile_true_is_refused_beyond_data_parallelism(key):
    lines = problems(
        job(
            parallelism={"num_gpus_per_node": 4, f"{key}_parallel_size": 2},
            training={"compile": True},
        )
    )
    assert lines == [
        f"parallelism.{key}_parallel_size: 2: training.compile: true is proven with data "
        "parallelism only in this version; set it to 1"
    ]
    auto = ok(job(parallelism={"num_gpus_per_node": 4, f"{key}_parallel_size": 2}))
    assert auto.training.compile == "auto"  # means off there: nothing to refuse


def test_compile_takes_true_false_or_auto():
    assert [ok(job(training={"compile": v})).training.compile for v in (True, False)] == [
        True,
        False,
    ]
    assert ok(job()).training.compile == "auto"
    assert problems(job(training={"compile": "sometimes"})) == [
        "training.compile: must be one of: true, false, auto (got 'sometimes')"
    ]
    assert problems(job(training={"compile": "yes"})) == [
        "training.compile: must be one of: true, false, auto (got 'yes')"
    ]


def test_dpo_settings_belong_to_dpo_and_are_filled_in():
    dpo = ok(job(training={"training_type": "dpo"})).training.dpo
    assert (dpo.ref_policy_kl_penalty, dpo.loss_type, dpo.label_smoothing) == (0.05, "sigmoid", 0)
    assert ok(job()).training.dpo is None
    assert problems(job(training={"dpo": {"ref_policy_kl_penalty": 0.2}})) == [
        "training.dpo: only used when training_type is dpo"
    ]
    assert problems(
        job(training={"training_type": "dpo", "dpo": {"loss_type": "ipo", "label_smoothing": 0.1}})
    ) == ["training.dpo.label_smoothing: only used with loss_type sigmoid (got ipo)"]
    assert problems(
        job(training={"training_type": "dpo", "dpo": {"ref_policy_kl_penalty": 0}})
    ) == ["training.dpo.ref_policy_kl_penalty: must be > 0 (got 0)"]
    assert problems(job(training={"training_type": "dpo"}, batch={"sequence_packing": True})) == [
        "batch.sequence_packing: true: dpo batches each pair's chosen and rejected sides "
        "unpacked; set it to false"
    ]
    assert problems(
        job(
            training={"training_type": "dpo"},
            parallelism={"num_gpus_per_node": 2, "pipeline_parallel_size": 2},
        )
    ) == [
        "parallelism.pipeline_parallel_size: 2: dpo runs with data and tensor parallelism only "
        "in this version; set it to 1"
    ]
    tp = {"num_gpus_per_node": 2, "tensor_parallel_size": 2}
    assert ok(job(training={"training_type": "dpo"}, parallelism=tp)).training.dpo is not None


def test_max_grad_norm_is_a_setting_for_every_training_type():
    assert ok(job()).optimizer.max_grad_norm == 1.0
    assert ok(job(optimizer={"max_grad_norm": 0.5})).optimizer.max_grad_norm == 0.5
    assert problems(job(optimizer={"max_grad_norm": 0})) == [
        "optimizer.max_grad_norm: must be > 0 (got 0)"
    ]


def test_describe_names_the_settings_runs_show_prints():
    from tuneplex.backend import JobSettings
    from tuneplex_automodel.backend import AutomodelBackend

    lora = ok(
        job(
            dataset={"validation": "val.jsonl"},
            training={"finetuning_type": "lora_merged", "lora": {"rank": 8, "alpha": 4}},
            schedule={"max_steps": 10, "seed": 3},
            batch={"global_batch_size": 4, "micro_batch_size": 2},
            optimizer={"learning_rate": 1e-4},
        )
    )
    assert AutomodelBackend().describe(lora) == JobSettings(
        model="org/base",
        train_data="train.jsonl",
        validation_data="val.jsonl",
        training_type="sft",
        finetuning_type="lora_merged",
        lora_rank=8,
        lora_alpha=4,
        max_seq_length=2048,
        learning_rate=1e-4,
        batch={"global_batch_size": 4, "micro_batch_size": 2, "sequence_packing": False},
        epochs=1,
        max_steps=10,
        seed=3,
    )
    full = AutomodelBackend().describe(ok(job(training={"finetuning_type": "all_weights"})))
    assert (full.finetuning_type, full.lora_rank, full.lora_alpha) == ("all_weights", None, None)
    assert (full.validation_data, full.max_steps, full.seed) == (None, None, None)


V1_DEFAULTS = {  # issue 30: the settings of the v1 hyperparameter object and the tuning guide
    "optimizer.name": "adamw",
    "optimizer.lr_schedule": "cosine",
    "optimizer.min_learning_rate": None,
    "optimizer.adam_beta1": 0.9,
    "optimizer.adam_beta2": 0.999,
    "training.lora.dropout": 0.0,
    "training.lora.use_dora": False,
    "training.hidden_dropout": None,
    "training.attention_dropout": None,
}


@pytest.mark.parametrize("path,expected", V1_DEFAULTS.items())
def test_v1_setting_defaults(path, expected):
    test_spec_defaults(path, expected)


@pytest.mark.parametrize(
    "data,line",
    [
        (
            job(optimizer={"name": "sgd"}),
            "optimizer.name: must be one of: adamw, adam (got 'sgd')",
        ),
        (
            job(optimizer={"lr_schedule": "cosin"}),
            "optimizer.lr_schedule: must be one of: cosine, linear, flat (got 'cosin'); did you "
            "mean 'cosine'?",
        ),
        (
            job(optimizer={"learning_rate": 1e-4, "min_learning_rate": 1e-4}),
            "optimizer.min_learning_rate: 0.0001 must be below learning_rate (0.0001)",
        ),
        (
            job(optimizer={"lr_schedule": "flat", "min_learning_rate": 1e-7}),
            "optimizer.min_learning_rate: only used with lr_schedule cosine or linear (got flat)",
        ),
        (
            job(optimizer={"min_learning_rate": -1}),
            "optimizer.min_learning_rate: must be >= 0 (got -1)",
        ),
        (job(optimizer={"adam_beta1": 1}), "optimizer.adam_beta1: must be < 1 (got 1)"),
        (job(optimizer={"adam_beta2": -0.5}), "optimizer.adam_beta2: must be >= 0 (got -0.5)"),
        (job(training={"lora": {"dropout": 1.0}}), "training.lora.dropout: must be < 1 (got 1.0)"),
        (
            job(training={"lora": {"use_dora": "yes"}}),
            "training.lora.use_dora: expected true or false (got 'yes')",
        ),
        (
            job(training={"attention_dropout": -0.1}),
            "training.attention_dropout: must be >= 0 (got -0.1)",
        ),
        (
            job(
                training={"finetuning_type": "all_weights", "lora": {"use_dora": True}},
            ),
            "training.lora: only used with finetuning_type lora or lora_merged (got all_weights)",
        ),
        (
            job(
                training={"lora": {"use_dora": True}},
                parallelism={"num_gpus_per_node": 2, "tensor_parallel_size": 2},
            ),
            "training.lora.use_dora: true: DoRA's magnitude needs each adapted layer's whole "
            "weight, which tensor parallelism splits (got parallelism.tensor_parallel_size 2); "
            "set it to false",
        ),
        (
            job(
                training={"hidden_dropout": 0.1},
                parallelism={"num_gpus_per_node": 2, "pipeline_parallel_size": 2},
            ),
            "training.hidden_dropout: 0.1: dropout overrides are proven with data parallelism "
            "only in this version (got parallelism.pipeline_parallel_size 2); set it to null",
        ),
    ],
)
def test_v1_settings_are_checked(data, line):
    assert line in problems(data)


def test_v1_settings_accepted_with_data_parallelism():
    settings = ok(
        job(
            training={"hidden_dropout": 0.1, "attention_dropout": 0.0, "lora": {"use_dora": True}},
            optimizer={"name": "adam", "lr_schedule": "linear", "min_learning_rate": 0},
            parallelism={"num_gpus_per_node": 2},
        )
    )
    assert settings.optimizer.min_learning_rate == 0 and settings.training.lora.use_dora
