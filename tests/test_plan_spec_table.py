"""`tuneplex plan` against the spec's "GPU Memory Guidelines" table (training-configuration.txt),
on the real public configs of Llama 3.2 1B and 3B, Llama 3.1 8B and 70B and Llama 2 13B written
as config-only directories. The settings the table implies: bf16, micro batch 1, 2048 tokens a
row (the default max_seq_length), each backend's default activation checkpointing (automodel:
none; unsloth: its own offloading), and activation checkpointing full where that is what fits.

`pytest tests/test_plan_spec_table.py -s` prints tuneplex's answer next to the table's (the
table in the README)."""

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from tuneplex.cli import main

_LLAMA3 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
}
_ROPE_3_1 = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
_ROPE_3_2 = {**_ROPE_3_1, "factor": 32.0}
CONFIGS = {  # config.json as each model publishes it (the keys that size it)
    "1B": {  # meta-llama/Llama-3.2-1B
        **_LLAMA3,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "rope_scaling": _ROPE_3_2,
    },
    "3B": {  # meta-llama/Llama-3.2-3B
        **_LLAMA3,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
        "rope_scaling": _ROPE_3_2,
    },
    "8B": {  # meta-llama/Llama-3.1-8B
        **_LLAMA3,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
        "rope_scaling": _ROPE_3_1,
    },
    "13B": {  # meta-llama/Llama-2-13b-hf
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-05,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    },
    "70B": {  # meta-llama/Llama-3.1-70B
        **_LLAMA3,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
        "rope_scaling": _ROPE_3_1,
    },
}
PARAMETERS = {"1B": 1.24e9, "3B": 3.21e9, "8B": 8.03e9, "13B": 13.0e9, "70B": 70.6e9}
"""What each model card states (Llama 2 13B: 13.0B)."""


@dataclass(frozen=True)
class Row:
    """A row of the spec's table: LoRA on `lora_gpus` × `lora_gb`; full weights on at least
    `full_gpus` (up to `full_most`) × `full_gb`."""

    lora_gpus: int
    lora_gb: int
    full_gpus: int
    full_most: int | None
    full_gb: int


TABLE = {
    "1B": Row(1, 16, 1, 1, 24),
    "3B": Row(1, 24, 2, 2, 24),
    "8B": Row(1, 40, 2, 4, 80),
    "13B": Row(1, 80, 4, 4, 80),
    "70B": Row(2, 80, 8, None, 80),  # 8+
}
CARDS = {16: "V100 16GB", 24: "RTX 4090", 40: "A100 40GB", 80: "H100 80GB"}
"""The table's sizes as cards report them (15.8, 24.0, 40.0 and 79.6 GiB)."""
COUNTS = (1, 2, 4, 8, 16, 32, 64)


def plan(job, *args) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", str(job), "--json", *map(str, args)]) == 0
    return json.loads(out.getvalue())


