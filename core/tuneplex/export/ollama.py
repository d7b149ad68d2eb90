"""An Ollama Modelfile beside a GGUF file: FROM, TEMPLATE in Ollama's Go-template syntax,
SYSTEM for a template's default system prompt, and PARAMETER stop for each end of turn.

The chat template is recognized by what it renders, never by its source: probe conversations
go through the Jinja template and the results are compared with each known style's rendering.
A style is data (the text around each role's turn, where the system prompt goes); its Python
rendering and its Go template are both made from that one entry, so they cannot drift apart.
Two things are read off the rendering rather than kept in the entry: a default system prompt
(Qwen, Granite; written as SYSTEM) and a fixed text a template writes at the start of a system
turn it always writes (Llama 3.1/3.2's "Cutting Knowledge Date: ...\nToday Date: ...\n\n";
the Go template writes it verbatim, with no condition, as the Jinja template does).
A template that matches no style still gets FROM and the stop parameters, and a plain note.

Dates: templates that call `strftime_now` (Llama 3.2) are rendered with one frozen clock, so
every probe sees the same date and recognition cannot flip at midnight. Ollama renders with the
Go template alone and has no date function in the template's format, so the Modelfile keeps
the export day's date: the rendering equals the Jinja template's on that day, and on a later
day differs in that date only (as a training run rendered its own day's date).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

SYSTEM_MARK = "\ue000"
"""A private-use character standing for the system prompt (or the preamble) while one is found."""


@dataclass(frozen=True)
class Style:
    name: str
    user: tuple[str, str]
    """Text before and after a user turn."""
    assistant: tuple[str, str]
    """Text before and after an assistant turn."""
    system: tuple[str, str] | None = None
    """Text around a system turn of its own, or None when the system prompt is put into a user
    turn followed by `joiner` (Gemma, Mistral Nemo) or is not supported."""
    joiner: str | None = None
    into: Literal["first", "last"] = "first"
    """Which user turn a `joiner` style puts the system prompt in: the first (Gemma), or the
    last, and only when it is the conversation's last message (Mistral Nemo)."""
    prompt: str | None = None
    """The generation prompt when it is not the text before an assistant turn (Mistral v0.3
    writes " answer </s>" after " [/INST]" but prompts with nothing)."""
    preamble: str | None = None
    """Found by recognition, never written in STYLES: with a string, the system turn is written
    for every conversation, starting with this text, then the system prompt if any."""

    @property
    def generation_prompt(self) -> str:
        return self.assistant[0] if self.prompt is None else self.prompt


