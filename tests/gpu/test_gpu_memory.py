"""On a CUDA GPU: the memory estimate (`tuneplex plan`) against `torch.cuda.max_memory_allocated`
over real training steps (bench/memory.py's measurement: reset after setup, checkpoint saves
excluded), for the CPU table's configurations and a Llama-3.2-1B-shaped model built with random
weights. The estimate's fixed runtime overhead (CUDA context, kernels) is left out: the
allocator does not see it.

Skipped without CUDA."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))

TOLERANCE = 0.15
CONFIGS = [
    "small-lora-512",
    "small-lora-ac-512",
    "small-full-512",
    "small-full-ac-512",
    "bigvocab-full-256",
    "bigvocab-lora-512",
]


def _check(work: Path, config) -> None:
    import memory as bench

    bench.prepare(work, [config])
    measured = bench.measure(work, config)
    estimate, breakdown = bench.estimated(work, config, device="cuda", bf16=measured["bf16"])
    ratio = estimate / measured["peak"]
    print(
        f"{config.name}: measured {measured['peak'] / 2**20:.1f} MiB, estimate "
        f"{estimate / 2**20:.1f} MiB, ratio {ratio:.3f}, {breakdown}"
    )
    assert abs(ratio - 1) <= TOLERANCE, (config.name, ratio, breakdown)


@pytest.mark.parametrize("name", CONFIGS)
def test_estimate_within_15_percent_of_cuda_peak(tmp_path_factory, name):
    import memory as bench

    _check(tmp_path_factory.getbasetemp() / "bench-memory", bench.BY_NAME[name])


@pytest.mark.parametrize("setup", ["lora", "full"])
def test_estimate_within_15_percent_on_a_1b_model(tmp_path_factory, setup):
    import memory as bench

    config = bench.Config(f"llama-1b-{setup}-1024", "llama-1b", setup, 1024, micro=2)
    if setup == "full":
        config = replace(config, checkpointing="full")
    _check(tmp_path_factory.getbasetemp() / "bench-memory", config)