def layout(gpus: int) -> list[str]:
    """`gpus` GPUs as nodes of at most 8."""
    per_node, nodes = min(gpus, 8), max(gpus // 8, 1)
    return [
        "--set",
        f"parallelism.num_gpus_per_node={per_node}",
        "--set",
        f"parallelism.num_nodes={nodes}",
    ]


FULL = ["--set", "training.finetuning_type=all_weights"]
AC_FULL = ["--set", "training.activation_checkpointing=full"]


def fewest_gpus(job, gb: int, *sets: str) -> int | None:
    """The fewest of COUNTS GPUs of `gb` on which the job fits with FSDP2, or None."""
    for gpus in COUNTS:
        if plan(job, "--gpu", CARDS[gb], *sets, *layout(gpus))["fits"]:
            return gpus
    return None


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    """Every figure the table needs, per size, through the real CLI."""
    root = tmp_path_factory.mktemp("spec-table")
    out = {}
    for size, config in CONFIGS.items():
        folder = root / size
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        job = root / f"{size}.yaml"
        job.write_text(
            f"model: {folder}\ndataset:\n  training: t.jsonl\nbatch:\n  global_batch_size: 64\n"
        )
        ujob = root / f"{size}-unsloth.yaml"
        ujob.write_text(f"model:\n  name: {folder}\ndataset:\n  path: t.jsonl\n")
        row, card = TABLE[size], CARDS[TABLE[size].lora_gb]
        out[size] = {
            "lora": plan(job, "--gpu", card, *layout(row.lora_gpus)),
            "lora_ac": plan(job, "--gpu", card, *AC_FULL, *layout(row.lora_gpus)),
            "lora_1": plan(job),
            "full_1": plan(job, *FULL),
            "full_gpus": fewest_gpus(job, row.full_gb, *FULL),
            "full_gpus_ac": fewest_gpus(job, row.full_gb, *FULL, *AC_FULL),
            "unsloth_4bit": plan(ujob, "--backend", "unsloth", "--gpu", card),
            "unsloth_full": plan(
                ujob, "--backend", "unsloth", *FULL, "--set", "model.load_in_4bit=false"
            ),
        }
    _print(out)
    return out


def _count(gpus: int | None, gb: int) -> str:
    return f"{gpus} × {gb} GB" if gpus else f"over {COUNTS[-1]} × {gb} GB"


def table_rows(out: dict) -> list[str]:
    """The README's table rows, from tuneplex's answers."""
    rows = []
    for size, a in out.items():
        row = TABLE[size]
        spec_lora = (
            f"{row.lora_gpus} × {row.lora_gb} GB" if row.lora_gpus > 1 else f"{row.lora_gb} GB"
        )
        on = f" (on {row.lora_gpus} GPUs)" if row.lora_gpus > 1 else ""
        lora = f"{a['lora']['per_gpu_gib']:.1f} / {a['lora_ac']['per_gpu_gib']:.1f}{on}"
        spec_full = f"{row.full_gpus}{'+' if row.full_most is None else ''} × {row.full_gb} GB"
        if row.full_most not in (None, row.full_gpus):
            spec_full = f"{row.full_gpus}-{row.full_most} × {row.full_gb} GB"
        full = f"{_count(a['full_gpus'], row.full_gb)} / {_count(a['full_gpus_ac'], row.full_gb)}"
        four = f"{a['unsloth_4bit']['per_gpu_gib']:.1f}"
        name = "7-8B" if size == "8B" else size
        rows.append(f"| {name} | {spec_lora} | {lora} | {four} | {spec_full} | {full} |")
    return rows


def _print(out: dict) -> None:
    print("\n" + "\n".join(table_rows(out)))


def test_parameters_match_the_model_cards(answers):
    for size, a in answers.items():
        assert a["lora_1"]["parameters"] == pytest.approx(PARAMETERS[size], rel=0.01), size


def test_lora_fits_the_tables_gpu(answers):
    """Every LoRA row fits the table's GPUs at the backend's defaults, except 70B on 2 × 80 GB,
    which fits with activation checkpointing, the change plan names first."""
    for size in ("1B", "3B", "8B", "13B"):
        assert answers[size]["lora"]["fits"] is True, size
    seventy = answers["70B"]
    assert seventy["lora"]["fits"] is False and seventy["lora_ac"]["fits"] is True
    assert seventy["lora"]["suggestions"][0] == "--set training.activation_checkpointing=full"


def test_full_weights_need_the_tables_gpu_counts(answers):
    """tuneplex's fewest GPUs for full weights (the better of no and full activation
    checkpointing) is the table's count within a factor of two (of 8 to 4 × 8 for its "8+");
    70B never fits one 80 GB GPU."""
    for size, a in answers.items():
        row = TABLE[size]
        ours = min(n for n in (a["full_gpus"], a["full_gpus_ac"]) if n is not None)
        most = 2 * row.full_most if row.full_most else 4 * row.full_gpus
        assert row.full_gpus / 2 <= ours <= most, size
    assert answers["70B"]["full_gpus_ac"] >= 8
    assert answers["70B"]["full_gpus"] is None  # at 2048 tokens, only with checkpointing


def test_estimates_grow_with_size_and_full_weights_need_more(answers):
    """Per parameter count; unsloth's 4-bit LoRA among the 128k-vocabulary models only (its
    loss's logits and the 16-bit embeddings outweigh 4-bit layers: Llama 2 13B's 32k
    vocabulary puts it below Llama 3.1 8B)."""
    sizes = list(CONFIGS)
    same_vocab = [s for s in sizes if CONFIGS[s]["vocab_size"] == CONFIGS["8B"]["vocab_size"]]
    for key, among in (("lora_1", sizes), ("full_1", sizes), ("unsloth_4bit", same_vocab)):
        figures = [answers[s][key]["per_gpu_gib"] for s in among]
        assert figures == sorted(figures) and len(set(figures)) == len(figures), key
    for size, a in answers.items():
        assert a["full_1"]["per_gpu_gib"] > 2 * a["lora_1"]["per_gpu_gib"], size
        assert a["unsloth_4bit"]["per_gpu_gib"] < a["lora_1"]["per_gpu_gib"], size
        assert a["unsloth_full"]["per_gpu_gib"] > a["unsloth_4bit"]["per_gpu_gib"], size


def test_the_readme_shows_these_figures(answers):
    """The README's table is this test's output (paste the printed rows when the estimator
    changes)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    missing = [row for row in table_rows(answers) if row not in readme.splitlines()]
    assert missing == [], "README's plan table is stale; its rows now:\n" + "\n".join(
        table_rows(answers)
    )
