"""On a CUDA GPU: the automodel engine on a random-init Llama-3.2-1B-shaped model.

Skipped without CUDA. Run: `pytest -q -s -m gpu` (prints the throughput table).
"""

import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)
sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))


def test_llama_1b_lora_r16_micro_4x2048(tmp_path):
    import train_throughput

    (result,) = train_throughput.main(
        [
            "--shape",
            "llama-1b",
            "--setups",
            "lora",
            "--steps",
            "10",
            "--warmup",
            "3",
            "--micro",
            "4",
            "--seq",
            "2048",
            "--workdir",
            str(tmp_path),
        ]
    )
    assert "cuda" in result["device"] and math.isfinite(result["final_loss"])
    assert result["tokens_per_s"] > 1000
