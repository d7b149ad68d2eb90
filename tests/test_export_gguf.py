"""GGUF export read back with the gguf library's own reader: every tensor and metadata key of
each supported family's tiny model, the tokenizer as the HF tokenizer has it, quantized types,
and refusals. llama.cpp itself is the judge in test_export_llamacpp.py; the Ollama Modelfile is
tested in test_export_ollama.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from gguf_helpers import (  # noqa: E402
    bpe_tokenizer,
    field,
    read_back,
    spm_tokenizer,
    uninterleave_rope,
)
from helpers import build_family, family_config  # noqa: E402
from tuneplex.errors import UsageError  # noqa: E402
from tuneplex.export.gguf import GGUF_DTYPES, gguf_refusal, write_gguf  # noqa: E402
from tuneplex.export.gguf_families import FAMILIES  # noqa: E402

FAMILY_CLASSES = [
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
    "GraniteForCausalLM",
]
T = gguf.GGMLQuantizationType


def family_model(cls: str, tok):
    """The tests' tiny model of `cls`, in a shape llama.cpp runs: Gemma 3 without attention
    soft-capping (llama.cpp's gemma3 has none, as Gemma 3 itself), Mistral without a sliding
    window (llama.cpp's llama architecture has none; said in the export's report)."""
    extra = {}
    if cls == "Gemma3ForCausalLM":
        extra["attn_logit_softcapping"] = None
    if cls == "MistralForCausalLM":
        extra["sliding_window"] = None
    return build_family(cls, tok, **extra).eval()


@pytest.fixture(scope="module")
def chatml(tokenizers):
    return tokenizers["chatml"][1]


def _export(model, tok, path: Path, dtype: str = "f32", eos_ids=None) -> dict:
    eos = eos_ids if eos_ids is not None else [tok.eos_token_id]
    return write_gguf(
        model=model,
        tokenizer=tok,
        out=path,
        dtype=dtype,
        chat_template=tok.chat_template,
        eos_ids=eos,
    )


# -- tensors and metadata ------------------------------------------------------------------
@pytest.mark.parametrize("cls", FAMILY_CLASSES)
def test_every_tensor_and_key_round_trips(cls, chatml, tmp_path):
    model = family_model(cls, chatml)
    config, family = model.config, FAMILIES[model.config.model_type]
    report = _export(model, chatml, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    state = model.state_dict()
    tied = state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    assert report["tensors"] == len(reader.tensors) == len(state) - tied
    assert report["architecture"] == field(reader, "general.architecture")
    assert not list(tmp_path.glob(".*partial"))  # the partial file was renamed

    back, types = read_back(tmp_path / "m.gguf", model)
    for key, want in state.items():
        got = back[key]
        if family.norm_offset and key.endswith("norm.weight"):
            # stored as exactly float32(w + 1): compare what was meant, not (w + 1) - 1
            raw = _raw(tmp_path / "m.gguf", model, key)
            assert torch.equal(raw, want.float() + family.norm_offset), key
        else:
            assert torch.equal(got, want.float()), key
        assert types[key] == "F32", key

    arch = report["architecture"]
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    expected = {
        f"{arch}.block_count": config.num_hidden_layers,
        f"{arch}.context_length": config.max_position_embeddings,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv,
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.rope.dimension_count": head_dim,
        f"{arch}.vocab_size": len(chatml),
        "general.file_type": 0,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.eos_token_id": chatml.eos_token_id,
        "tokenizer.ggml.eot_token_id": chatml.eos_token_id,
        "tokenizer.ggml.padding_token_id": chatml.pad_token_id,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": chatml.chat_template,
    }
    eps = field(reader, f"{arch}.attention.layer_norm_rms_epsilon")
    assert eps == pytest.approx(config.rms_norm_eps)
    theta = config.rope_parameters.get("full_attention", config.rope_parameters)["rope_theta"]
    assert field(reader, f"{arch}.rope.freq_base") == pytest.approx(theta)
    expected.update(_family_keys(arch, config))
    for key, value in expected.items():
        got = field(reader, key)
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, key


def _raw(path: Path, model, key: str):
    """A tensor exactly as stored (no transform undone)."""
    from tuneplex.export.gguf_families import FAMILIES

    family = FAMILIES[model.config.model_type]
    names = gguf.get_tensor_name_map(
        getattr(gguf.MODEL_ARCH, family.arch), model.config.num_hidden_layers
    )
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return torch.from_numpy(tensor.data.copy()).float()


def _family_keys(arch: str, config) -> dict:
    """What each family adds, as llama.cpp's loaders read it."""
    if arch == "gemma2":
        return {
            "gemma2.attn_logit_softcapping": config.attn_logit_softcapping,
            "gemma2.final_logit_softcapping": config.final_logit_softcapping,
            "gemma2.attention.sliding_window": config.sliding_window,
            "gemma2.attention.sliding_window_pattern": [True, False],
        }
    if arch == "gemma3":
        return {
            "gemma3.final_logit_softcapping": config.final_logit_softcapping,
            "gemma3.attention.sliding_window": config.sliding_window,
            "gemma3.attention.sliding_window_pattern": [True, False],
            "gemma3.rope.freq_base_swa": 10000.0,
        }
    if arch == "granite":
        return {
            "granite.attention.scale": config.attention_multiplier,
            "granite.embedding_scale": config.embedding_multiplier,
            "granite.residual_scale": config.residual_multiplier,
            "granite.logit_scale": config.logits_scaling,
        }
    if arch == "phi3":
        return {"phi3.rope.scaling.original_context_length": 4096}
    return {}


def test_llama_and_granite_rows_are_in_llamas_rope_order(chatml, tmp_path):
    """q/k rows interleaved per head: row 2i holds transformers' row i, row 2i+1 row i + d/2."""
    model = family_model("LlamaForCausalLM", chatml)
    _export(model, chatml, tmp_path / "m.gguf")
    q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    stored = _raw(tmp_path / "m.gguf", model, "model.layers.0.self_attn.q_proj.weight")
    d = q.shape[0] // model.config.num_attention_heads
    assert torch.equal(stored[0], q[0]) and torch.equal(stored[1], q[d // 2])
    assert torch.equal(stored[d + 2], q[d + 1]) and torch.equal(stored[d + 3], q[d + 1 + d // 2])
    assert torch.equal(uninterleave_rope(stored, model.config.num_attention_heads), q)


def test_llama3_rope_scaling_is_a_factors_tensor(chatml, tmp_path):
    params = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = build_family("LlamaForCausalLM", chatml, rope_parameters=params).eval()
    _export(model, chatml, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    inv = model.model.rotary_emb.inv_freq  # transformers' own llama3 frequencies
    base = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert torch.allclose(base / torch.from_numpy(factors.copy()), inv, rtol=1e-6)
    assert factors.min() == 1.0 and factors.max() == 8.0


# -- types -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0", "q4_0"])
def test_types_follow_llama_cpps_rule(dtype, chatml, tmp_path):
    """Matrices in the asked type; norms and 1-D tensors f32; in q4_0 the output head q8_0.
    Each stored tensor is the gguf library's quantization of the intended one, within its
    type's rounding of the original."""
    model = family_model("Qwen2ForCausalLM", chatml)  # biases: 1-D tensors beside matrices
    report = _export(model, chatml, tmp_path / "m.gguf", dtype=dtype)
    back, types = read_back(tmp_path / "m.gguf", model)
    want = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[dtype]
    for key, tensor in model.state_dict().items():
        if tensor.dim() == 1:
            assert types[key] == "F32" and torch.equal(back[key], tensor), key
            continue
        expected = "Q8_0" if dtype == "q4_0" and key == "lm_head.weight" else want
        assert types[key] == expected, key
        qtype = T[expected]
        again = gguf.quants.dequantize(gguf.quants.quantize(tensor.numpy(), qtype), qtype)
        assert torch.equal(back[key], torch.from_numpy(again).reshape(tensor.shape)), key
        blocks = tensor.reshape(-1, 32)
        amax = blocks.abs().amax(-1, keepdim=True)
        # within one step of the block's grid (the half step, plus the f16 scale's rounding)
        bound = {"F16": amax / 1024, "BF16": amax / 128, "Q8_0": amax / 127, "Q4_0": amax / 8}
        err = (back[key].reshape(-1, 32) - blocks).abs()
        assert (err <= bound[expected] + 1e-7).all(), key
    kept = report["kept"]
    assert kept["blk.*.attn_norm.weight"] == "f32" and kept["blk.*.attn_q.bias"] == "f32"
    assert ("output.weight" in kept) == (dtype == "q4_0")
    assert (
        field(gguf.GGUFReader(tmp_path / "m.gguf"), "general.file_type")
        == {
            "f16": 1,
            "bf16": 32,
            "q8_0": 7,
            "q4_0": 2,
        }[dtype]
    )


def test_a_bf16_model_writes_the_same_file_contents_as_its_float32_copy(chatml, tmp_path):
    model = family_model("GraniteForCausalLM", chatml)
    model16 = family_model("GraniteForCausalLM", chatml).to(torch.bfloat16)
    _export(model16, chatml, tmp_path / "a.gguf", dtype="bf16")
    _export(model16.float(), chatml, tmp_path / "b.gguf", dtype="bf16")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    assert model is not model16


# -- the tokenizer ---------------------------------------------------------------------------
def _tokenizers(kind: str, tmp_path: Path, tokenizers):
    from tuneplex.testing.tiny import STYLES

    if kind in ("chatml", "llama3", "mistral"):
        return tokenizers[kind][1]
    if kind.startswith("bpe-"):
        return bpe_tokenizer(tmp_path / kind, pre=kind[4:])
    return spm_tokenizer(tmp_path / kind, template=STYLES["mistral"]["template"], prefix=kind[4:])


TOKENIZER_KINDS = {
    # kind: (tokenizer.ggml.model, pre, add_space_prefix)
    "chatml": ("gpt2", "gpt-2", None),
    "llama3": ("gpt2", "gpt-2", None),
    "mistral": ("gpt2", "gpt-2", None),
    "bpe-llama3": ("gpt2", "llama-bpe", None),
    "bpe-qwen2": ("gpt2", "qwen2", None),
    "bpe-digits": ("gpt2", "refact", None),
    "spm-legacy": ("llama", None, True),
    "spm-none": ("llama", None, False),
    "spm-always": ("llama", None, True),
    "spm-first": ("llama", None, False),
}


@pytest.mark.parametrize("kind", list(TOKENIZER_KINDS))
def test_the_file_holds_the_tokenizers_vocabulary(kind, tokenizers, tmp_path):
    """Tokens, merges (or merge-rank scores), token types, special ids and BOS handling are
    the HF tokenizer's own."""
    tok = _tokenizers(kind, tmp_path, tokenizers)
    model = build_family("LlamaForCausalLM", tok).eval()
    report = _export(model, tok, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = {i: t for t, i in spec["model"]["vocab"].items()}
    vocab.update({a["id"]: a["content"] for a in spec["added_tokens"]})
    model_kind, pre, prefix = TOKENIZER_KINDS[kind]
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens == [vocab[i] for i in range(len(tokens))] and len(tokens) == len(tok)
    types = field(reader, "tokenizer.ggml.token_type")
    for i, a in tok.added_tokens_decoder.items():
        want = gguf.TokenType.UNKNOWN if i == tok.unk_token_id else gguf.TokenType.CONTROL
        assert types[i] == want, a.content
    assert field(reader, "tokenizer.ggml.model") == model_kind
    merges = [" ".join(m) for m in spec["model"]["merges"]]
    if model_kind == "gpt2":
        assert field(reader, "tokenizer.ggml.pre") == pre
        assert field(reader, "tokenizer.ggml.merges") == merges
    else:
        assert "tokenizer.ggml.pre" not in reader.fields
        assert field(reader, "tokenizer.ggml.add_space_prefix") == prefix
        scores = field(reader, "tokenizer.ggml.scores")
        for rank, merge in enumerate(merges[:50]):  # a merge's token scores its first rank
            made = merge.replace(" ", "")
            if merges.index(next(m for m in merges if m.replace(" ", "") == made)) == rank:
                assert scores[tok.convert_tokens_to_ids(made)] == -rank, merge
        assert types[tok.convert_tokens_to_ids("<0x0A>")] == gguf.TokenType.BYTE
        differs = kind in ("spm-first", "spm-always")  # said in one line each (see llama.cpp test)
        assert len(report["notes"]) == differs
    probe = tok("a")["input_ids"]
    assert field(reader, "tokenizer.ggml.add_bos_token") == (probe[0] == tok.bos_token_id)
    if tok.bos_token_id is not None:
        assert field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id


def test_what_llama_cpp_runs_differently_is_said_in_the_report(chatml, tmp_path):
    model = build_family("MistralForCausalLM", chatml).eval()  # a 4-token sliding window
    report = _export(model, chatml, tmp_path / "m.gguf")
    assert report["notes"] == [
        "llama.cpp's llama architecture has no sliding window: it matches transformers for "
        "contexts up to 4 tokens (the model's sliding window)"
    ]


def test_end_of_turn_ids_as_llama_cpp_reads_them(tokenizers, tmp_path):
    """eos stays the tokenizer's (a template may write it), the template's end of turn is eot,
    a second end of turn eom; one more is said in the report."""
    tok = tokenizers["mistral"][1]  # eos </s>
    model = build_family("LlamaForCausalLM", tok).eval()
    ids = [tok.convert_tokens_to_ids(t) for t in ["<|im_end|>", "</s>", "<|eot_id|>", "<pad>"]]
    report = _export(model, tok, tmp_path / "m.gguf", eos_ids=ids)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field(reader, "tokenizer.ggml.eot_token_id") == ids[0]
    assert field(reader, "tokenizer.ggml.eom_token_id") == ids[2]
    assert any(str(ids[3]) in n for n in report["notes"])


# -- refusals ----------------------------------------------------------------------------------
def test_refusals_are_one_line(chatml, tmp_path):
    for cls in ("StableLmForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM"):
        reason = gguf_refusal(family_config(cls, chatml))
        assert reason and "\n" not in reason
        assert "Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Phi-3, Granite" in reason
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    refusals = {
        "rotary scaling 'yarn'": family_config("Qwen2ForCausalLM", chatml, rope_parameters=yarn),
        "no attention soft-capping": family_config("Gemma3ForCausalLM", chatml),
        "embeddings must be tied": family_config(
            "Gemma2ForCausalLM", chatml, tie_word_embeddings=False
        ),
        "query_pre_attn_scalar": family_config(
            "Gemma2ForCausalLM", chatml, query_pre_attn_scalar=64
        ),
        "activation": family_config("LlamaForCausalLM", chatml, hidden_act="gelu"),
        "head size": family_config("Phi3ForCausalLM", chatml, head_dim=32),
    }
    for words, config in refusals.items():
        reason = gguf_refusal(config)
        assert reason and words in reason and "\n" not in reason, (words, reason)
    for cls in FAMILY_CLASSES:
        assert gguf_refusal(family_model(cls, chatml).config) is None, cls

    model = family_model("Gemma2ForCausalLM", chatml)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 1)
    with pytest.raises(UsageError, match="head differs"):
        _export(model, chatml, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(tokenizers, tmp_path):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    chatml = tokenizers["chatml"][1]
    model = build_family("LlamaForCausalLM", chatml).eval()
    tok = AutoTokenizer.from_pretrained(tokenizers["chatml"][0])
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(UsageError, match="pre-tokenizer") as err:
        _export(model, tok, tmp_path / "m.gguf")
    assert "\n" not in str(err.value.problems[0])
    with pytest.raises(UsageError, match="--dtype"):
        _export(model, chatml, tmp_path / "m.gguf", dtype="q2_k")
    assert GGUF_DTYPES == ("f32", "f16", "bf16", "q8_0", "q4_0")
    assert not list(tmp_path.iterdir())


def test_a_failure_midway_leaves_no_file(chatml, tmp_path, monkeypatch):
    import tuneplex.export.gguf as export

    calls = []

    def failing(t, **kw):
        calls.append(t.name)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return encoded(t, **kw)

    encoded = export._encoded
    monkeypatch.setattr(export, "_encoded", failing)
    model = family_model("LlamaForCausalLM", chatml)
    with pytest.raises(RuntimeError, match="disk full"):
        _export(model, chatml, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_importing_the_export_modules_is_light():
    code = (
        "import sys, tuneplex.export.gguf, tuneplex.export.gguf_families, "
        "tuneplex.export.gguf_vocab, tuneplex.export.ollama; "
        "print([m for m in ('torch', 'gguf', 'transformers', 'numpy') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
