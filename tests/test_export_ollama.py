"""The Ollama Modelfile: each chat template style recognized by what it renders, its Go template
executed by Go's text/template as Ollama executes it (where Go is installed) and compared with
the Jinja rendering. The templates are written here, each with its family's structure."""

from __future__ import annotations

from datetime import datetime

import pytest
from gguf_helpers import (
    ALPACA,
    GEMMA,
    GRANITE,
    GRANITE_DEFAULT,
    PHI3,
    QWEN,
    QWEN_DEFAULT,
    TURN_MARKERS,
    go_available,
    go_render,
)

pytest.importorskip("transformers")

NOW = datetime(2025, 3, 9, 12, 0)
"""The clock the dated templates read, in recognition and in the reference rendering alike."""

# -- templates in the style of the families, written for these tests ------------------------
_LLAMA31_HEAD = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set sys = messages[0]['content'] | trim %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set sys = '' %}{%- set turns = messages %}{%- endif %}"
)
_LLAMA31_BODY = (
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Trained up to: March 2023\\nDate today: ' + today + '\\n\\n' + sys + '<|eot_id|>' }}"
    "{%- for m in turns %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA31 = _LLAMA31_HEAD + "{%- set today = '14 Feb 2024' %}" + _LLAMA31_BODY
"""A system turn always written, opening with a fixed text (Llama 3.1)."""
LLAMA32 = (
    _LLAMA31_HEAD
    + "{%- if strftime_now is defined %}{%- set today = strftime_now('%d %b %Y') %}"
    + "{%- else %}{%- set today = '14 Feb 2024' %}{%- endif %}"
    + _LLAMA31_BODY
)
"""The same with today's date in the fixed text (Llama 3.2)."""
MISTRAL_V03 = (
    "{{- bos_token }}{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{- ' [INST] ' + m['content'] + ' [/INST]' }}"
    "{%- elif m['role'] == 'assistant' %}{{- ' ' + m['content'] + ' ' + eos_token }}"
    "{%- endif %}{%- endfor %}"
)
"""Spaces around the markers and the answer, no generation prompt, system messages dropped."""
NEMO = (
    "{%- if messages[0]['role'] == 'system' %}{%- set sys = messages[0]['content'] %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set sys = none %}"
    "{%- set turns = messages %}{%- endif %}"
    "{{- bos_token }}{%- for m in turns %}"
    "{%- if m['role'] == 'user' %}{{- '[INST]' }}"
    "{%- if loop.last and sys is not none %}{{- sys + '\\n\\n' }}{%- endif %}"
    "{{- m['content'] + '[/INST]' }}"
    "{%- elif m['role'] == 'assistant' %}{{- m['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
"""No spaces; the system prompt opens the last user turn (Mistral Nemo)."""
PHI4 = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] + '<|im_end|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant<|im_sep|>' }}{%- endif %}"
)
PHI4_MINI = (
    "{%- for m in messages %}{{- '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)
DEEPSEEK = (
    "{%- set ns = namespace(sys=[]) %}"
    "{%- for m in messages if m['role'] == 'system' %}"
    "{%- set ns.sys = ns.sys + [m['content']] %}{%- endfor %}"
    "{{- bos_token + ns.sys | join('\\n\\n') }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{- '<｜User｜>' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' %}"
    "{{- '<｜Assistant｜>' + m['content'].split('</think>')[-1] + eos_token }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜>' }}{%- endif %}"
)
"""The system prompt bare before the first turn; earlier answers lose their reasoning."""
DEEPSEEK_MARKERS = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
]

CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Why?"},
    ],
    [
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Two"},
        {"role": "user", "content": "Three"},
        {"role": "assistant", "content": "Four"},
        {"role": "user", "content": "Five"},
    ],
    [{"role": "user", "content": "Only one"}],
    [{"role": "system", "content": "Line one.\nLine two."}, {"role": "user", "content": "Go"}],
]


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    """A tokenizer knowing every style's markers (templates are rendered with it)."""
    from tuneplex.testing.tiny import build_tokenizer

    style = {"template": None, "bos": None, "eos": "<|im_end|>", "add_bos": False}
    style["specials"] = [*TURN_MARKERS, "<|im_sep|>"]
    return build_tokenizer(tmp_path_factory.mktemp("marked"), style=style)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    from tuneplex.testing.tiny import build_tokenizer

    bos, eos = DEEPSEEK_MARKERS[:2]
    style = {"template": None, "bos": bos, "eos": eos, "add_bos": False}
    style["specials"] = DEEPSEEK_MARKERS
    return build_tokenizer(tmp_path_factory.mktemp("deepseek"), style=style, vocab_size=400)


