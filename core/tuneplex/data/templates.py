"""Rendering examples to text and tokens, with loss masks taken from the rendering itself.

For a chat, each assistant turn's trained span is found by rendering the conversation up to the
turn with the generation prompt (where the answer starts) and up to and including the turn
(where it ends, end-of-turn token included, trailing whitespace not). Each rendering must be a
prefix of the full conversation, which is checked; nothing is searched for by marker strings,
so templates whose markers also occur elsewhere (Mistral's `[INST]`) mask exactly.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from tuneplex.data.spec import DataSpec
from tuneplex.errors import Problem, UsageError

IGNORE_INDEX = -100


class TemplateMismatch(Exception):
    """The chat template does not render conversation prefixes as prefixes of the whole."""


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]
    """[start, end) character ranges whose tokens are trained."""
    add_bos: bool
    add_eos: bool


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

    def render(self, fmt: str, example: dict[str, Any]) -> Rendered:
        if fmt == "chat":
            return self._chat(example["messages"], example.get("tools"))
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

    def _chat(self, messages, tools) -> Rendered:
        if self.mode == "none":
            raise UsageError(
                Problem(
                    "dataset",
                    "rows with messages need a chat template; set "
                    "dataset.apply_chat_template: true (unsloth) or give the rows a text field",
                )
            )
        if self.mode == "passthrough":
            text, spans = "", []
            for m in messages:
                content = m.get("content") or ""
                if m["role"] == "assistant":
                    spans.append((len(text), len(text) + len(content)))
                text += content
            return Rendered(text, spans, False, False)
        if self.template is None:
            raise UsageError(
                Problem(
                    "dataset",
                    "the tokenizer has no chat template; set "
                    "dataset.prompt_template (a Jinja template) or use passthrough",
                )
            )
        full = self._render_chat(messages, tools, generation=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start_text = self._start_of_turn(messages[:i], tools, full)
            upto = (
                full
                if i == len(messages) - 1
                else self._render_chat(messages[: i + 1], tools, generation=False)
            )
            if not (full.startswith(upto) and upto.startswith(start_text)):
                raise TemplateMismatch(i)
            start, end = len(start_text), len(upto)
            while end > start and upto[end - 1].isspace():
                end -= 1
            spans.append((start, end))
        return Rendered(full, spans, False, False)

    def _start_of_turn(self, history, tools, full: str) -> str:
        """The rendering that ends where the next assistant answer starts."""
        try:
            return self._render_chat(history, tools, generation=True)
        except Exception:
            if history:
                raise
            # a template that cannot render an empty conversation: the answer starts after
            # whatever special tokens (BOS) open the text
            return full[: _leading_specials(full, self.tok)]

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
