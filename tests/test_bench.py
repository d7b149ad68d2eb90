"""The training benchmark keeps working: its tiny shape runs on CPU in seconds."""

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))


@pytest.mark.slow
def test_train_throughput_tiny(tmp_path, capsys):
    import train_throughput

    results = train_throughput.main(
        [
            "--shape",
            "tiny",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--seq",
            "64",
            "--workdir",
            str(tmp_path),
            "--json",
            str(tmp_path / "out.json"),
        ]
    )
    assert [r["setup"] for r in results] == ["lora", "full"]
    for r in results:
        assert r["tokens_per_s"] > 0 and math.isfinite(r["final_loss"])
        assert r["peak_memory_gib"] > 0
    assert results[1]["trainable_parameters"] == results[1]["total_parameters"]
    assert results[0]["trainable_parameters"] < results[0]["total_parameters"]
    assert "tokens/s" in capsys.readouterr().out


@pytest.mark.slow
def test_stop_latency_tiny(tmp_path, capsys):
    """bench/stop_latency.py keeps working: one SIGTERM stop of the tiny model, timed."""
    import stop_latency

    args = ["--setups", "lora", "--procs", "1", "--repeats", "1", "--seq", "32"]
    (row,) = stop_latency.main([*args, "--workdir", str(tmp_path)])
    assert row["setup"] == "lora" and row["procs"] == 1 and row["workers_gone_s"] is None
    assert 0 < row["checkpoint_s"] <= row["exit_s"] < 60
    assert "SIGTERM→ckpt" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("template", ["chatml", "reasoning"])
def test_data_pipeline_small(tmp_path, capsys, template):
    """bench/data_pipeline.py keeps working, on both templates: a build, then a cached rerun
    that gives the same counts."""
    import json

    import data_pipeline

    out = tmp_path / "out.json"
    args = ["--rows", "300", "--template", template, "--workdir", str(tmp_path)]
    assert data_pipeline.main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["first"]["rows"] == result["cached"]["rows"] == 300
    assert 0 < result["first"]["trained"] == result["cached"]["trained"] < result["first"]["tokens"]
    assert f"300 chat rows ({template} template)" in capsys.readouterr().out


@pytest.mark.slow
def test_peers_tiny(tmp_path, capsys):
    """bench/peers.py keeps working: tuneplex, Trainer and a plain loop each train the tiny
    model (LoRA and full); on the same rows, order and init, their first-step losses agree."""
    import json

    import peers

    out = tmp_path / "out.json"
    args = ["--shape", "tiny", "--steps", "2", "--warmup", "1", "--setups", "lora,full"]
    results = peers.main([*args, "--workdir", str(tmp_path), "--json", str(out)])
    assert json.loads(out.read_text())["results"] == results
    assert [(r["setup"], r["contender"]) for r in results] == [
        (s, c) for s in ("lora", "full") for c in ("tuneplex", "trainer", "loop")
    ]
    for r in results:
        assert r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0 and r["wall_s"] > 0
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
    for setup in ("lora", "full"):
        first = [r["losses"][0] for r in results if r["setup"] == setup]
        assert max(first) - min(first) < 0.02 * min(first), first
    table = capsys.readouterr().out
    assert "speed÷Trainer" in table and table.count("tuneplex") == 2
