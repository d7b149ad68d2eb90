"""`tuneplex export --format hf` on real tiny models and runs trained here: transformers and
peft, loading base + adapter, are the reference for every logit; the training pipeline's
template and stop tokens are the reference for the tokenizer and eos. (The command's refusals,
outputs and GGUF branch: test_export_cli.py.)"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

pytest_plugins = ("export_helpers",)  # its fixtures: export_runs, export_adapter

from export_helpers import (  # noqa: E402
    PROMPT,
    base_plus_adapter,
    export,
    exported,
    logits,
    lora_adapter,
    prompt_ids,
    rel,
    weight_dtypes,
)
from helpers import build_family  # noqa: E402
from tuneplex.cli import main  # noqa: E402
from tuneplex.export.output import MARKER  # noqa: E402


# ------------------------------------------------------------------ merged logits
def test_lora_run_exports_base_plus_adapter_in_f32(export_runs, tiny_model, tmp_path):
    run = export_runs("lora")
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
    ids = prompt_ids(out)
    want = logits(base_plus_adapter(tiny_model, run / "final"), ids)
    got = logits(exported(out), ids)
    assert rel(got, want) < 1e-5
    assert rel(want, logits(exported(tiny_model), ids)) > 1e-2  # the adapter changed it
    marker = json.loads((out / MARKER).read_text())
    assert marker["format"] == "hf" and marker["adapter_merged"] is True
    assert marker["source"] == str(run) and marker["base"] == tiny_model


def test_exported_model_generates_what_tuneplex_generate_does(export_runs, tmp_path, capsys):
    """transformers' generate on the export, with nothing but its own files (no eos passed),
    gives the tokens `tuneplex generate` gives on the run and stops at the same place."""
    from transformers import AutoTokenizer

    run = export_runs("lora")
    out = tmp_path / "gen-hf"
    assert export(run, "--format", "hf", "-o", out)[0] == 0
    prompts = ["Reverse: river blue a", "Reverse: code fast python"]
    assert main(["generate", str(run), *prompts, "--json", "--max-new-tokens", "24"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tok = AutoTokenizer.from_pretrained(out)
    model = exported(out)
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
def test_16_bit_export_rounds_the_float32_merge_once(
    export_adapter, tiny_model, tmp_path, flag, dtype
):
    """Each exported tensor is exactly the float32 merge (peft's merge_and_unload on a float32
    model) cast once; logits, with the weights upcast, stay within 16-bit weight rounding."""
    out = tmp_path / f"{flag}-hf"
    code, said, err = export(export_adapter, "--format", "hf", "--dtype", flag, "-o", out)
    assert code == 0, err
    assert said.startswith(f"wrote {out}/ ({flag}, ")
    assert weight_dtypes(out) == {"BF16" if flag == "bf16" else "F16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype)[6:]
    reference = base_plus_adapter(tiny_model, export_adapter).merge_and_unload()
    written = exported(out, dtype=dtype)
    want = {k: v.to(dtype) for k, v in reference.state_dict().items()}
    got = written.state_dict()
    assert want.keys() == got.keys()
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name]), name
    # what rounding twice looks like: the base loaded in 16 bits, then merged
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    early = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
    twice = PeftModel.from_pretrained(early, str(export_adapter)).merge_and_unload().state_dict()
    assert any(not torch.equal(got[k], twice[k]) for k in got)
    ids = prompt_ids(out)
    ref = logits(base_plus_adapter(tiny_model, export_adapter), ids)
    # weights rounded to 8 (bf16) or 11 (f16) significant bits, computed in float32
    assert rel(logits(written.float(), ids), ref) < (2e-2 if flag == "bf16" else 3e-3)


def test_an_adapter_on_a_bf16_base_is_merged_in_float32(tiny_model, tmp_path):
    """On a bf16 base the default output is bf16, each merged weight bf16(W + BA) computed
    in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(base)
    lora = lora_adapter(str(base), tmp_path / "lora")
    out = tmp_path / "out"
    code, said, err = export(lora, "--format", "hf", "-o", out)
    assert code == 0, err
    assert said.startswith(f"wrote {out}/ (bf16, ") and weight_dtypes(out) == {"BF16"}
    once = base_plus_adapter(str(base), lora).merge_and_unload().to(torch.bfloat16).state_dict()
    got = exported(out, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(got[k], once[k]) for k in once)


