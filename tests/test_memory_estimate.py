"""The memory estimator's terms: what appears and disappears with each setting, what parallel
sizes divide, config-only directories and the one-line errors of bad ones. Fast: no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from tuneplex.errors import UsageError
from tuneplex.memory import MemoryChange, MemoryJob, ModelShape, estimate, read_model_shape
from tuneplex.memory.estimate import lora_parameters

LLAMA_1B = {  # Llama-3.2-1B's config.json, the sizes that matter
    "model_type": "llama",
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
}
MIXTRAL = {
    "model_type": "mixtral",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
}


def config_dir(tmp_path, config: dict, name: str = "model"):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def shape(tmp_path) -> ModelShape:
    return read_model_shape(str(config_dir(tmp_path, LLAMA_1B)))


def test_config_only_directory_gives_the_published_parameter_counts(tmp_path, shape):
    assert shape.parameters() == 1_235_814_400  # Llama-3.2-1B
    mixtral = read_model_shape("m", base_dir=config_dir(tmp_path, MIXTRAL, "m").parent)
    assert round(mixtral.parameters() / 1e9, 1) == 46.7  # Mixtral-8x7B


def test_multimodal_text_config_is_the_language_model(tmp_path):
    path = config_dir(tmp_path, {"model_type": "mllama", "text_config": LLAMA_1B})
    assert read_model_shape(str(path)).parameters() == 1_235_814_400


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p, "no config.json"),
        (lambda p: (p / "config.json").write_text("{not json"), "not readable JSON"),
        (lambda p: (p / "config.json").write_text(json.dumps({"hidden_size": 8})), "no "),
    ],
)
def test_bad_model_directory_is_one_line_naming_it(tmp_path, make, needle):
    path = tmp_path / "broken"
    path.mkdir()
    make(path)
    with pytest.raises(UsageError) as err:
        read_model_shape(str(path))
    (line,) = err.value.lines()
    assert line.startswith("model: ") and needle in line and "broken" in line


def test_hub_id_not_cached_while_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UsageError) as err:
        read_model_shape("someone/nothing-here")
    (line,) = err.value.lines()
    assert "someone/nothing-here" in line and "offline" in line
    snapshot = tmp_path / "cache/models--someone--cached/snapshots/abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(LLAMA_1B))
    (tmp_path / "cache/models--someone--cached/refs").mkdir()
    (tmp_path / "cache/models--someone--cached/refs/main").write_text("abc")
    assert read_model_shape("someone/cached").hidden == 2048


def test_full_weights_hold_gradients_and_moments_lora_holds_adapters(shape):
    full = estimate(MemoryJob(shape=shape, trainable="full", weight_bytes=4, hidden_bytes=4))
    lora = estimate(MemoryJob(shape=shape, trainable="lora"))
    p = shape.parameters()
    assert full.breakdown["weights"] == 4 * p
    assert full.breakdown["optimizer states"] == 8 * p
    assert "lora weights" not in full.breakdown
    assert lora.breakdown["weights"] == 2 * p
    adapters = lora_parameters(MemoryJob(shape=shape))
    assert adapters == 16 * 16 * (2048 * 4 + 512 * 2 + 2048 * 2 + 3 * (2048 + 8192))
    assert lora.breakdown["lora weights"] == 4 * adapters
    assert lora.per_gpu < full.per_gpu / 2
    assert full.per_gpu == sum(full.breakdown.values())


def test_activations_shrink_with_checkpointing_and_grow_with_tokens(shape):
    job = MemoryJob(shape=shape, micro_batch=4, seq_len=2048)
    act = {
        mode: estimate(replace(job, checkpointing=mode)).breakdown["activations"]
        for mode in ("none", "selective", "full")
    }
    assert act["full"] < act["selective"] < act["none"]
    assert act["full"] < act["none"] / 5
    longer = estimate(replace(job, seq_len=4096)).breakdown["activations"]
    assert longer == pytest.approx(2 * act["none"], rel=1e-6)


def test_objective_terms_appear_only_when_asked(shape):
    plain = estimate(MemoryJob(shape=shape)).breakdown
    for key in ("teacher", "reference", "kv cache"):
        assert key not in plain
    rich = estimate(
        MemoryJob(shape=shape, teacher=shape, reference="copy", kv_sequences=8, kv_length=512)
    ).breakdown
    assert rich["teacher"] == 2 * shape.parameters()
    assert rich["reference"] == plain["weights"]
    assert rich["kv cache"] == 8 * 512 * 2 * 16 * 8 * 64 * 2
    off = estimate(MemoryJob(shape=shape, reference="adapter_off")).breakdown
    assert "reference" not in off  # the base with the adapter off: no copy


def test_quantized_base_and_eight_bit_optimizer(shape):
    four = estimate(MemoryJob(shape=shape, quant_bits=4)).breakdown["weights"]
    assert four < estimate(MemoryJob(shape=shape)).breakdown["weights"] / 2
    full = MemoryJob(shape=shape, trainable="full")
    eight = estimate(replace(full, optimizer="adamw_8bit")).breakdown["optimizer states"]
    assert eight == estimate(full).breakdown["optimizer states"] // 4


def test_cuda_overhead_only_on_cuda(shape):
    assert "runtime overhead" in estimate(MemoryJob(shape=shape)).breakdown
    assert "runtime overhead" not in estimate(MemoryJob(shape=shape, device="cpu")).breakdown


def test_parallel_sizes_divide_each_ranks_share(shape):
    job = MemoryJob(
        shape=shape,
        trainable="full",
        weight_bytes=4,
        hidden_bytes=4,
        device="cpu",
        micro_batch=8,
        seq_len=4096,
    )
    one = estimate(job).breakdown
    fsdp = estimate(replace(job, dp=4, fsdp=True, gpus=4))
    assert fsdp.gpus == 4
    for key in ("weights", "optimizer states"):
        assert fsdp.breakdown[key] == one[key] // 4
    assert fsdp.breakdown["gathered weights"] > 0  # what FSDP2 unshards while it computes
    tp = estimate(replace(job, tp=2)).breakdown
    assert tp["weights"] == one["weights"] // 2
    assert tp["activations"] < one["activations"]
    pp = estimate(replace(job, pp=4)).breakdown
    assert pp["weights"] == one["weights"] // 4
    cp = estimate(replace(job, cp=2)).breakdown
    assert cp["activations"] == pytest.approx(one["activations"] / 2, rel=1e-6)


def test_expert_parallelism_splits_the_experts_only(tmp_path):
    mixtral = read_model_shape(str(config_dir(tmp_path, MIXTRAL)))
    job = MemoryJob(shape=mixtral, trainable="full")
    one = estimate(job).breakdown["weights"]
    ep = estimate(replace(job, ep=8)).breakdown["weights"]
    assert one / 8 < ep < one / 4  # attention and embeddings stay whole on every rank


def test_backends_fill_the_job_and_offer_changes_that_apply(tmp_path):
    from tuneplex.schema.loading import validate_job
    from tuneplex_automodel.backend import AutomodelBackend
    from tuneplex_unsloth.backend import UnslothBackend

    model = config_dir(tmp_path, LLAMA_1B)
    auto = AutomodelBackend()
    job = validate_job(
        auto.job_schema,
        {
            "model": str(model),
            "dataset": {"training": "rows.jsonl"},
            "training": {"finetuning_type": "all_weights", "max_seq_length": 1024},
            "batch": {"global_batch_size": 8, "micro_batch_size": 4},
        },
    )
    mj = auto.memory_job(job, base_dir=tmp_path)
    assert (mj.trainable, mj.seq_len, mj.micro_batch, mj.grad_accumulation) == ("full", 1024, 4, 2)
    keys = [k for change in auto.memory_changes(job) for k, _ in change.overrides]
    assert keys[0] == "training.activation_checkpointing"
    assert "batch.micro_batch_size" in keys and "training.finetuning_type" in keys
    assert all(isinstance(c, MemoryChange) for c in auto.memory_changes(job))
    uns = UnslothBackend()
    ujob = validate_job(
        uns.job_schema,
        {
            "model": {"name": str(model), "load_in_4bit": False},
            "dataset": {"path": "rows.jsonl"},
            "training": {"use_gradient_checkpointing": False},
        },
    )
    umj = uns.memory_job(ujob, base_dir=tmp_path)
    assert (umj.quant_bits, umj.checkpointing, umj.loss) == (None, "none", "budget")
    overrides = [o for c in uns.memory_changes(ujob) for o in c.overrides]
    assert ("model.load_in_4bit", "true") in overrides
    assert ("training.use_gradient_checkpointing", "unsloth") in overrides


def test_memory_package_imports_no_torch():
    code = (
        "import sys, tuneplex.memory, tuneplex_automodel.memory, tuneplex_unsloth.memory;"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
