"""An Ollama Modelfile beside a GGUF file: FROM, TEMPLATE in Ollama's Go-template syntax,
SYSTEM for a template's default system prompt, and PARAMETER stop for each end of turn.

The chat template is recognized by what it renders, never by its source: probe conversations
go through the Jinja template and the results are compared with each known style's rendering.
A style is data (the text around each role's turn, where the system prompt goes); its Python
rendering and its Go template are both made from that one entry, so they cannot drift apart.
A template that matches no style still gets FROM and the stop parameters, and a plain note.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYSTEM_MARK = "\ue000"
"""A private-use character standing for the system prompt while a default one is found."""


@dataclass(frozen=True)
class Style:
    name: str
    user: tuple[str, str]
    """Text before and after a user turn."""
    assistant: tuple[str, str]
    """Text before and after an assistant turn; the text before is the generation prompt."""
    system: tuple[str, str] | None = None
    """Text around a system turn of its own, or None when the system prompt is put at the
    start of the first user turn followed by `joiner` (Gemma) or is not supported."""
    joiner: str | None = None


STYLES = (
    Style(
        "ChatML",
        user=("<|im_start|>user\n", "<|im_end|>\n"),
        assistant=("<|im_start|>assistant\n", "<|im_end|>\n"),
        system=("<|im_start|>system\n", "<|im_end|>\n"),
    ),
    Style(
        "Llama 3",
        user=("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
        assistant=("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
        system=("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
    ),
    Style("Mistral [INST]", user=("[INST] ", " [/INST]"), assistant=("", "</s>")),
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
        "Granite",
        user=("<|start_of_role|>user<|end_of_role|>", "<|end_of_text|>\n"),
        assistant=("<|start_of_role|>assistant<|end_of_role|>", "<|end_of_text|>\n"),
        system=("<|start_of_role|>system<|end_of_role|>", "<|end_of_text|>\n"),
    ),
)

PROBES: tuple[tuple[tuple[str, str], ...], ...] = (
    (("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello!"), ("user", "Why?")),
    (("user", "Hi there"), ("assistant", "Hello!"), ("user", "Why?")),
    (("user", "What is two?"),),
    (("system", "Be brief."), ("user", "What is two?")),
)
"""Conversations as Ollama renders them: ending with a user turn and the generation prompt."""


def render(style: Style, messages: list[dict[str, str]], *, system: bool = True) -> str:
    """`messages` as `style` renders them with the generation prompt (the reference the Go
    template is checked against). `system=False`: the template takes no system prompt."""
    sys_text = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out, first_user = [], True
    if system and sys_text and style.system is not None:
        out.append(style.system[0] + sys_text + style.system[1])
    for m in messages:
        if m["role"] == "user":
            lead = sys_text + style.joiner if system and sys_text and style.joiner else ""
            out.append(style.user[0] + (lead if first_user else "") + m["content"] + style.user[1])
            first_user = False
        elif m["role"] == "assistant":
            out.append(style.assistant[0] + m["content"] + style.assistant[1])
    return "".join(out) + style.assistant[0]


def go_template(style: Style, *, system: bool = True) -> str:
    """`style` in Ollama's Go-template syntax over .System and .Messages (Ollama passes system
    messages both ways: joined in .System, and in .Messages, where no branch prints them)."""
    u0, u1 = style.user
    a0, a1 = style.assistant
    head = lead = ""
    if system and style.system is not None:
        head = "{{ if .System }}" + style.system[0] + "{{ .System }}" + style.system[1]
        head += "{{ end }}"
    elif system and style.joiner is not None:  # into the first user turn
        head = "{{ $first := true }}"
        lead = "{{ if and $first $.System }}{{ $.System }}" + style.joiner + "{{ end }}"
        lead += "{{ $first = false }}"
    return (
        head
        + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        + '{{ if eq .Role "user" }}'
        + (u0 + lead + "{{ .Content }}" + u1 + "{{ if $last }}" + a0 + "{{ end }}")
        + '{{ else if eq .Role "assistant" }}'
        + (a0 + "{{ .Content }}{{ if not $last }}" + a1 + "{{ end }}")
        + "{{ end }}{{ end }}"
    )


@dataclass(frozen=True)
class Recognized:
    style: Style
    system: bool
    """The template renders a system prompt (else it refuses or drops one)."""
    default_system: str | None
    """What the template says as system prompt when the conversation has none."""


def recognize(*, chat_template: str, tokenizer: Any) -> Recognized | None:
    """The style whose rendering equals the template's on every probe (a BOS the template
    writes first is left out: llama.cpp and Ollama add it from the GGUF), or None."""
    texts = {
        probe: _jinja(chat_template, tokenizer, [{"role": r, "content": c} for r, c in probe])
        for probe in PROBES
    }
    with_system = [p for p in PROBES if _has_system(p)]
    takes_system = all(texts[p] is not None for p in with_system) and any(
        texts[p] != texts.get(_without_system(p)) for p in with_system
    )
    for style in STYLES:
        found = _matches(style, texts, takes_system)
        if found is not None:
            return found
    return None


def _matches(style: Style, texts: dict, takes_system: bool) -> Recognized | None:
    default = None
    for probe, text in texts.items():
        if text is None and _has_system(probe) and not takes_system:
            continue  # the template refuses system prompts; so will the Go template
        messages = [{"role": r, "content": c} for r, c in probe]
        if text is None:
            return None
        if text == render(style, messages, system=takes_system):
            continue
        if _has_system(probe) or not takes_system:
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


def _has_system(probe) -> bool:
    return any(role == "system" for role, _ in probe)


def _without_system(probe):
    return tuple((r, c) for r, c in probe if r != "system")


def _jinja(template: str, tokenizer: Any, messages: list[dict[str, str]]) -> str | None:
    """The template's rendering with the generation prompt, less a leading BOS; None when the
    template refuses the conversation (raise_exception)."""
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except Exception:  # jinja's raise_exception: roles this template does not take
        return None
    bos = tokenizer.bos_token
    return text[len(bos) :] if bos and text.startswith(bos) else text


def modelfile(
    *,
    gguf_path: Path,
    chat_template: str | None,
    tokenizer: Any,
    eos_ids: list[int],
) -> tuple[str, str | None]:
    """The Modelfile for `gguf_path` (written beside it) and a one-line note when the chat
    template could not be translated (None when it was)."""
    lines = [f"FROM ./{Path(gguf_path).name}"]
    note = None
    found = recognize(chat_template=chat_template, tokenizer=tokenizer) if chat_template else None
    if found is not None:
        lines.append(f'TEMPLATE """{go_template(found.style, system=found.system)}"""')
        if found.default_system is not None:
            lines.append(f'SYSTEM """{found.default_system}"""')
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