STYLES = (
    Style(
        "ChatML",
        user=("<|im_start|>user\n", "<|im_end|>\n"),
        assistant=("<|im_start|>assistant\n", "<|im_end|>\n"),
        system=("<|im_start|>system\n", "<|im_end|>\n"),
    ),
    Style(
        "Phi-4",
        user=("<|im_start|>user<|im_sep|>", "<|im_end|>"),
        assistant=("<|im_start|>assistant<|im_sep|>", "<|im_end|>"),
        system=("<|im_start|>system<|im_sep|>", "<|im_end|>"),
    ),
    Style(
        "Llama 3",
        user=("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
        assistant=("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
        system=("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
    ),
    Style("Mistral [INST]", user=("[INST] ", " [/INST]"), assistant=("", "</s>")),
    Style("Mistral v0.3", user=(" [INST] ", " [/INST]"), assistant=(" ", " </s>"), prompt=""),
    Style(
        "Mistral Nemo",
        user=("[INST]", "[/INST]"),
        assistant=("", "</s>"),
        joiner="\n\n",
        into="last",
    ),
    Style(
        "Gemma",
        user=("<start_of_turn>user\n", "<end_of_turn>\n"),
        assistant=("<start_of_turn>model\n", "<end_of_turn>\n"),
        joiner="\n\n",
    ),
    Style(
        "Phi-3",
        user=("<|user|>\n", "<|end|>\n"),
        assistant=("<|assistant|>\n", "<|end|>\n"),
        system=("<|system|>\n", "<|end|>\n"),
    ),
    Style(
        "Phi-4-mini",
        user=("<|user|>", "<|end|>"),
        assistant=("<|assistant|>", "<|end|>"),
        system=("<|system|>", "<|end|>"),
    ),
    Style(
        "Granite",
        user=("<|start_of_role|>user<|end_of_role|>", "<|end_of_text|>\n"),
        assistant=("<|start_of_role|>assistant<|end_of_role|>", "<|end_of_text|>\n"),
        system=("<|start_of_role|>system<|end_of_role|>", "<|end_of_text|>\n"),
    ),
    Style(
        "DeepSeek",
        user=("<｜User｜>", ""),
        assistant=("<｜Assistant｜>", "<｜end▁of▁sentence｜>"),
        system=("", ""),
    ),
)

PROBES: tuple[tuple[tuple[str, str], ...], ...] = (
    (("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello!"), ("user", "Why?")),
    (("user", "Hi there"), ("assistant", "Hello!"), ("user", "Why?")),
    (("user", "What is two?"),),
    (("system", "Be brief."), ("user", "What is two?")),
)
"""Conversations as Ollama renders them: ending with a user turn and the generation prompt."""

REASONING_PROBE = (
    ("user", "Hi there"),
    ("assistant", "<think>\nA greeting.\n</think>\n\nHello!"),
    ("user", "Why?"),
)
"""An earlier answer with its reasoning: templates that drop it (Qwen3, DeepSeek-R1) do what no
Go template can (Ollama's have no string functions), which the Modelfile's note says."""


def render(style: Style, messages: list[dict[str, str]], *, system: bool = True) -> str:
    """`messages` as `style` renders them with the generation prompt (the reference the Go
    template is checked against). `system=False`: the template takes no system prompt."""
    sys_text = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    sys_text = sys_text if system else ""
    out = []
    if style.system is not None and (sys_text or style.preamble is not None):
        out.append(style.system[0] + (style.preamble or "") + sys_text + style.system[1])
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    into = users[0] if style.into == "first" and users else len(messages) - 1
    for i, m in enumerate(messages):
        if m["role"] == "user":
            lead = sys_text + style.joiner if sys_text and style.joiner and i == into else ""
            out.append(style.user[0] + lead + m["content"] + style.user[1])
        elif m["role"] == "assistant":
            out.append(style.assistant[0] + m["content"] + style.assistant[1])
    return "".join(out) + style.generation_prompt


def go_template(style: Style, *, system: bool = True) -> str:
    """`style` in Ollama's Go-template syntax over .System and .Messages (Ollama passes system
    messages both ways: joined in .System, and in .Messages, where no branch prints them)."""
    u0, u1 = style.user
    a0, a1 = style.assistant
    head = lead = ""
    sys_go = "{{ .System }}" if system else ""
    if style.system is not None and style.preamble is not None:  # written every time
        head = style.system[0] + _go_text(style.preamble) + sys_go + style.system[1]
    elif system and style.system is not None:
        head = "{{ if .System }}" + style.system[0] + sys_go + style.system[1] + "{{ end }}"
    elif system and style.joiner is not None and style.into == "first":
        head = "{{ $first := true }}"
        lead = "{{ if and $first $.System }}{{ $.System }}" + style.joiner + "{{ end }}"
        lead += "{{ $first = false }}"
    elif system and style.joiner is not None:  # into the last message, when it is a user's
        lead = "{{ if and $last $.System }}{{ $.System }}" + style.joiner + "{{ end }}"
    prompt = "{{ if $last }}" + style.generation_prompt + "{{ end }}"
    return (
        head
        + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        + '{{ if eq .Role "user" }}'
        + (u0 + lead + "{{ .Content }}" + u1 + (prompt if style.generation_prompt else ""))
        + '{{ else if eq .Role "assistant" }}'
        + (a0 + "{{ .Content }}{{ if not $last }}" + a1 + "{{ end }}")
        + "{{ end }}{{ end }}"
    )


def _go_text(text: str) -> str:
    """`text` to be written verbatim by a Go template: as a string constant where it holds
    the template's own delimiters (a preamble is read off a rendering, so it may)."""
    return "{{ " + json.dumps(text) + " }}" if "{{" in text or "}}" in text else text


@dataclass(frozen=True)
class Recognized:
    style: Style
    """The matching entry of STYLES, with the preamble the template writes, if any."""
    system: bool
    """The template renders a system prompt (else it refuses or drops one)."""
    default_system: str | None
    """What the template says as system prompt when the conversation has none."""
    drops_reasoning: bool = False
    """The template drops the reasoning of earlier answers, which the Go template cannot."""


def recognize(
    *, chat_template: str, tokenizer: Any, now: datetime | None = None
) -> Recognized | None:
    """The style whose rendering equals the template's on every probe (a BOS the template
    writes first is left out: llama.cpp and Ollama add it from the GGUF), or None. `now`: the
    clock the template's `strftime_now` reads (default: the present, frozen for all probes)."""
    clock = now or datetime.now()
    texts = {
        probe: _jinja(chat_template, tokenizer, _messages(probe), now=clock) for probe in PROBES
    }
    with_system = [p for p in PROBES if _has_system(p)]
    takes_system = all(texts[p] is not None for p in with_system) and any(
        texts[p] != texts.get(_without_system(p)) for p in with_system
    )
    for entry in STYLES:
        for style in _variants(entry, texts):
            found = _matches(style, texts, takes_system)
            if found is not None:
                text = _jinja(chat_template, tokenizer, _messages(REASONING_PROBE), now=clock)
                sent = _messages(REASONING_PROBE)
                if found.default_system is not None:  # as Ollama sends the Modelfile's SYSTEM
                    sent = [{"role": "system", "content": found.default_system}, *sent]
                want = render(style, sent, system=takes_system)
                return replace(found, drops_reasoning=text != want)
    return None


def _variants(style: Style, texts: dict) -> list[Style]:
    """`style` as written, and, for a style with a system turn, with the preamble read off the
    rendering of a conversation without system prompt (the system turn is then always written)."""
    if style.system is None:
        return [style]
    probe = next(p for p in PROBES if not _has_system(p))
    marked = render(replace(style, preamble=SYSTEM_MARK), _messages(probe))
    before, _, after = marked.partition(SYSTEM_MARK)
    text = texts[probe]
    if text is None or not (text.startswith(before) and text.endswith(after)):
        return [style]
    return [style, replace(style, preamble=text[len(before) : len(text) - len(after)])]


def _matches(style: Style, texts: dict, takes_system: bool) -> Recognized | None:
    default = None
    for probe, text in texts.items():
        if text is None and _has_system(probe) and not takes_system:
            continue  # the template refuses system prompts; so will the Go template
        messages = _messages(probe)
        if text is None:
            return None
        if text == render(style, messages, system=takes_system):
            continue
        if _has_system(probe) or not takes_system or style.preamble is not None:
            return None
        found = _default_system(style, messages, text)
        if found is None or default not in (None, found):
            return None
        default = found
    return Recognized(style=style, system=takes_system, default_system=default)


def _default_system(style: Style, messages: list[dict[str, str]], text: str) -> str | None:
    """The system prompt S with render(system S + messages) == text, if there is one."""
    marked = render(style, [{"role": "system", "content": SYSTEM_MARK}, *messages])
    before, _, after = marked.partition(SYSTEM_MARK)
    if not (text.startswith(before) and text.endswith(after)):
        return None
    found = text[len(before) : len(text) - len(after)]
    if not found or render(style, [{"role": "system", "content": found}, *messages]) != text:
        return None
    return found


def _messages(probe) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in probe]


def _has_system(probe) -> bool:
    return any(role == "system" for role, _ in probe)


def _without_system(probe):
    return tuple((r, c) for r, c in probe if r != "system")


def _jinja(
    template: str, tokenizer: Any, messages: list[dict[str, str]], *, now: datetime
) -> str | None:
    """The template's rendering with the generation prompt, less a leading BOS; None when the
    template refuses the conversation (raise_exception). The template's `strftime_now` reads
    `now` (transformers passes template variables as plain data only, so its clock is frozen
    instead of replaced)."""
    try:
        with frozen_clock(now):
            text = tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=True
            )
    except Exception:  # jinja's raise_exception: roles this template does not take
        return None
    bos = tokenizer.bos_token
    return text[len(bos) :] if bos and text.startswith(bos) else text


@contextlib.contextmanager
def frozen_clock(now: datetime):
    """transformers' `strftime_now` (datetime.now() in its chat-template module) at `now`."""
    from transformers.utils import chat_template_utils as ctu

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return now

    real = ctu.datetime
    ctu.datetime = Frozen
    try:
        yield
    finally:
        ctu.datetime = real


def modelfile(
    *,
    gguf_path: Path,
    chat_template: str | None,
    tokenizer: Any,
    eos_ids: list[int],
    now: datetime | None = None,
) -> tuple[str, str | None]:
    """The Modelfile for `gguf_path` (written beside it) and a one-line note when the chat
    template could not be translated, or was with a difference Ollama cannot avoid (None when
    it was translated exactly). `now`: as for `recognize`."""
    lines = [f"FROM ./{Path(gguf_path).name}"]
    note = None
    found = None
    if chat_template:
        found = recognize(chat_template=chat_template, tokenizer=tokenizer, now=now)
    if found is not None:
        lines.append(f'TEMPLATE """{go_template(found.style, system=found.system)}"""')
        if found.default_system is not None:
            lines.append(f'SYSTEM """{found.default_system}"""')
        if found.drops_reasoning:
            note = (
                "the chat template drops the reasoning (<think>...</think>) of earlier answers, "
                "which Ollama's Go templates cannot do: the Modelfile's TEMPLATE renders earlier "
                "answers as Ollama passes them back"
            )
    elif chat_template:
        note = (
            "the chat template matches none of the styles Ollama's templates are written for "
            f"here ({', '.join(s.name for s in STYLES)}): the Modelfile has no TEMPLATE; write "
            "one by hand, or Ollama renders prompts its default way"
        )
    else:
        note = "the model has no chat template: the Modelfile has no TEMPLATE"
    for i in dict.fromkeys(eos_ids):
        text = tokenizer.convert_ids_to_tokens(i)
        lines.append(f"PARAMETER stop {_quoted(text)}")
    return "\n".join(lines) + "\n", note


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
