"""`tuneplex export --format hf` (and the command's own rules) on real tiny models and runs
trained here: transformers and peft, loading base + adapter, are the reference for every logit;
the training pipeline's template and stop tokens are the reference for the tokenizer and eos."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from helpers import chat_rows, merge_yaml, write_rows  # noqa: E402
from tuneplex.cli import main  # noqa: E402
from tuneplex.export.output import MARKER  # noqa: E402

PROMPT = [{"role": "user", "content": "Reverse: river blue a"}]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    train, val = root / "train.jsonl", root / "val.jsonl"
    write_rows(train, chat_rows(24))
    write_rows(val, chat_rows(6, seed=1))
    return train, val


def _job(root: Path, model: str, data, ft: str) -> Path:
    text = f"""\
model: {model}
dataset:
  training: {data[0]}
  validation: {data[1]}
training:
  finetuning_type: {ft}
  max_seq_length: 128
  precision: fp32
schedule:
  epochs: 3
  seed: 7
  val_check_interval: 1.0
batch:
  global_batch_size: 8
  micro_batch_size: 4
optimizer:
  learning_rate: 1.0e-2
  warmup_steps: 1
output:
  checkpoint_steps: 3
"""
    path = root / f"{ft}.yaml"
    path.write_text(merge_yaml(text, ""))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, data):
    """{kind: run directory} for lora / full (all_weights), trained in fp32 once, lazily."""
    root = tmp_path_factory.mktemp("runs")
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            run = root / kind
            ft = {"lora": "lora", "full": "all_weights"}[kind]
            said = io.StringIO()
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                code = main(["train", str(_job(root, tiny_model, data, ft)), "-o", str(run)])
            assert code == 0, said.getvalue()
            made[kind] = run
        return made[kind]

    return get


def _lora_adapter(base: str, out: Path, **config) -> Path:
    """A peft LoRA adapter on `base` whose B is random (not the zeros peft starts from), so
    the merge has something to add."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        **config,
    )
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    return _lora_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "lora")


def export(*args) -> tuple[int, str, str]:
    """`tuneplex export ARGS` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["export", *[str(a) for a in args]])
    return code, out.getvalue(), err.getvalue()


def _exported(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _base_plus_adapter(base: str, adapter: str | Path):
    """The reference: base in float32 with the adapter loaded by peft, not merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def _ids(tokenizer_dir) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tok(text + " river blue a model learns the data", add_special_tokens=False)
    return torch.tensor([ids["input_ids"]])


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(ids).logits.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _dtypes(path: Path) -> set[str]:
    """The safetensors dtypes of a directory's weight files, read from their headers."""
    found = set()
    for f in path.glob("*.safetensors"):
        with f.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return found


# ------------------------------------------------------------------ merged logits
def test_lora_run_exports_base_plus_adapter_in_f32(runs, tiny_model, tmp_path):
    run = runs("lora")
    out = tmp_path / "lora-hf"
    code, said, err = export(run, "--format", "hf", "--dtype", "f32", "-o", out)
    assert code == 0, err
    assert said.splitlines()[0].startswith(f"wrote {out}/ (f32, ")
    assert "AutoModelForCausalLM.from_pretrained" in said
    assert err.startswith(f"exporting {run} (adapter merged into {tiny_model}) as hf f32")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", MARKER} <= names
    assert "tokenizer.json" in names and "adapter_config.json" not in names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing staged left
    ids = _ids(out)
    want = _logits(_base_plus_adapter(tiny_model, run / "final"), ids)
    got = _logits(_exported(out), ids)
    assert _rel(got, want) < 1e-5
    assert _rel(want, _logits(_exported(tiny_model), ids)) > 1e-2  # the adapter changed it
    marker = json.loads((out / MARKER).read_text())
    assert marker["format"] == "hf" and marker["adapter_merged"] is True
    assert marker["source"] == str(run) and marker["base"] == tiny_model


