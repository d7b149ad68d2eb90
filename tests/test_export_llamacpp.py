"""GGUF files proven by a runtime nobody here wrote: llama.cpp, through llama-cpp-python.

For each supported family's tiny model and each type, llama.cpp's logits on a prompt against
transformers' on the same model; a LoRA run's merged model; greedy generation with the chat
template embedded in the file, token for token and to the same end of turn as tuneplex's own
generation; and the file's tokenizer against the HF tokenizer on text with special tokens.

Tolerances are max |Δ logit| / max |logit| over every position of the prompt, measured here
(largest over the eight families in brackets) and bounded at about twice that:
- against the model: what a user gets from the file, rounding of the weights included;
- against the file's own weights in transformers (dequantized, transforms undone): what llama.cpp
  adds, which for quantized types is its 8-bit quantization of activations. A wrong tensor
  layout or key puts either far off (a permuted q/k, a missing Gemma +1: above 0.3).
llama.cpp runs with an f32 KV cache (its default, f16, alone costs ~1e-3). Its CPU GELU looks
f32 inputs up in an f16 table (GGML_GELU_FP16 in ggml-cpu/vec.h): for Gemma the f32 reference
computes that table's GELU, and the exact GELU is compared with its own bound.
"""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import pytest

pytestmark = pytest.mark.llamacpp
torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
pytest.importorskip("gguf")
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (the llamacpp test extra)"
)

from gguf_helpers import bpe_tokenizer, read_back, spm_tokenizer  # noqa: E402
from helpers import chat_rows, write_rows  # noqa: E402
from test_export_gguf import FAMILY_CLASSES, family_model  # noqa: E402
from tuneplex.export.gguf import write_gguf  # noqa: E402

TOLERANCE = {
    # dtype: (against the model, against the file's weights)  [measured]
    "f32": (1e-4, 1e-4),  # [1.0e-6; Gemma with the table GELU 4.1e-5]
    "f16": (4e-3, 2e-3),  # [1.8e-3, 9.6e-4]
    "bf16": (3e-2, 2e-2),  # [1.4e-2, 9.1e-3]
    "q8_0": (1e-1, 6e-2),  # [4.4e-2, 3.1e-2]
    "q4_0": (1.0, 8e-2),  # [0.52, 3.6e-2]: 4-bit weights move a random tiny model's logits
}
EXACT_GELU_F32 = 1e-3
"""Gemma in f32 against transformers' exact tanh GELU: [2.7e-4], llama.cpp's f16 table."""
PROMPT = (
    "Hello world, the model learns data. Why is the river blue? Because the answer is two. "
    "<|im_start|>user\nReverse: a b c<|im_end|>\n"
)


@pytest.fixture(autouse=True)
def _plain_cpu_buffers(monkeypatch):
    """llama.cpp without its extra CPU buffer types (weight repacking, AMX): its AMX kernels
    fault on some virtual machines that report AMX (`tilezero`: illegal instruction), and the
    plain buffers compute the same on every x86 CPU the tests run on."""
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params

    def plain():
        params = default()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(low, "llama_model_default_params", plain)


def llama(path: Path, **kw):
    """llama.cpp on `path`: f32 KV cache, two threads, quiet."""
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=256, n_threads=2, type_k=0, type_v=0, verbose=False, **kw
    )


