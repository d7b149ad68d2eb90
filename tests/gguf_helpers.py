"""Shared by the GGUF tests: SentencePiece-style tokenizers trained here, chat templates in
the style of the families that ship them, and Ollama's template rendering run by Go itself."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

# -- chat templates written for these tests, each with its family's structure -------------
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}"
    "{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
GRANITE_DEFAULT = "Knowledge Cutoff Date: April 2024.\nYou are Granite, developed by IBM."
GRANITE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '" + GRANITE_DEFAULT.replace("\n", "\\n") + "' %}"
    "{%- set loop_messages = messages %}{%- endif %}"
    "{{- '<|start_of_role|>system<|end_of_role|>' + system_message + '<|end_of_text|>\\n' }}"
    "{%- for message in loop_messages %}"
    "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] "
    "+ '<|end_of_text|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)
QWEN_DEFAULT = "You are a helpful assistant."
QWEN = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + QWEN_DEFAULT + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
ALPACA = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\\n' + message['content'] + '\\n\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
"""A template in no style Ollama's templates are written for here."""

TURN_MARKERS = [
    "<start_of_turn>",
    "<end_of_turn>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
    "<|start_of_role|>",
    "<|end_of_role|>",
    "<|end_of_text|>",
]


# -- SentencePiece-style tokenizers --------------------------------------------------------
def spm_tokenizer(
    out_dir: str | Path,
    *,
    template: str,
    bos: str = "<s>",
    eos: str = "</s>",
    prefix: str = "legacy",
    vocab_size: int = 400,
    seed: int = 0,
):
    """A BPE SentencePiece model with byte fallback trained here, as transformers converts one
    (vocab in piece order, merges from `generate_merges`), wrapped as a fast tokenizer with a
    chat template. `prefix`: "legacy" (normalizer Prepend ▁ + Replace, as Llama 2 and Mistral
    ship), "first" or "always" (a Metaspace pre-tokenizer) or "none" (Replace only, Gemma's)."""
    import pytest

    spm = pytest.importorskip("sentencepiece", reason="trains the SentencePiece-style tokenizers")
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges
    from tuneplex.testing.tiny import corpus

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = out / "corpus.txt"
    lines = corpus(random.Random(seed), 2000)
    text.write_text("\n".join([*lines, "1234 56 7.89 ü é ñ 日本"]), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(out / "spm"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece=bos,
        eos_piece=eos,
        minloglevel=2,
        num_threads=1,
    )
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = generate_merges(vocab)
    tk = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    if prefix == "legacy":
        tk.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
    elif prefix == "none":
        tk.normalizer = normalizers.Replace(" ", "\u2581")
    else:
        tk.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme=prefix, split=False
        )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ["<unk>", bos, eos]]
    )
    tk.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ["<pad>", *TURN_MARKERS]]
    )
    from tokenizers import processors

    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token=eos,
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=template,
    )
    tok.save_pretrained(out)
    return tok


# -- Ollama's template execution, by Go's text/template -------------------------------------
OLLAMA_GO = r"""
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

// as Ollama's template.Execute: system messages joined into .System (and kept in .Messages),
// consecutive messages of one role merged
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role {
			out[len(out)-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, &m)
		}
	}
	return strings.Join(system, "\n\n"), out
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	var results []string
	for _, c := range cases {
		t := template.Must(template.New("").Parse(c.Template))
		system, messages := collate(c.Messages)
		var b strings.Builder
		data := map[string]any{"System": system, "Messages": messages, "Tools": nil, "Response": ""}
		err := t.Execute(&b, data)
		if err != nil {
			panic(err)
		}
		results = append(results, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(results)
}
"""


def go_available() -> bool:
    return shutil.which("go") is not None


def go_render(cases: list[dict], *, workdir: Path) -> list[str]:
    """Each case's template executed as Ollama executes it: [{"template", "messages"}]."""
    src = workdir / "ollama_render.go"
    src.write_text(OLLAMA_GO)
    env = {
        **os.environ,
        "GOCACHE": str(Path(os.environ.get("TMPDIR", "/tmp")) / "tuneplex-go-cache"),
        "GOFLAGS": "-mod=mod",
        "GO111MODULE": "off",
    }
    proc = subprocess.run(
        ["go", "run", str(src)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def bpe_tokenizer(out_dir: str | Path, *, pre: str, template: str | None = None, seed: int = 0):
    """A byte-level BPE trained here with the pre-tokenizer of Llama 3 ("llama3": its split
    regex, merges ignored for whole-word tokens), Qwen2 ("qwen2") or Granite ("digits": single
    digits, then GPT-2's regex), wrapped as a fast tokenizer with the ChatML markers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from tuneplex.export.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT
    from tuneplex.testing.tiny import SPECIALS, STYLES, corpus

    if pre == "digits":
        steps = [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    else:
        split = {"llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[pre]
        steps = [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    tk = Tokenizer(models.BPE(ignore_merges=pre == "llama3"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = corpus(random.Random(seed)) + ["1234 56 7.89 12345678 don't I'll we've"] * 20
    tk.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        chat_template=template or STYLES["chatml"]["template"],
    )
    tok.save_pretrained(out_dir)
    return tok


# -- reading a GGUF back ----------------------------------------------------------------------
def uninterleave_rope(rows, heads: int):
    """The inverse of llama.cpp's q/k row order, written independently of the exporter's."""
    d = rows.shape[0] // heads
    return rows.reshape(heads, d // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def read_back(path: Path, model) -> tuple[dict, dict]:
    """(the file's tensors as the model's state dict, dequantized to float32 and with the
    family's documented transforms undone; {state key: ggml type name})."""
    import gguf
    import numpy as np
    import torch
    from tuneplex.export.gguf_families import FAMILIES

    config = model.config
    family = FAMILIES[config.model_type]
    reader = gguf.GGUFReader(path)
    names = gguf.get_tensor_name_map(
        getattr(gguf.MODEL_ARCH, family.arch), config.num_hidden_layers
    )
    by_gguf = {t.name: t for t in reader.tensors}
    state, types = {}, {}
    for key, ref in model.state_dict().items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name not in by_gguf and key == "lm_head.weight":
            name = "token_embd.weight"  # tied: llama.cpp reads the embeddings
        t = by_gguf[name]
        data = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
        data = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(ref.shape)
        if family.interleaved_rope and key.endswith(("q_proj.weight", "q_proj.bias")):
            data = uninterleave_rope(data, config.num_attention_heads)
        if family.interleaved_rope and key.endswith(("k_proj.weight", "k_proj.bias")):
            data = uninterleave_rope(data, config.num_key_value_heads)
        if family.norm_offset and key.endswith("norm.weight"):
            data = data - family.norm_offset
        state[key], types[key] = data, t.tensor_type.name
    return state, types


def field(reader, key: str):
    """A metadata value as Python: str, number, bool or list."""
    f = reader.fields[key]
    return f.contents()