def _styles(tokenizers, marked, deepseek):
    from tuneplex.testing.tiny import STYLES

    llama3, mistral = tokenizers["llama3"][1], tokenizers["mistral"][1]
    return {
        # name: (tokenizer, template, style, takes a system prompt, default system prompt,
        #        a note, as for a template dropping earlier reasoning)
        "chatml": (marked, STYLES["chatml"]["template"], "ChatML", True, None, False),
        "qwen": (marked, QWEN, "ChatML", True, QWEN_DEFAULT, False),
        "llama3": (llama3, STYLES["llama3"]["template"], "Llama 3", True, None, False),
        "llama3.1": (llama3, LLAMA31, "Llama 3", True, None, False),
        "llama3.2": (llama3, LLAMA32, "Llama 3", True, None, False),
        "mistral": (mistral, STYLES["mistral"]["template"], "Mistral [INST]", False, None, False),
        "mistral-v0.3": (mistral, MISTRAL_V03, "Mistral v0.3", False, None, False),
        "mistral-nemo": (mistral, NEMO, "Mistral Nemo", True, None, False),
        "gemma": (marked, GEMMA, "Gemma", True, None, False),
        "phi3": (marked, PHI3, "Phi-3", True, None, False),
        "phi4": (marked, PHI4, "Phi-4", True, None, False),
        "phi4-mini": (marked, PHI4_MINI, "Phi-4-mini", True, None, False),
        "granite": (marked, GRANITE, "Granite", True, GRANITE_DEFAULT, False),
        "deepseek": (deepseek, DEEPSEEK, "DeepSeek", True, None, True),
    }


NAMES = [
    "chatml",
    "qwen",
    "llama3",
    "llama3.1",
    "llama3.2",
    "mistral",
    "mistral-v0.3",
    "mistral-nemo",
    "gemma",
    "phi3",
    "phi4",
    "phi4-mini",
    "granite",
    "deepseek",
]


@pytest.mark.parametrize("name", NAMES)
def test_modelfile_translates_each_style(name, tokenizers, marked, deepseek, tmp_path):
    """Recognized by rendering; the Modelfile has its Go template, SYSTEM for a default system
    prompt, one stop per end-of-turn id, and a note only where Ollama must differ."""
    from tuneplex.export.ollama import STYLES, go_template, modelfile, recognize

    tok, template, style, system, default, noted = _styles(tokenizers, marked, deepseek)[name]
    found = recognize(chat_template=template, tokenizer=tok, now=NOW)
    assert found is not None and found.style.name == style
    assert (found.system, found.default_system) == (system, default)
    text, note = modelfile(
        gguf_path=tmp_path / "m.gguf",
        chat_template=template,
        tokenizer=tok,
        eos_ids=[tok.eos_token_id] * 2,
        now=NOW,
    )
    assert (note is not None) == noted
    assert not noted or ("reasoning" in note and "\n" not in note)
    lines = text.splitlines()
    assert lines[0] == "FROM ./m.gguf"
    assert text.count("PARAMETER stop") == 1 and f'stop "{tok.eos_token}"' in text
    go = go_template(found.style, system=system)
    assert f'TEMPLATE """{go}"""' in text
    assert (f'SYSTEM """{default}"""' in text) == (default is not None)
    assert {s.name for s in STYLES} >= {style}


