"""The export benchmark keeps working: its tiny shape runs on CPU in seconds."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))


@pytest.mark.slow
def test_export_bench_tiny(tmp_path, capsys):
    import export

    rows = export.main(["--shape", "tiny", "--formats", "gguf:q8_0", "--workdir", str(tmp_path)])
    assert [r["what"] for r in rows] == ["gguf q8_0"]
    (row,) = rows
    assert row["written"] == (tmp_path / "out-q8_0.gguf").stat().st_size > 0
    assert row["peak_rss"] > 0 and row["seconds"] > 0
    writer = row["writer"]
    assert writer["during"] >= writer["before"] > 0 and writer["seconds"] > 0
    assert "| gguf q8_0 |" in capsys.readouterr().out