def test_exported_model_generates_what_tuneplex_generate_does(runs, tmp_path, capsys):
    """transformers' generate on the export, with nothing but its own files (no eos passed),
    gives the tokens `tuneplex generate` gives on the run and stops at the same place."""
    from transformers import AutoTokenizer

    run = runs("lora")
    out = tmp_path / "gen-hf"
    assert export(run, "--format", "hf", "-o", out)[0] == 0
    prompts = ["Reverse: river blue a", "Reverse: code fast python"]
    assert main(["generate", str(run), *prompts, "--json", "--max-new-tokens", "24"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tok = AutoTokenizer.from_pretrained(out)
    model = _exported(out)
    stopped = 0
    for prompt, row in zip(prompts, rows, strict=True):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False
        )
        done = model.generate(
            torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id
        )[0, len(ids) :].tolist()
        eos = model.generation_config.eos_token_id
        ended = done[-1] in (eos if isinstance(eos, list) else [eos])
        stopped += ended
        answer = done[:-1] if ended else done
        assert tok.decode(answer, skip_special_tokens=False) == row["completion"]
        assert len(answer) == row["completion_tokens"]
    assert stopped >= 1  # the trained model ends its turns, and generation_config says where


@pytest.mark.parametrize("flag,dtype", [("bf16", torch.bfloat16), ("f16", torch.float16)])
def test_16_bit_export_rounds_the_float32_merge_once(adapter, tiny_model, tmp_path, flag, dtype):
    """Each exported tensor is exactly the float32 merge (peft's merge_and_unload on a float32
    model) cast once; logits, with the weights upcast, stay within 16-bit weight rounding."""
    out = tmp_path / f"{flag}-hf"
    code, said, err = export(adapter, "--format", "hf", "--dtype", flag, "-o", out)
    assert code == 0, err
    assert said.startswith(f"wrote {out}/ ({flag}, ")
    assert _dtypes(out) == {"BF16" if flag == "bf16" else "F16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype)[6:]
    reference = _base_plus_adapter(tiny_model, adapter).merge_and_unload()
    exported = _exported(out, dtype=dtype)
    want = {k: v.to(dtype) for k, v in reference.state_dict().items()}
    got = exported.state_dict()
    assert want.keys() == got.keys()
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name]), name
    # what rounding twice looks like: the base loaded in 16 bits, then merged
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    early = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
    twice = PeftModel.from_pretrained(early, str(adapter)).merge_and_unload().state_dict()
    assert any(not torch.equal(got[k], twice[k]) for k in got)
    ids = _ids(out)
    ref = _logits(_base_plus_adapter(tiny_model, adapter), ids)
    # weights rounded to 8 (bf16) or 11 (f16) significant bits, computed in float32
    assert _rel(_logits(exported.float(), ids), ref) < (2e-2 if flag == "bf16" else 3e-3)


