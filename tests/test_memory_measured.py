"""The memory estimate (`tuneplex plan`) within 15% of the measured peak of real training
steps on this CPU: bench/memory.py's measurement (the CPU allocator's live tensor bytes from
PyTorch's profiler, weights included, over three steps of the automodel recipe) for LoRA on
the tiny shape and full weights on the small shape (256 tokens), trained at once in two worker
processes. The bench's own table covers the small and bigvocab shapes and DP=2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

TOLERANCE = 0.15


@pytest.mark.slow
def test_estimate_within_15_percent_of_the_measured_cpu_peak(tmp_path):
    import memory as bench

    configs = bench.CI_CONFIGS
    bench.prepare(tmp_path, configs)
    running = [(c, bench.start(tmp_path, c)) for c in configs]
    for c, procs in running:
        measured = bench.finish(c, procs)
        assert measured["device"] == "cpu"
        estimate, breakdown = bench.estimated(tmp_path, c, device="cpu", bf16=measured["bf16"])
        ratio = estimate / measured["peak"]
        assert abs(ratio - 1) <= TOLERANCE, (c.name, measured["peak"], estimate, breakdown)
        assert breakdown["weights"] > 0 and breakdown["activations"] > 0
