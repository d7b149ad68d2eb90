"""On a CUDA GPU: `tuneplex plan` without --gpu holds the estimate against the card CUDA sees
(through nvidia-smi, no torch), and `--gpu` knows that card at the size its driver reports.

Skipped without CUDA."""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)

GIB = 1 << 30


def test_plan_sees_the_gpu_cuda_sees(tmp_path):
    from tuneplex.errors import UsageError
    from tuneplex.memory.gpus import find_gpu

    model = tmp_path / "m"
    model.mkdir()
    config = {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    }
    (model / "config.json").write_text(json.dumps(config))
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {model}\ndataset:\n  training: t.jsonl\n")
    proc = subprocess.run(
        [sys.executable, "-m", "tuneplex", "plan", str(job), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    smallest = min(
        range(torch.cuda.device_count()),
        key=lambda i: torch.cuda.get_device_properties(i).total_memory,
    )
    props = torch.cuda.get_device_properties(smallest)
    assert out["gpu_name"] == props.name
    assert out["gpu_gib"] == pytest.approx(props.total_memory / GIB, abs=1.0)
    assert out["fits"] is (out["per_gpu_gib"] <= out["gpu_gib"])
    try:
        card = find_gpu(props.name)
    except UsageError:  # a card the table does not know: nothing to compare
        pytest.skip(f"{props.name} is not in tuneplex's card table")
    assert card.total_gib == pytest.approx(out["gpu_gib"], abs=0.1)
