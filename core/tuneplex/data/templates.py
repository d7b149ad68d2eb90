"""Rendering examples to text and tokens, with loss masks taken from the rendering itself.

A chat is rendered once, as the model trains on it; `turns.locate` finds each assistant turn's
span in that text (see there how, without searching for marker strings), and the tokens that
hold any of its characters are trained. Character offsets need a fast (Rust) tokenizer.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from tuneplex.data import turns
from tuneplex.data.spec import DataSpec
from tuneplex.data.targets import IGNORE_INDEX
from tuneplex.errors import Problem, UsageError

PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]
    """[start, end) character ranges whose tokens are trained."""
    add_bos: bool
    add_eos: bool
    dropped: frozenset[str] = frozenset()
    """What the template left out of the rendering (`system messages`, ...)."""


class Encoder:
    """Turns normalised examples into (input_ids, labels) with one tokenizer and template."""

    def __init__(self, tokenizer: Any, spec: DataSpec):
        self.tok = tokenizer
        mode = spec.chat_template
        if mode in ("tokenizer", "passthrough", "none"):
            self.mode = mode
            self.template = tokenizer.chat_template if mode == "tokenizer" else None
        else:
            self.mode, self.template = "custom", mode
        if not getattr(tokenizer, "is_fast", False):
            raise UsageError(
                Problem(
                    "model",
                    "the tokenizer has no fast (Rust) implementation; exact loss "
                    "masks need character offsets",
                )
            )
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos_id = bos if bos is not None and probe and probe[0] == bos else None
        self.eos_id = tokenizer.eos_token_id
        self._fast = None
        self._template_vars = dict(tokenizer.special_tokens_map)
        added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
        self.bounds = turns.Boundaries([*added, *tokenizer.all_special_tokens])
        self.appendix = ""
        """What the template appends after a whole conversation (Phi's eos): never trained."""

    # -- rendering ---------------------------------------------------------------------
    def _render_chat(self, messages, tools, *, generation: bool) -> str:
        if self._fast is not None:
            return self._fast.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=generation,
                **self._template_vars,
            )
        return self._render_public(messages, tools, generation=generation)

    def _render_public(self, messages, tools, *, generation: bool) -> str:
        return self.tok.apply_chat_template(
            messages,
            tools=tools,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=generation,
        )

    def calibrate(self, samples: list[tuple[str, dict[str, Any]]]) -> None:
        """Use the compiled template directly (about twice as fast) only if it renders these
        samples exactly as `apply_chat_template` does; otherwise keep the public path."""
        self._fast = None
        self._find_appendix(samples)
        if self.template is None or self.mode in ("passthrough", "none"):
            return
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            fast = _compile_jinja_template(self.template)
        except Exception:
            return
        chats = [e for f, e in samples if f == "chat"][:8]
        try:
            for ex in chats:
                for gen in (False, True):
                    expected = self._render_public(ex["messages"], ex.get("tools"), generation=gen)
                    got = fast.render(
                        messages=ex["messages"],
                        tools=ex.get("tools"),
                        add_generation_prompt=gen,
                        **self._template_vars,
                    )
                    if got != expected:
                        return
        except Exception:
            return
        if chats:
            self._fast = fast

    def _find_appendix(self, samples: list[tuple[str, dict[str, Any]]]) -> None:
        self.appendix = ""
        if self.template is None or self.mode in ("passthrough", "none"):
            return
        ends_answered = [
            e["messages"]
            for f, e in samples
            if f == "chat"
            and e["messages"][-1]["role"] == "assistant"
            and e["messages"][-1].get("content")
        ]
        probes = [PROBE, *ends_answered[:4]]
        for probe in probes:
            try:
                self.appendix = turns.appendix(self._renderer(None), probe, self.bounds)
                return
            except Exception:
                continue

    def render(self, fmt: str, example: dict[str, Any]) -> Rendered:
        if fmt == "chat":
            return self._chat(
                example["messages"], example.get("tools"), example.get("trained_from", 0)
            )
        if fmt == "text":
            text = example["text"]
            return Rendered(text, [(0, len(text))], self.bos_id is not None, True)
        prompt, completion = example["prompt"], example["completion"]
        if self.template is not None:  # a chat template is at hand: render as a two-turn chat
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": completion},
            ]
            return self._chat(messages, None)
        text = prompt + completion
        return Rendered(text, [(len(prompt), len(text))], self.bos_id is not None, True)

    def prompt(self, fmt: str, example: dict[str, Any]) -> tuple[str, bool]:
        """(the text a model is given to answer `example`, whether BOS goes first): what
        training rendered before the answer it trained — a chat (already cut before its
        answer) with the generation prompt, a prompt as the user turn of a two-turn chat when a
        template is at hand, else the prompt (or text) itself."""
        if fmt == "chat":
            self._check_chat()
            if self.mode == "passthrough":
                return "".join(m.get("content") or "" for m in example["messages"]), False
            return self._render_chat(
                example["messages"], example.get("tools"), generation=True
            ), False
        if fmt == "text":
            return example["text"], self.bos_id is not None
        if self.template is not None:
            user = [{"role": "user", "content": example["prompt"]}]
            return self._render_chat(user, None, generation=True), False
        return example["prompt"], self.bos_id is not None

    def prompt_ids(self, fmt: str, example: dict[str, Any]) -> list[int]:
        """`prompt`'s text as token ids (BOS first where training put one)."""
        text, bos = self.prompt(fmt, example)
        ids = self.tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else list(ids)

    def turn_end(self) -> str | None:
        """The text training put after an answer and trained (`<|im_end|>`, `<|eot_id|>`): what
        a model emits when its turn is done. None when an end-of-sequence token is appended
        instead (text and prompt/completion rows without a template); "" when nothing is
        (passthrough chats)."""
        if self.template is None and self.mode != "passthrough":
            return None
        answer = PROBE[-1]["content"]
        rendered = self._chat(PROBE, None)
        start, end = rendered.spans[-1]
        at = rendered.text.find(answer, start, end)
        return rendered.text[at + len(answer) : end] if at >= 0 else ""

    def _check_chat(self) -> None:
        if self.mode == "none":
            raise UsageError(
                Problem(
                    "dataset",
                    "rows with messages need a chat template; set "
                    "dataset.apply_chat_template: true (unsloth) or give the rows a text field",
                )
            )
        if self.mode != "passthrough" and self.template is None:
            raise UsageError(
                Problem(
                    "dataset",
                    "the tokenizer has no chat template; set "
                    "dataset.prompt_template (a Jinja template) or use passthrough",
                )
            )

    def _chat(self, messages, tools, trained_from: int = 0) -> Rendered:
        """Trains the assistant turns at message index `trained_from` or later (a preference
        pair's side after its prompt; 0: all of them)."""
        self._check_chat()
        if self.mode == "passthrough":
            text, spans = "", []
            for i, m in enumerate(messages):
                content = m.get("content") or ""
                if m["role"] == "assistant" and i >= trained_from:
                    spans.append((len(text), len(text) + len(content)))
                text += content
            return Rendered(text, spans, False, False)
        full = self._render_chat(messages, tools, generation=False)
        spans = turns.locate(
            self._renderer(tools),
            messages,
            full,
            tail=self.appendix,
            bounds=self.bounds,
            opening=lambda: _leading_specials(full, self.tok),
        )
        drops = frozenset(turns.dropped(messages, tools, full, spans))
        if trained_from:  # one span per assistant message, in order
            turn_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            spans = [s for i, s in zip(turn_at, spans, strict=True) if i >= trained_from]
        return Rendered(full, spans, False, False, drops)

    def _renderer(self, tools) -> turns.Render:
        def render(messages: list, generation: bool) -> str:
            return self._render_chat(messages, tools, generation=generation)

        return render

    # -- tokenizing --------------------------------------------------------------------
    def encode_many(self, rendered: list[Rendered]):
        """Tokenize a batch at once and build labels; returns (ids, labels) int32 arrays."""
        import numpy as np

        # the Rust tokenizer directly: same tokens as tokenizer(...), without the per-row
        # conversion to Python dicts
        encodings = self.tok.backend_tokenizer.encode_batch(
            [r.text for r in rendered], add_special_tokens=False
        )
        out = []
        for r, enc in zip(rendered, encodings, strict=True):
            ids = np.asarray(enc.ids, dtype=np.int32)
            offsets = enc.offsets
            labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
            for a, b in r.spans:
                # a token is trained if it holds any answer character (the model must emit it);
                # offsets never decrease, so two binary searches find the range
                lo = bisect.bisect_right(offsets, a, key=_end)
                hi = bisect.bisect_left(offsets, b, lo=lo, key=_start)
                labels[lo:hi] = ids[lo:hi]
            if r.add_bos:
                ids = np.concatenate([[self.bos_id], ids]).astype(np.int32)
                labels = np.concatenate([[IGNORE_INDEX], labels]).astype(np.int32)
            if r.add_eos and self.eos_id is not None and (len(ids) == 0 or ids[-1] != self.eos_id):
                ids = np.append(ids, np.int32(self.eos_id))
                labels = np.append(labels, np.int32(self.eos_id))
            out.append((ids, labels))
        return out


def _start(offset: tuple[int, int]) -> int:
    return offset[0]


def _end(offset: tuple[int, int]) -> int:
    return offset[1]


def _leading_specials(text: str, tok: Any) -> int:
    """Length of the special tokens (BOS and the like) a template puts before everything."""
    pos = 0
    specials = sorted((t for t in tok.all_special_tokens if t), key=len, reverse=True)
    moved = True
    while moved:
        moved = False
        for t in specials:
            if text.startswith(t, pos):
                pos += len(t)
                moved = True
                break
    return pos


def prompt_text(fmt: str, example: dict[str, Any]) -> str:
    """What the user wrote of a prompt example: a chat's last user message, else its prompt
    (or text)."""
    if fmt == "chat":
        users = [m.get("content") or "" for m in example["messages"] if m["role"] == "user"]
        return users[-1] if users else ""
    return example.get("prompt", example.get("text", ""))