def test_an_adapter_on_a_bf16_base_is_merged_in_float32(tiny_model, tmp_path):
    """On a bf16 base the default output is bf16, each merged weight bf16(W + BA) computed
    in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(base)
    lora = _lora_adapter(str(base), tmp_path / "lora")
    out = tmp_path / "out"
    code, said, err = export(lora, "--format", "hf", "-o", out)
    assert code == 0, err
    assert said.startswith(f"wrote {out}/ (bf16, ") and _dtypes(out) == {"BF16"}
    once = _base_plus_adapter(str(base), lora).merge_and_unload().to(torch.bfloat16).state_dict()
    got = _exported(out, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(got[k], once[k]) for k in once)


def test_dora_adapter_merges_too(tiny_model, tmp_path):
    dora = _lora_adapter(tiny_model, tmp_path / "dora", use_dora=True)
    out = tmp_path / "dora-hf"
    assert export(dora, "--format", "hf", "--dtype", "f32", "-o", out)[0] == 0
    ids = _ids(out)
    want = _logits(_base_plus_adapter(tiny_model, dora), ids)
    assert _rel(_logits(_exported(out), ids), want) < 1e-5


def test_default_dtype_is_the_one_the_weights_are_stored_in(tiny_model, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16 = tmp_path / "bf16-model"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(bf16)
    monkeypatch.chdir(tmp_path)
    code, said, err = export(bf16, "--format", "hf")
    assert code == 0, err
    out = tmp_path / "bf16-model-hf"  # the default name, in the current directory
    assert said.startswith("wrote bf16-model-hf/ (bf16, ")
    assert _dtypes(out) == {"BF16"}
    source = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16).state_dict()
    for name, tensor in _exported(out, dtype=torch.bfloat16).state_dict().items():
        assert torch.equal(tensor, source[name]), name  # a whole model re-saved is unchanged
    code, said, _ = export(tiny_model, "--format", "hf", "-o", tmp_path / "f32")
    assert code == 0 and said.startswith(f"wrote {tmp_path / 'f32'}/ (f32, ")


# ------------------------------------------------------------------ tokenizer and eos
def _model_with(tmp_path: Path, style: dict | str) -> Path:
    from tuneplex.testing.tiny import build_llama, build_tokenizer

    where = tmp_path / "model"
    tok = build_tokenizer(where, style=style)
    build_llama(where, tokenizer=tok, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    return where


def test_generation_config_eos_holds_the_end_of_turn_token(tmp_path):
    """A ChatML template on a tokenizer whose eos is `</s>`: the end of turn the template
    trains (`<|im_end|>`) joins eos in generation_config.json, first."""
    from transformers import AutoTokenizer, GenerationConfig
    from tuneplex.testing.tiny import CHATML

    style = {"template": CHATML, "bos": "<s>", "eos": "</s>", "add_bos": False}
    model = _model_with(tmp_path, style)
    out = tmp_path / "out"
    assert export(model, "--format", "hf", "-o", out)[0] == 0
    tok = AutoTokenizer.from_pretrained(out)
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert eos == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("</s>")]
    assert tok.eos_token == "</s>"  # the tokenizer itself is as trained: eos still ends text
    written = json.loads((out / "generation_config.json").read_text())
    assert not written.get("_from_model_config")  # else transformers may derive it again
    assert json.loads((out / MARKER).read_text())["eos_ids"] == eos


def test_llama3_style_end_of_turn_is_its_eos(tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    model = _model_with(tmp_path, "llama3")
    out = tmp_path / "out"
    assert export(model, "--format", "hf", "-o", out)[0] == 0
    eot = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|eot_id|>")
    assert GenerationConfig.from_pretrained(out).eos_token_id == eot


def test_tokenizer_round_trips_with_its_chat_template(runs, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "tok-hf"
    assert export(runs("lora"), "--format", "hf", "-o", out)[0] == 0
    a, b = AutoTokenizer.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(out)
    texts = [
        "Reverse: river blue a",
        "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n",
        "unicode é ✓ and <pad></s> specials",
    ]
    for text in texts:
        assert a(text)["input_ids"] == b(text)["input_ids"]
        assert b.decode(b(text)["input_ids"]) == a.decode(a(text)["input_ids"])
    assert b.chat_template == a.chat_template
    chat = [*PROMPT, {"role": "assistant", "content": "a blue river"}]
    assert b.apply_chat_template(chat, tokenize=False) == a.apply_chat_template(
        chat, tokenize=False
    )
    assert (b.eos_token, b.pad_token) == (a.eos_token, a.pad_token)


def test_a_template_training_chose_goes_with_the_tokenizer(tiny_model, tmp_path):
    """A run whose job named its own template (dataset.prompt_template): that template, not
    the tokenizer's, is what the export's tokenizer renders with, and its end of turn is eos."""
    from tuneplex.export.merge import merge, source_of
    from tuneplex.inference.target import resolve

    custom = (
        "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>"
        "{{ m.content }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}"
    )
    target = resolve(tiny_model, device="cpu", scratch=tmp_path)
    target = replace(target, spec=replace(target.spec, chat_template=custom))
    merged = merge(target=target, source=source_of(target), dtype="float32")
    assert merged.chat_template == custom and merged.tokenizer.chat_template == custom
    eot = merged.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert merged.eos_ids == [eot, merged.tokenizer.eos_token_id]
    assert (merged.model_type, merged.architecture) == ("llama", "LlamaForCausalLM")
    assert not merged.adapter and merged.source_dtype == "float32"


# ------------------------------------------------------------------ full weights, checkpoints
def test_full_weight_run_is_resaved_unchanged(runs, tmp_path):
    from safetensors.torch import load_file

    run = runs("full")
    out = tmp_path / "full-hf"
    code, _, err = export(run, "--format", "hf", "-o", out)
    assert code == 0, err
    assert "(whole model)" in err
    final = load_file(run / "final" / "model.safetensors")
    got = load_file(out / "model.safetensors")
    assert final.keys() == got.keys()
    assert all(torch.equal(got[k], final[k]) for k in final)
    ids = _ids(out)
    assert torch.equal(_logits(_exported(out), ids), _logits(_exported(run / "final"), ids))


def test_checkpoint_export_is_that_steps_adapter(runs, tiny_model, tmp_path, monkeypatch):
    from tuneplex.inference.target import resolve

    run = runs("lora")
    monkeypatch.chdir(tmp_path)
    code, said, err = export(run, "--format", "hf", "--checkpoint", "step_3", "--dtype", "f32")
    assert code == 0, err
    out = tmp_path / "lora-step_3-hf"
    assert said.startswith("wrote lora-step_3-hf/")
    target = resolve(str(run), checkpoint="step_3", device="cpu", scratch=tmp_path / "s")
    ids = _ids(out)
    want = _logits(_base_plus_adapter(tiny_model, target.path), ids)
    assert _rel(_logits(_exported(out), ids), want) < 1e-5
    final = _logits(_base_plus_adapter(tiny_model, run / "final"), ids)
    assert _rel(final, want) > 1e-3  # step 3 is not the final adapter


# ------------------------------------------------------------------ refusals
def _refused(*args, where: str, contains: str = "") -> str:
    code, said, err = export(*args)
    assert code == 2, err
    assert said == "" and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(where), err
    assert contains in err, err
    return err


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
def test_bad_flags_are_refused_in_one_line(adapter, args, where, contains, tmp_path):
    _refused(adapter, *args, where=where, contains=contains)
    assert list(tmp_path.iterdir()) == []


def test_missing_format_is_one_line(adapter):
    _refused(adapter, where="tuneplex export: Missing option '--format'")


def test_a_missing_target_is_refused(tmp_path):
    _refused(tmp_path / "nope", "--format", "hf", where=str(tmp_path / "nope"), contains="no such")


def test_a_damaged_run_is_refused(runs, tmp_path):
    import shutil

    run = tmp_path / "damaged"
    shutil.copytree(runs("lora"), run)
    for f in (run / "final").glob("*.safetensors"):
        f.unlink()
    _refused(
        run, "--format", "hf", "-o", tmp_path / "o", where=str(run / "final"), contains="damaged"
    )
    assert not (tmp_path / "o").exists()


def test_an_existing_output_is_never_replaced_without_overwrite(adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    _refused(
        adapter,
        "--format",
        "hf",
        "-o",
        out,
        where=f"--output: {out} exists",
        contains="--overwrite",
    )
    # --overwrite replaces only an earlier export: a directory with other files is kept
    _refused(adapter, "--format", "hf", "-o", out, "--overwrite", where="--output", contains=MARKER)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    afile = tmp_path / "file"
    afile.write_text("keep")
    _refused(
        adapter,
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
    adapter, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    assert export(adapter, "--format", "hf", "--dtype", "f32", "-o", out)[0] == 0
    assert _dtypes(out) == {"F32"}
    code, _, err = export(adapter, "--format", "hf", "--dtype", "bf16", "-o", out, "--overwrite")
    assert code == 0, err
    assert _dtypes(out) == {"BF16"}
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    import tuneplex.export.hf as hf

    def failing(*, merged, out):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(hf, "write_hf", failing)
    code, _, err = export(adapter, "--format", "hf", "-o", out, "--overwrite")
    assert code == 1 and "disk full" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no half-written sibling


def test_output_parent_must_exist(adapter, tmp_path):
    out = tmp_path / "no" / "such" / "out"
    _refused(
        adapter, "--format", "hf", "-o", out, where=f"--output: {out.parent}: no such directory"
    )


def test_output_may_not_overlap_what_is_read(runs, adapter, tmp_path):
    run = runs("lora")
    _refused(run, "--format", "hf", "-o", run / "export", where="--output", contains="overlaps")
    assert not (run / "export").exists()
    _refused(
        adapter,
        "--format",
        "hf",
        "-o",
        adapter,
        "--overwrite",
        where="--output",
        contains="overlaps",
    )


def test_weights_stored_quantized_are_refused_before_loading(tiny_model, tmp_path):
    import shutil

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
    err = _refused(model, "--format", "hf", "-o", tmp_path / "o", where=str(model))
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


def test_gguf_is_written_through_the_contract(fake_gguf, runs, tmp_path, monkeypatch):
    run = runs("lora")
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


def test_gguf_refusals(fake_gguf, adapter, tmp_path):
    out = tmp_path / "m.gguf"
    _refused(
        adapter,
        "--format",
        "gguf",
        "--dtype",
        "q5_k",
        "-o",
        out,
        where="--dtype: 'q5_k': with --format gguf",
    )
    out.write_text("not a gguf")
    _refused(adapter, "--format", "gguf", "-o", out, where=f"--output: {out} exists")
    _refused(
        adapter,
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
    _refused(
        adapter,
        "--format",
        "gguf",
        "-o",
        out,
        "--ollama",
        where="--output: ",
        contains="m.Modelfile exists",
    )
    fake_gguf["refuse"] = "llama.cpp has no converter for this family"
    _refused(adapter, "--format", "gguf", "-o", out, where=str(adapter), contains="no converter")
    assert "write" not in fake_gguf and not out.exists()


def test_gguf_16_bit_types_are_merged_in_that_type(fake_gguf, adapter, tmp_path):
    assert export(adapter, "--format", "gguf", "--dtype", "f16", "-o", tmp_path / "a.gguf")[0] == 0
    assert fake_gguf["write"]["model"].dtype == torch.float16
