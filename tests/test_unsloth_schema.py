"""UnslothJobInput: the spec's defaults, bounds and cross-field rules."""

import pytest
from tuneplex.errors import UsageError
from tuneplex.schema.loading import validate_job
from tuneplex_unsloth.schema import UNSLOTH_TARGET_MODULES, UnslothJobInput

MINIMAL = {"model": {"name": "org/base"}, "dataset": {"path": "train.jsonl"}}
FULL_16BIT = {"model": {"name": "org/base", "load_in_4bit": False}}


def job(**sections):
    data = {k: dict(v) for k, v in MINIMAL.items()}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return data


def ok(data):
    return validate_job(UnslothJobInput, data)


def problems(data):
    with pytest.raises(UsageError) as info:
        validate_job(UnslothJobInput, data)
    return info.value.lines()


SPEC_DEFAULTS = {
    "model.max_seq_length": 2048,
    "model.load_in_4bit": True,
    "model.load_in_8bit": False,
    "model.dtype": "auto",
    "model.trust_remote_code": False,
    "dataset.text_field": "text",
    "dataset.apply_chat_template": False,
    "dataset.validation_path": None,
    "dataset.packing": False,
    "training.training_type": "sft",
    "training.finetuning_type": "lora",
    "training.lora.rank": 16,
    "training.lora.alpha": 16,
    "training.lora.dropout": 0.0,
    "training.lora.target_modules": list(UNSLOTH_TARGET_MODULES),
    "training.lora.bias": "none",
    "training.lora.use_rslora": False,
    "training.lora.random_state": 3407,
    "training.use_gradient_checkpointing": "unsloth",
    "schedule.epochs": 1,
    "schedule.max_steps": None,
    "schedule.warmup_steps": 0,
    "schedule.warmup_ratio": None,
    "schedule.lr_scheduler_type": "linear",
    "schedule.logging_steps": 1,
    "schedule.save_steps": None,
    "schedule.eval_steps": None,
    "schedule.seed": 3407,
    "batch.per_device_train_batch_size": 1,
    "batch.gradient_accumulation_steps": 1,
    "optimizer.learning_rate": 2e-4,
    "optimizer.weight_decay": 0.0,
    "optimizer.optim": "adamw_8bit",
    "hardware.gpus": None,
    "hardware.precision": "bf16",
    "output.save_method": "lora",
}


@pytest.mark.parametrize("path,expected", SPEC_DEFAULTS.items())
def test_spec_defaults(path, expected):
    node = ok(MINIMAL).model_dump()
    for part in path.split("."):
        node = node[part]
    assert node == expected


def test_seven_module_set():
    assert UNSLOTH_TARGET_MODULES == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )


@pytest.mark.parametrize(
    "data,line",
    [
        (job(model={"max_seq_length": 0}), "model.max_seq_length: must be >= 1 (got 0)"),
        (job(training={"lora": {"rank": 0}}), "training.lora.rank: must be >= 1 (got 0)"),
        (job(training={"lora": {"dropout": 1.0}}), "training.lora.dropout: must be < 1 (got 1.0)"),
        (
            job(training={"lora": {"dropout": -0.1}}),
            "training.lora.dropout: must be >= 0 (got -0.1)",
        ),
        (job(schedule={"warmup_ratio": 1.0}), "schedule.warmup_ratio: must be < 1 (got 1.0)"),
        (job(schedule={"logging_steps": 0}), "schedule.logging_steps: must be >= 1 (got 0)"),
        (job(schedule={"save_steps": 0}), "schedule.save_steps: must be >= 1 (got 0)"),
        (
            job(batch={"gradient_accumulation_steps": 0}),
            "batch.gradient_accumulation_steps: must be >= 1 (got 0)",
        ),
        (job(optimizer={"learning_rate": -1}), "optimizer.learning_rate: must be > 0 (got -1)"),
        (
            job(optimizer={"optim": "adam"}),
            "optimizer.optim: must be one of: adamw_torch, adamw_torch_fused, adamw_8bit, "
            "paged_adamw_8bit, sgd (got 'adam')",
        ),
        (
            job(model={"dtype": "bf16"}),
            "model.dtype: must be one of: auto, bfloat16, float16, float32 (got 'bf16'); did you "
            "mean 'bfloat16'?",
        ),
        (
            job(training={"lora": {"bias": "some"}}),
            "training.lora.bias: must be one of: none, all, lora_only (got 'some')",
        ),
        (
            job(training={"training_type": "distillation"}),
            "training.training_type: must be one of: sft, dpo, grpo (got 'distillation')",
        ),
        (
            job(training={"finetuning_type": "lora_merged"}),
            "training.finetuning_type: must be one of: lora, all_weights (got 'lora_merged')",
        ),
        (
            job(hardware={"precision": "fp32"}),
            "hardware.precision: must be one of: bf16, fp16 (got 'fp32')",
        ),
        (
            job(training={"use_gradient_checkpointing": "yes"}),
            "training.use_gradient_checkpointing: must be one of: unsloth, true, false (got 'yes')",
        ),
    ],
)
def test_bounds_types_enums(data, line):
    assert line in problems(data)