def test_the_fixed_text_of_the_system_turn_is_read_off_the_rendering(tokenizers, tmp_path):
    """Llama 3.1's fixed text is kept as the template writes it; Llama 3.2's carries the date
    of the clock it is rendered with, the same in every probe, and written into the Go
    template as it is (Ollama's Go templates have no date in that format)."""
    from tuneplex.export.ollama import go_template, recognize

    tok = tokenizers["llama3"][1]
    fixed = "Trained up to: March 2023\nDate today: 14 Feb 2024\n\n"
    assert recognize(chat_template=LLAMA31, tokenizer=tok).style.preamble == fixed
    other = recognize(chat_template=LLAMA31.replace("Trained", "Known"), tokenizer=tok)
    assert other.style.preamble == fixed.replace("Trained", "Known")
    for day, text in [(NOW, "09 Mar 2025"), (datetime(2024, 12, 31, 23, 59), "31 Dec 2024")]:
        found = recognize(chat_template=LLAMA32, tokenizer=tok, now=day)
        assert found.style.preamble == f"Trained up to: March 2023\nDate today: {text}\n\n"
        assert f"Date today: {text}" in go_template(found.style)
    braces = LLAMA31.replace("Trained up to", "Trained {{ up }} to")
    found = recognize(chat_template=braces, tokenizer=tok, now=NOW)
    assert found.style.preamble.startswith("Trained {{ up }} to")
    if go_available():  # a fixed text holding Go's delimiters is written as a string constant
        cases, want = [], []
        go = go_template(found.style)
        _cases(cases, want, tok=tok, template=braces, go=go, system=True, default=None)
        assert go_render(cases, workdir=tmp_path) == want
    llama3 = tokenizers["llama3"][1].chat_template
    assert recognize(chat_template=llama3, tokenizer=tok).style.preamble is None


def test_a_template_that_drops_earlier_reasoning_says_so(deepseek, marked):
    from tuneplex.export.ollama import recognize

    kept = DEEPSEEK.replace(".split('</think>')[-1]", "")
    assert recognize(chat_template=kept, tokenizer=deepseek).drops_reasoning is False
    assert recognize(chat_template=DEEPSEEK, tokenizer=deepseek).drops_reasoning is True
    assert recognize(chat_template=QWEN, tokenizer=marked).drops_reasoning is False


@pytest.mark.skipif(not go_available(), reason="Go is not installed (apt: golang-go)")
def test_ollama_renders_each_translated_template_as_the_jinja_template(
    tokenizers, marked, deepseek, tmp_path
):
    """Each Go template, executed by Go's text/template with Ollama's data (.System and
    .Messages, as Ollama's template.Execute collates them), renders every conversation exactly
    as the Jinja template does (on the day it was exported), less the BOS llama.cpp adds."""
    from tuneplex.export.ollama import go_template, recognize

    cases, want = [], []
    for tok, template, _, system, default, _ in _styles(tokenizers, marked, deepseek).values():
        found = recognize(chat_template=template, tokenizer=tok, now=NOW)
        go = go_template(found.style, system=system)
        _cases(cases, want, tok=tok, template=template, go=go, system=system, default=default)
    assert go_render(cases, workdir=tmp_path) == want


def _cases(cases, want, *, tok, template, go, system, default) -> None:
    from tuneplex.export.ollama import frozen_clock

    for conv in CONVERSATIONS:
        if not system and any(m["role"] == "system" for m in conv):
            continue
        with frozen_clock(NOW):
            rendered = tok.apply_chat_template(
                conv, chat_template=template, tokenize=False, add_generation_prompt=True
            )
        want.append(rendered.removeprefix(tok.bos_token or "\0"))
        sent = conv
        if default and conv[0]["role"] != "system":  # Ollama sends the Modelfile's SYSTEM
            sent = [{"role": "system", "content": default}, *conv]
        cases.append({"template": go, "messages": sent})


def test_modelfile_says_plainly_when_a_template_is_not_translated(marked, tmp_path):
    from tuneplex.export.ollama import modelfile

    text, note = modelfile(
        gguf_path=tmp_path / "x.gguf", chat_template=ALPACA, tokenizer=marked, eos_ids=[4]
    )
    assert text == 'FROM ./x.gguf\nPARAMETER stop "<|im_end|>"\n'
    assert note is not None and "no TEMPLATE" in note and "\n" not in note
    text, note = modelfile(
        gguf_path=tmp_path / "x.gguf", chat_template=None, tokenizer=marked, eos_ids=[]
    )
    assert text == "FROM ./x.gguf\n" and "no chat template" in note