def test_dora_adapter_merges_too(tiny_model, tmp_path):
    dora = lora_adapter(tiny_model, tmp_path / "dora", use_dora=True)
    out = tmp_path / "dora-hf"
    assert export(dora, "--format", "hf", "--dtype", "f32", "-o", out)[0] == 0
    ids = prompt_ids(out)
    want = logits(base_plus_adapter(tiny_model, dora), ids)
    assert rel(logits(exported(out), ids), want) < 1e-5


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
    assert weight_dtypes(out) == {"BF16"}
    source = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16).state_dict()
    for name, tensor in exported(out, dtype=torch.bfloat16).state_dict().items():
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
    assert eos == [
        tok.convert_tokens_to_ids("<|im_end|>"),
        tok.convert_tokens_to_ids("</s>"),
    ]
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


def test_tokenizer_round_trips_with_its_chat_template(export_runs, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "tok-hf"
    assert export(export_runs("lora"), "--format", "hf", "-o", out)[0] == 0
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
def test_full_weight_run_is_resaved_unchanged(export_runs, tmp_path):
    from safetensors.torch import load_file

    run = export_runs("full")
    out = tmp_path / "full-hf"
    code, _, err = export(run, "--format", "hf", "-o", out)
    assert code == 0, err
    assert "(whole model)" in err
    final = load_file(run / "final" / "model.safetensors")
    got = load_file(out / "model.safetensors")
    assert final.keys() == got.keys()
    assert all(torch.equal(got[k], final[k]) for k in final)
    ids = prompt_ids(out)
    assert torch.equal(logits(exported(out), ids), logits(exported(run / "final"), ids))


def test_checkpoint_export_is_that_steps_adapter(export_runs, tiny_model, tmp_path, monkeypatch):
    from tuneplex.inference.target import resolve

    run = export_runs("lora")
    monkeypatch.chdir(tmp_path)
    code, said, err = export(run, "--format", "hf", "--checkpoint", "step_3", "--dtype", "f32")
    assert code == 0, err
    out = tmp_path / "lora-step_3-hf"
    assert said.startswith("wrote lora-step_3-hf/")
    target = resolve(str(run), checkpoint="step_3", device="cpu", scratch=tmp_path / "s")
    ids = prompt_ids(out)
    want = logits(base_plus_adapter(tiny_model, target.path), ids)
    assert rel(logits(exported(out), ids), want) < 1e-5
    final = logits(base_plus_adapter(tiny_model, run / "final"), ids)
    assert rel(final, want) > 1e-3  # step 3 is not the final adapter


# ------------------------------------------------------------------ every family tuneplex trains
FAMILIES = {
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",  # tied embeddings, soft-capped logits
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",  # fused qkv / gate_up projections
    "granite": "GraniteForCausalLM",  # multipliers
}


@pytest.mark.parametrize("cls", FAMILIES.values(), ids=FAMILIES.keys())
def test_every_family_exportsbase_plus_adapter(tokenizers, cls, tmp_path):
    tok = tokenizers["chatml"][1]
    base = tmp_path / "base"
    build_family(cls, tok).save_pretrained(base)
    tok.save_pretrained(base)
    lora = tmp_path / "lora"
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(lora)
    out = tmp_path / "out"
    code, _, err = export(lora, "--format", "hf", "--dtype", "f32", "-o", out)
    assert code == 0, err
    written = exported(out)
    assert type(written).__name__ == cls
    ids = prompt_ids(out)
    want = logits(base_plus_adapter(str(base), lora), ids)
    assert rel(logits(written, ids), want) < 1e-5
    assert rel(want, logits(exported(base), ids)) > 1e-3