@pytest.mark.parametrize("value", ["unsloth", True, False])
def test_gradient_checkpointing_modes(value):
    assert (
        ok(job(training={"use_gradient_checkpointing": value})).training.use_gradient_checkpointing
        == value
    )


def test_4bit_and_8bit_exclusive():
    assert problems(job(model={"load_in_8bit": True})) == [
        "model.load_in_8bit: load_in_4bit and load_in_8bit are exclusive (load_in_4bit defaults "
        "to true); set load_in_4bit: false to load in 8-bit"
    ]
    parsed = ok(job(model={"load_in_8bit": True, "load_in_4bit": False}))
    assert parsed.model.load_in_8bit and not parsed.model.load_in_4bit


def test_full_weights_forbid_quantized_loading():
    lines = problems(job(training={"finetuning_type": "all_weights"}))
    assert lines == [
        "model.load_in_4bit: full-weight training (finetuning_type all_weights) cannot use "
        "quantized loading; set model.load_in_4bit and model.load_in_8bit to false "
        "(load_in_4bit defaults to true)"
    ]
    lines = problems(
        job(
            training={"finetuning_type": "all_weights"},
            model={"load_in_4bit": False, "load_in_8bit": True},
        )
    )
    assert lines[0].startswith("model.load_in_8bit: full-weight training")
    parsed = ok(job(training={"finetuning_type": "all_weights"}, **FULL_16BIT))
    assert parsed.training.lora is None


def test_lora_settings_refused_with_full_weights():
    assert problems(
        job(training={"finetuning_type": "all_weights", "lora": {"rank": 64}}, **FULL_16BIT)
    ) == ["training.lora: only used with finetuning_type lora (got all_weights)"]


def test_warmup_steps_and_ratio_exclusive():
    assert problems(job(schedule={"warmup_steps": 10, "warmup_ratio": 0.1})) == [
        "schedule.warmup_ratio: warmup_steps (10) and warmup_ratio (0.1) are exclusive; "
        "set only one"
    ]
    assert ok(job(schedule={"warmup_ratio": 0.1})).schedule.warmup_ratio == 0.1
    assert ok(job(schedule={"warmup_steps": 10})).schedule.warmup_steps == 10


@pytest.mark.parametrize("method", ["merged_16bit", "merged_4bit"])
def test_merged_save_methods_need_lora(method):
    assert ok(job(output={"save_method": method})).output.save_method == method
    assert problems(
        job(
            training={"finetuning_type": "all_weights"},
            output={"save_method": method},
            **FULL_16BIT,
        )
    ) == [
        f"output.save_method: {method} merges an adapter, so it needs finetuning_type lora "
        "(got all_weights)"
    ]


@pytest.mark.parametrize(
    "value,normalised,indices",
    [
        ("0", "0", [0]),
        ("0,1", "0,1", [0, 1]),
        (" 2 , 3 ", "2,3", [2, 3]),
        (1, "1", [1]),
        ("07", "7", [7]),
    ],
)
def test_gpu_list_valid(value, normalised, indices):
    hw = ok(job(hardware={"gpus": value})).hardware
    assert hw.gpus == normalised and hw.gpu_indices() == indices


