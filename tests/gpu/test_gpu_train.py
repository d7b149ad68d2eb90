"""On a CUDA GPU: the automodel engine on a random-init Llama-3.2-1B-shaped model.

Skipped without CUDA. Run: `pytest -q -s tests/gpu` (prints the throughput table).
"""

import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
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
