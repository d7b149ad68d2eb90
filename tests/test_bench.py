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
    model (LoRA; full weights take the same code, and bench/train_throughput.py's test runs
    them); on the same rows, order and init, their first-step losses agree."""
    import json

    import peers

    out = tmp_path / "out.json"
    args = ["--shape", "tiny", "--steps", "2", "--warmup", "1", "--setups", "lora"]
    results = peers.main([*args, "--workdir", str(tmp_path), "--json", str(out)])
    assert json.loads(out.read_text())["results"] == results
    assert [(r["setup"], r["contender"]) for r in results] == [
        ("lora", c) for c in ("tuneplex", "trainer", "loop")
    ]
    for r in results:
        assert r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0 and r["wall_s"] > 0
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
    first = [r["losses"][0] for r in results]
    assert max(first) - min(first) < 0.02 * min(first), first
    table = capsys.readouterr().out
    assert "speed÷Trainer" in table and table.count("tuneplex") == 1


@pytest.mark.slow
def test_generate_bench_tiny(tmp_path, capsys):
    """bench/generate.py keeps working: the guide's loop and a tuneplex batch size each generate
    for the same prompts, and a completion that differs is located and explained."""
    import json

    import generate
    from tuneplex.inference.engine import Completion

    out = tmp_path / "out.json"
    args = ["--shape", "tiny", "--prompts", "8", "--max-new-tokens", "8", "--batch-sizes", "4"]
    results = generate.main([*args, "--workdir", str(tmp_path), "--json", str(out)])
    assert json.loads(out.read_text())["results"] == results
    assert [(r["contender"], r["batch_size"]) for r in results] == [("guide", 1), ("tuneplex", 4)]
    for r in results:
        assert r["tokens_per_s"] > 0 and 0 < r["tokens"] <= 8 * 8
        assert 0 <= r["identical"] <= 8 and r["prompts"] == 8
    assert results[0]["speed_vs_guide"] == 1.0
    table = capsys.readouterr().out
    assert "max_new_tokens 8" in table and "speed÷guide" in table and "tuneplex      4" in table

    # a completion changed at its third token is reported as diverging there, with the gap
    model, tok, prompter = generate.load(tmp_path / "tiny")
    ids = prompter.from_text("hello world").ids
    stops = set(prompter.stop.token_ids)
    (raw,) = generate.guide_loop(model, [ids], max_new_tokens=6, eos=list(stops), pad=0)
    mine, _ = generate.cut(raw, stops)
    assert len(mine) >= 3
    other = Completion(ids=[*mine[:2], (mine[2] + 1) % len(tok), *mine[3:]], text="", stopped=False)
    same, first = generate.compare(model, [ids], [raw], [other], stops)
    assert same == 0 and first["prompt"] == 0 and first["position"] == 2
    assert first["guide_token"] == mine[2] and first["tuneplex_token"] == other.ids[2]
    assert first["top2_gap"] >= 0 and first["guide_margin_over_tuneplex"] >= first["top2_gap"]
