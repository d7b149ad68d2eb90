"""`tuneplex export`'s own rules: every refusal in one line before weights load, outputs never
replaced unless they are an earlier export (and then only whole), and the GGUF branch's calls
of `tuneplex.export.gguf` / `.ollama` (recorded here; the files themselves are tested in
test_export_gguf.py)."""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

pytest_plugins = ("export_helpers",)  # its fixtures: export_runs, export_adapter

from export_helpers import (  # noqa: E402
    export,
    refused,
    weight_dtypes,
)
from tuneplex.export.output import MARKER  # noqa: E402


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "args,where,contains",
    [
        (["--format", "onnx"], "--format: 'onnx': choose from hf, gguf", ""),
        (["--format", "hff"], "--format", "did you mean 'hf'"),
        (["--format", "hf", "--dtype", "q8_0"], "--dtype: 'q8_0': with --format hf", "bf16"),
        (["--format", "hf", "--dtype", "bf61"], "--dtype", "did you mean 'bf16'"),
        (
            ["--format", "hf", "--ollama"],
            "--ollama: an Ollama Modelfile goes with --format gguf",
            "",
        ),
        (
            ["--format", "gguf", "-o", "x.bin"],
            "--output: x.bin: a GGUF file's name ends in .gguf",
            "",
        ),
        (["--format", "hf", "--checkpoint", "latest"], "--checkpoint", "is not a run directory"),
    ],
)
def test_bad_flags_are_refused_in_one_line(export_adapter, args, where, contains, tmp_path):
    refused(export_adapter, *args, where=where, contains=contains)
    assert list(tmp_path.iterdir()) == []


def test_missing_format_is_one_line(export_adapter):
    refused(export_adapter, where="tuneplex export: Missing option '--format'")


def test_a_missing_target_is_refused(tmp_path):
    refused(tmp_path / "nope", "--format", "hf", where=str(tmp_path / "nope"), contains="no such")


def test_a_damaged_run_is_refused(export_runs, tmp_path):

    run = tmp_path / "damaged"
    shutil.copytree(export_runs("lora"), run)
    for f in (run / "final").glob("*.safetensors"):
        f.unlink()
    refused(
        run, "--format", "hf", "-o", tmp_path / "o", where=str(run / "final"), contains="damaged"
    )
    assert not (tmp_path / "o").exists()