@pytest.mark.parametrize(
    "value,message",
    [
        ("0,0", "GPU index 0 listed twice (got '0,0')"),
        ("0,-1", "expected comma-separated GPU indices like '0' or '0,1' (got '0,-1')"),
        ("a", "expected comma-separated GPU indices like '0' or '0,1' (got 'a')"),
        ("0,,1", "expected comma-separated GPU indices like '0' or '0,1' (got '0,,1')"),
        ("", "expected comma-separated GPU indices like '0' or '0,1' (got '')"),
        (True, "expected a string (got True)"),
    ],
)
def test_gpu_list_invalid(value, message):
    assert problems(job(hardware={"gpus": value})) == [f"hardware.gpus: {message}"]


def test_eval_steps_need_validation_data():
    assert problems(job(schedule={"eval_steps": 10})) == [
        "schedule.eval_steps: needs dataset.validation_path (no validation data)"
    ]
    ok(job(schedule={"eval_steps": 10}, dataset={"validation_path": "v.jsonl"}))


def test_derived_values():
    from tuneplex_unsloth.backend import UnslothBackend

    parsed = ok(
        job(
            batch={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 8},
            hardware={"gpus": "1"},
        )
    )
    d = UnslothBackend().derived(parsed)
    assert d["total_gpus"] == 1 and d["effective_batch_size"] == 32 and d["visible_gpus"] == "1"


def test_describe_names_the_settings_runs_show_prints():
    from tuneplex.backend import JobSettings
    from tuneplex_unsloth.backend import UnslothBackend

    lora = ok(
        job(
            model={"max_seq_length": 512},
            dataset={"validation_path": "val.jsonl"},
            training={"lora": {"rank": 8, "alpha": 4}},
            schedule={"max_steps": 10, "epochs": 2},
            batch={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4},
            optimizer={"learning_rate": 1e-4},
        )
    )
    assert UnslothBackend().describe(lora) == JobSettings(
        model="org/base",
        train_data="train.jsonl",
        validation_data="val.jsonl",
        training_type="sft",
        finetuning_type="lora",
        lora_rank=8,
        lora_alpha=4,
        max_seq_length=512,
        learning_rate=1e-4,
        batch={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4},
        epochs=2,
        max_steps=10,
        seed=3407,
    )
    full = UnslothBackend().describe(
        ok(job(model=FULL_16BIT["model"], training={"finetuning_type": "all_weights"}))
    )
    assert (full.finetuning_type, full.lora_rank, full.lora_alpha) == ("all_weights", None, None)
    assert (full.model, full.validation_data, full.max_steps) == ("org/base", None, None)


V1_DEFAULTS = {  # issue 30: the v1 settings that map onto Hugging Face's trainer
    "optimizer.adam_beta1": 0.9,
    "optimizer.adam_beta2": 0.999,
    "optimizer.min_learning_rate": None,
    "training.lora.use_dora": False,
}


@pytest.mark.parametrize("path,expected", V1_DEFAULTS.items())
def test_v1_setting_defaults(path, expected):
    test_spec_defaults(path, expected)


@pytest.mark.parametrize(
    "data,line",
    [
        (job(optimizer={"adam_beta1": 1.0}), "optimizer.adam_beta1: must be < 1 (got 1.0)"),
        (job(optimizer={"adam_beta2": -1}), "optimizer.adam_beta2: must be >= 0 (got -1)"),
        (
            job(optimizer={"optim": "sgd", "adam_beta2": 0.99}),
            "optimizer.adam_beta2: only used by the Adam optimizers (got optim sgd)",
        ),
        (
            job(optimizer={"min_learning_rate": 1e-6}),
            "optimizer.min_learning_rate: only used with schedule.lr_scheduler_type "
            "cosine_with_min_lr (got linear)",
        ),
        (
            job(
                schedule={"lr_scheduler_type": "cosine_with_min_lr"},
                optimizer={"learning_rate": 1e-4, "min_learning_rate": 2e-4},
            ),
            "optimizer.min_learning_rate: 0.0002 must be below learning_rate (0.0001)",
        ),
        (
            job(training={"lora": {"use_dora": 1}}),
            "training.lora.use_dora: expected true or false (got 1)",
        ),
    ],
)
def test_v1_settings_are_checked(data, line):
    assert line in problems(data)
