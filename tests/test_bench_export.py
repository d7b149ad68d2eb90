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
    assert [r["what"] for r in rows] == ["load only (baseline)", "export gguf q8_0"]
    assert rows[1]["written"] == (tmp_path / "out-q8_0.gguf").stat().st_size > 0
    assert all(r["peak_rss"] > 0 and r["seconds"] > 0 for r in rows)
    assert "| export gguf q8_0 |" in capsys.readouterr().out