def llama_logits(path: Path, ids: list[int]):
    llm = llama(path, logits_all=True)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def hf_logits(model, ids: list[int]):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def relative(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


class TableGelu(torch.nn.Module):
    """llama.cpp's CPU GELU: the tanh approximation looked up in an f16 table."""

    def forward(self, x):
        y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


@pytest.fixture(scope="module")
def chatml(tokenizers):
    return tokenizers["chatml"][1]


@pytest.fixture(scope="module")
def models(chatml):
    """{class: its tiny model}, Gemma's with eager attention (transformers' SDPA leaves out
    Gemma 2's attention soft-capping, which llama.cpp computes)."""
    made = {}
    for cls in FAMILY_CLASSES:
        model = family_model(cls, chatml)
        if cls.startswith("Gemma"):
            model.config._attn_implementation = "eager"
        made[cls] = model
    return made


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0", "q4_0"])
@pytest.mark.parametrize("cls", FAMILY_CLASSES)
def test_llama_cpp_logits_match_transformers(cls, dtype, models, chatml, tmp_path):
    model = models[cls]
    path = tmp_path / "m.gguf"
    write_gguf(
        model=model,
        tokenizer=chatml,
        out=path,
        dtype=dtype,
        chat_template=chatml.chat_template,
        eos_ids=[chatml.eos_token_id],
    )
    ids = chatml(PROMPT)["input_ids"]
    got = llama_logits(path, ids)
    reference = model
    if cls.startswith("Gemma"):
        if dtype == "f32":
            assert relative(got, hf_logits(model, ids)) < EXACT_GELU_F32
        reference = copy.deepcopy(model)
        for layer in reference.model.layers:
            layer.mlp.act_fn = TableGelu()
    to_model, to_file = TOLERANCE[dtype]
    assert relative(got, hf_logits(reference, ids)) < to_model
    from_file = copy.deepcopy(reference)
    from_file.load_state_dict(read_back(path, model)[0])
    assert relative(got, hf_logits(from_file, ids)) < to_file


# -- the tokenizer, as llama.cpp tokenizes with the file ---------------------------------------
TEXTS = [
    "Hello world",
    "12345678 and 3.14159 or 1,000,000",
    "don't DON'T I'LL we've",
    "<|im_start|>user\nWhy is the river blue?<|im_end|>\n<|im_start|>assistant\n",
    "<s>[INST] what  is   1234 + 56? [/INST] Paris</s>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<start_of_turn>user\nhello there<end_of_turn>\n<start_of_turn>model\n",
    "<|user|>\nWhat is two?<|end|>\n<|assistant|>\n",
    "Tabs\tand\nnewlines\n\n ünïcödé 日本 🚀",
    "  leading spaces and trailing  ",
]


@pytest.mark.parametrize(
    "kind",
    [
        "chatml",
        "llama3",
        "mistral",
        "bpe-llama3",
        "bpe-qwen2",
        "bpe-digits",
        "spm-legacy",
        "spm-none",
        "spm-first",
        "spm-always",
    ],
)
def test_llama_cpp_tokenizes_as_the_hf_tokenizer(kind, tokenizers, tmp_path):
    """Same ids for text with special tokens. SentencePiece's Metaspace schemes llama.cpp has
    no equivalent for differ where the export's report says: "first" only at the start of
    text no special token precedes (unless it starts with a space), "always" only where such
    text starts with a space."""
    from tuneplex.testing.tiny import STYLES, build_llama

    if kind in tokenizers:
        tok = tokenizers[kind][1]
    elif kind.startswith("bpe-"):
        tok = bpe_tokenizer(tmp_path / "tok", pre=kind[4:])
    else:
        mistral = STYLES["mistral"]["template"]
        tok = spm_tokenizer(tmp_path / "tok", template=mistral, prefix=kind[4:])
    model = build_llama(tmp_path / "model", tokenizer=tok, layers=1)
    path = tmp_path / "m.gguf"
    report = write_gguf(
        model=model, tokenizer=tok, out=path, dtype="f32", chat_template=None, eos_ids=[]
    )
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    specials = [a.content for a in tok.added_tokens_decoder.values()]
    try:
        checked = 0
        for text in TEXTS:
            hf = tok(text)["input_ids"]
            bos = tok.bos_token_id is not None and hf[:1] == [tok.bos_token_id]
            ours = llm.tokenize(text.encode(), add_bos=bos, special=True)
            special_first = text.startswith(tuple(specials))
            if kind == "spm-first" and not special_first and not text.startswith(" "):
                assert ours != hf and report["notes"], text  # the documented difference
                continue
            if kind == "spm-always" and text.startswith(" "):
                assert ours != hf and report["notes"], text
                continue
            assert ours == hf, (
                text,
                tok.convert_ids_to_tokens(hf),
                tok.convert_ids_to_tokens(ours),
            )
            checked += 1
        assert checked >= 3
    finally:
        llm.close()


# -- runs trained here: a LoRA merged, generation to the end of turn -----------------------
def _job(root: Path, model: str, ft: str, lr: str, epochs: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    train, val = root / "train.jsonl", root / "val.jsonl"
    write_rows(train, chat_rows(48))
    write_rows(val, chat_rows(6, seed=1))
    path = root / f"{ft}.yaml"
    path.write_text(
        f"""\
model: {model}
dataset:
  training: {train}
  validation: {val}
training:
  finetuning_type: {ft}
  max_seq_length: 128
  precision: fp32
schedule:
  epochs: {epochs}
  seed: 7
batch:
  global_batch_size: 8
  micro_batch_size: 8
optimizer:
  learning_rate: {lr}
  warmup_steps: 1
"""
    )
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """{kind: run directory}, each trained once, lazily: "full" (all weights; learns to answer
    and end its turn), "lora" (an adapter) on the ChatML Llama; "spm" (all weights) on a
    Mistral with a SentencePiece-style tokenizer and the [INST] template, whose end of turn is
    the eos the template writes."""
    from tuneplex.cli import main

    root = tmp_path_factory.mktemp("runs")
    settings = {
        "full": ("all_weights", "5e-3", 10),
        "lora": ("lora", "2e-2", 8),
        "spm": ("all_weights", "5e-3", 10),
    }
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            ft, lr, epochs = settings[kind]
            model = _spm_mistral(root / "spm-model") if kind == "spm" else tiny_model
            run = root / kind
            said = io.StringIO()
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                job = _job(root / f"{kind}-data", model, ft, lr, epochs)
                code = main(["train", str(job), "-o", str(run)])
            assert code == 0, said.getvalue()[-3000:]
            made[kind] = run
        return made[kind]

    return get


def _spm_mistral(out: Path) -> str:
    from helpers import build_family
    from tuneplex.testing.tiny import STYLES

    tok = spm_tokenizer(out, template=STYLES["mistral"]["template"], prefix="legacy")
    model = build_family("MistralForCausalLM", tok, sliding_window=None, initializer_range=0.1)
    model.save_pretrained(out, safe_serialization=True)
    return str(out)


def _loaded(run: Path, scratch: Path):
    from tuneplex.inference.loading import load
    from tuneplex.inference.target import resolve

    return load(resolve(str(run), device="cpu", scratch=scratch), device="cpu")


@pytest.mark.slow
def test_a_lora_runs_merged_model_in_llama_cpp_equals_base_plus_adapter(runs, tmp_path):
    loaded = _loaded(runs("lora"), tmp_path / "scratch")
    tok, adapted = loaded.tokenizer, loaded.model
    ids = tok(PROMPT)["input_ids"]
    want = hf_logits(adapted, ids)  # the base model with its adapter, unmerged
    merged = copy.deepcopy(adapted).merge_and_unload()
    with adapted.disable_adapter():
        assert relative(hf_logits(adapted, ids), want) > 1e-2  # the adapter moved the logits
    path = tmp_path / "m.gguf"
    write_gguf(
        model=merged,
        tokenizer=tok,
        out=path,
        dtype="f32",
        chat_template=tok.chat_template,
        eos_ids=[tok.eos_token_id],
    )
    # f32 only: this trained model's logits at a few positions of the prompt move by 8% (f16)
    # and 30% (bf16) in transformers itself with the weights rounded, so the per-type bounds
    # are stated on the families' models above
    assert relative(llama_logits(path, ids), want) < TOLERANCE["f32"][0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "lora", "spm"])
def test_greedy_generation_in_llama_cpp_equals_tuneplex_generate(kind, runs, tmp_path):
    """The template embedded in the file renders the prompt training rendered; llama.cpp's
    greedy tokens are tuneplex's, and it stops on the same end-of-turn token."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from tuneplex.inference.engine import Sampling

    loaded = _loaded(runs(kind), tmp_path / "scratch")
    prompter, gen = loaded.engine()
    tok = loaded.tokenizer
    model = loaded.model.merge_and_unload() if kind == "lora" else loaded.model
    end_of_turn = tok.convert_tokens_to_ids("</s>" if kind == "spm" else "<|im_end|>")
    assert end_of_turn in prompter.stop.token_ids
    path = tmp_path / "m.gguf"
    write_gguf(
        model=model,
        tokenizer=tok,
        out=path,
        dtype="f32",
        chat_template=tok.chat_template,
        eos_ids=[end_of_turn],
    )
    texts = ["Reverse: river blue a", "Reverse: code fast", "Reverse: the model learns data"]
    ours = gen.generate([prompter.from_text(t).ids for t in texts], Sampling(max_new_tokens=24))
    assert all(c.stopped and c.end == [end_of_turn] for c in ours)  # it learned to end turns
    assert any(c.ids for c in ours)  # after answering

    llm = llama(path)
    try:
        template = llm.metadata["tokenizer.chat_template"]
        assert template == tok.chat_template
        vocab = llm._model.vocab
        bos = llm.token_bos()  # as llama-cpp-python's own chat handler renders
        chat = Jinja2ChatFormatter(
            template=template,
            eos_token=llm._model.token_get_text(llm.token_eos()),
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
        )
        for text, done in zip(texts, ours, strict=True):
            messages = [{"role": "user", "content": text}]
            prompt = chat(messages=messages).prompt
            ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            assert ids == prompter.from_text(text).ids  # training's rendering, from the file
            tokens, stop = [], None
            for t in llm.generate(ids, temp=0.0, repeat_penalty=1.0):
                if llama_cpp.llama_vocab_is_eog(vocab, t):
                    stop = t
                    break
                tokens.append(t)
                if len(tokens) == 24:
                    break
            assert tokens == done.ids and stop == end_of_turn, text
            answer = llm.create_chat_completion(
                messages, temperature=0.0, max_tokens=24, repeat_penalty=1.0
            )["choices"][0]
            assert answer["message"]["content"] == done.text
            assert answer["finish_reason"] == "stop"
    finally:
        llm.close()


ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,  # most frequencies scaled at these lengths
    },
}


@pytest.mark.parametrize("kind", list(ROPE_SCALINGS))
def test_rotary_scalings_in_llama_cpp(kind, chatml, tmp_path):
    from helpers import build_family

    params = {"rope_theta": 10000.0, **ROPE_SCALINGS[kind]}
    model = build_family("LlamaForCausalLM", chatml, rope_parameters=params).eval()
    plain = build_family("LlamaForCausalLM", chatml).eval()  # same weights, unscaled
    path = tmp_path / "m.gguf"
    write_gguf(model=model, tokenizer=chatml, out=path, dtype="f32", chat_template=None, eos_ids=[])
    ids = chatml(PROMPT)["input_ids"]
    want = hf_logits(model, ids)
    assert relative(hf_logits(plain, ids), want) > 1e-2  # the scaling matters here
    assert relative(llama_logits(path, ids), want) < TOLERANCE["f32"][0]


@pytest.mark.parametrize("dtype", ["f32", "q4_0"])
def test_tied_embeddings_are_the_output_head_in_llama_cpp(dtype, chatml, tmp_path):
    """No output tensor: llama.cpp reads the embeddings as the head (q8_0 in a q4_0 file)."""
    import gguf
    from helpers import build_family

    model = build_family("Qwen2ForCausalLM", chatml, tie_word_embeddings=True).eval()
    path = tmp_path / "m.gguf"
    report = write_gguf(
        model=model, tokenizer=chatml, out=path, dtype=dtype, chat_template=None, eos_ids=[]
    )
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" not in types
    assert types["token_embd.weight"] == ("F32" if dtype == "f32" else "Q8_0")
    assert report["tensors"] == len(types)
    ids = chatml(PROMPT)["input_ids"]
    got = llama_logits(path, ids)
    from_file = copy.deepcopy(model)
    from_file.load_state_dict(read_back(path, model)[0])
    assert relative(got, hf_logits(model, ids)) < TOLERANCE[dtype][0]
    assert relative(got, hf_logits(from_file, ids)) < TOLERANCE[dtype][1]
