"""bench/checkpoint.py runs end to end at DP=2 on the tiny shape: every save mode reports its
figures, and the bytes land where each mode writes them (gathered: rank 0 only)."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))


@pytest.mark.slow
def test_checkpoint_bench_tiny(tmp_path, capsys):
    import checkpoint

    out = tmp_path / "out.json"
    assert checkpoint.main(["--shape", "tiny", "--json", str(out)]) == 0
    results = {r["mode"]: r for r in json.loads(out.read_text())}
    assert list(results) == list(checkpoint.MODES)
    for r in results.values():
        assert r["blocked_s"] > 0 and r["total_s"] >= r["blocked_s"] * 0.99, r
        assert len(r["bytes"]) == 2 and r["bytes"][0] > 0, r
    assert results["gathered"]["bytes"][1] == 0 and results["final-streamed"]["bytes"][1] == 0
    for mode in ("sharded", "async"):
        assert results[mode]["bytes"][1] > 0  # each rank writes its own shards
    # the streamed final/ holds what the gathered one does
    assert results["final-streamed"]["bytes"][0] >= results["final-gathered"]["bytes"][0]
    table = capsys.readouterr().out
    assert "| async |" in table and "command: python bench/checkpoint.py" in table