def test_an_existing_output_is_never_replaced_without_overwrite(export_adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    refused(
        export_adapter,
        "--format",
        "hf",
        "-o",
        out,
        where=f"--output: {out} exists",
        contains="--overwrite",
    )
    # --overwrite replaces only an earlier export: a directory with other files is kept
    refused(
        export_adapter,
        "--format",
        "hf",
        "-o",
        out,
        "--overwrite",
        where="--output",
        contains=MARKER,
    )
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    afile = tmp_path / "file"
    afile.write_text("keep")
    refused(
        export_adapter,
        "--format",
        "hf",
        "-o",
        afile,
        "--overwrite",
        where="--output",
        contains="not a directory",
    )
    assert afile.read_text() == "keep"


def test_overwrite_replaces_an_earlier_export_and_a_failed_one_keeps_it(
    export_adapter, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    assert export(export_adapter, "--format", "hf", "--dtype", "f32", "-o", out)[0] == 0
    assert weight_dtypes(out) == {"F32"}
    code, _, err = export(
        export_adapter, "--format", "hf", "--dtype", "bf16", "-o", out, "--overwrite"
    )
    assert code == 0, err
    assert weight_dtypes(out) == {"BF16"}
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    import tuneplex.export.hf as hf

    def failing(*, merged, out):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(hf, "write_hf", failing)
    code, _, err = export(export_adapter, "--format", "hf", "-o", out, "--overwrite")
    assert code == 1 and "disk full" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no half-written sibling


def test_output_parent_must_exist(export_adapter, tmp_path):
    out = tmp_path / "no" / "such" / "out"
    refused(
        export_adapter,
        "--format",
        "hf",
        "-o",
        out,
        where=f"--output: {out.parent}: no such directory",
    )


def test_output_may_not_overlap_what_is_read(export_runs, export_adapter, tmp_path):
    run = export_runs("lora")
    refused(run, "--format", "hf", "-o", run / "export", where="--output", contains="overlaps")
    assert not (run / "export").exists()
    refused(
        export_adapter,
        "--format",
        "hf",
        "-o",
        export_adapter,
        "--overwrite",
        where="--output",
        contains="overlaps",
    )


def test_weights_stored_quantized_are_refused_before_loading(tiny_model, tmp_path):

    model = tmp_path / "q4"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
    }
    (model / "config.json").write_text(json.dumps(config))
    (model / "adapter").mkdir()  # as unsloth's merged_4bit final/ keeps it
    (model / "adapter" / "adapter_config.json").write_text("{}")
    err = refused(model, "--format", "hf", "-o", tmp_path / "o", where=str(model))
    assert "stores its weights quantized (bitsandbytes 4-bit)" in err
    assert f"tuneplex export {model / 'adapter'}" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ the gguf branch's contract
@pytest.fixture
def fake_gguf(monkeypatch):
    """`tuneplex.export.gguf` / `.ollama` replaced by recorders of the contract's calls."""
    import tuneplex.export

    calls: dict = {}

    def write_gguf(*, model, tokenizer, out, dtype, chat_template, eos_ids):
        calls["write"] = dict(
            model=model, out=out, dtype=dtype, template=chat_template, eos=eos_ids
        )
        out.write_bytes(b"GGUF" + bytes(12))
        return {"path": str(out), "bytes": 16, "tensors": 3, "architecture": "llama"}

    def modelfile(*, gguf_path, chat_template, tokenizer, eos_ids):
        calls["modelfile"] = dict(path=gguf_path, eos=eos_ids)
        return f"FROM {gguf_path}\n", "the template was kept as is"

    gguf = types.SimpleNamespace(
        GGUF_DTYPES=("f32", "f16", "bf16", "q8_0", "q4_0"),
        gguf_refusal=lambda config: calls.get("refuse"),
        write_gguf=write_gguf,
    )
    ollama = types.SimpleNamespace(modelfile=modelfile)
    for name, module in (("gguf", gguf), ("ollama", ollama)):
        monkeypatch.setitem(sys.modules, f"tuneplex.export.{name}", module)
        monkeypatch.setattr(tuneplex.export, name, module, raising=False)
    return calls


def test_gguf_is_written_through_the_contract(fake_gguf, export_runs, tmp_path, monkeypatch):
    run = export_runs("lora")
    monkeypatch.chdir(tmp_path)
    code, said, err = export(run, "--format", "gguf", "--dtype", "q8_0", "--ollama")
    assert code == 0, err
    assert said.splitlines() == [
        "wrote lora-q8_0.gguf (16 B, 3 tensors, llama)",
        "wrote lora-q8_0.Modelfile",
        "use: llama-cli -m lora-q8_0.gguf; ollama create lora-q8_0 -f lora-q8_0.Modelfile",
    ]
    assert "note: the template was kept as is" in err
    write = fake_gguf["write"]
    assert write["out"].name.startswith(".lora-q8_0.gguf.tmp-")  # staged, then renamed
    assert write["dtype"] == "q8_0" and write["template"] is not None
    from transformers import AutoTokenizer

    im_end = AutoTokenizer.from_pretrained(run / "final").convert_tokens_to_ids("<|im_end|>")
    assert write["eos"] == [im_end]  # the tiny ChatML tokenizer's eos is its end of turn
    assert write["model"].dtype == torch.float32  # quantized types start from the weights' own
    assert fake_gguf["modelfile"]["path"] == tmp_path / "lora-q8_0.gguf"
    assert (tmp_path / "lora-q8_0.gguf").read_bytes()[:4] == b"GGUF"
    assert (tmp_path / "lora-q8_0.Modelfile").read_text().startswith("FROM ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora-q8_0.Modelfile", "lora-q8_0.gguf"]


def test_gguf_refusals(fake_gguf, export_adapter, tmp_path):
    out = tmp_path / "m.gguf"
    refused(
        export_adapter,
        "--format",
        "gguf",
        "--dtype",
        "q5_k",
        "-o",
        out,
        where="--dtype: 'q5_k': with --format gguf",
    )
    out.write_text("not a gguf")
    refused(export_adapter, "--format", "gguf", "-o", out, where=f"--output: {out} exists")
    refused(
        export_adapter,
        "--format",
        "gguf",
        "-o",
        out,
        "--overwrite",
        where="--output",
        contains="not a GGUF file",
    )
    assert out.read_text() == "not a gguf"
    out.unlink()
    (tmp_path / "m.Modelfile").write_text("FROM mine")
    refused(
        export_adapter,
        "--format",
        "gguf",
        "-o",
        out,
        "--ollama",
        where="--output: ",
        contains="m.Modelfile exists",
    )
    fake_gguf["refuse"] = "llama.cpp has no converter for this family"
    refused(
        export_adapter,
        "--format",
        "gguf",
        "-o",
        out,
        where=str(export_adapter),
        contains="no converter",
    )
    assert "write" not in fake_gguf and not out.exists()


def test_gguf_16_bit_types_are_merged_in_that_type(fake_gguf, export_adapter, tmp_path):
    assert (
        export(export_adapter, "--format", "gguf", "--dtype", "f16", "-o", tmp_path / "a.gguf")[0]
        == 0
    )
    assert fake_gguf["write"]["model"].dtype == torch.float16
