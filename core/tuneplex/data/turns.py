"""Where each assistant turn lies in the one rendering of a whole conversation that is trained on.

A turn's trained span starts where the template's generation prompt for it ends (what a chat
client renders before the model answers) and ends after the text that closes the turn, its
end-of-turn token; the separator after it and whatever the template appends after the whole
conversation (Phi's trailing eos) are not trained.

Both ends come from renderings of the conversation cut at the turn: with the generation prompt
(the start) and through the turn (the end). Where such a rendering is a prefix of the whole, its
length is the answer: most templates, most rows, two renderings per turn. Where a template
renders a cut conversation differently (Qwen3 keeps reasoning only after the last user message;
Mistral puts the system prompt and the tool list into the last user message; DeepSeek-R1 leaves
out a header), the two renderings are aligned instead: a private-use character appended to every
message (an anchor) marks where each message ends in every rendering, and the text that follows
the nearest anchor is compared. Template markers are never searched for: message text may hold
them (`[INST]` in a user message), and only an anchor is known to come from one message.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

# private use areas (supplementary A and B): no text is written there, but should a row hold
# one of their characters, the other is used
ANCHOR_PLANES = (0xF0000, 0x100000)
ANCHORS_PER_PLANE = 0xFFFE


class Anchors:
    """One private use plane's characters, one per message."""

    def __init__(self, base: int):
        self.base = base
        self.pattern = re.compile(f"[{chr(base)}-{chr(base + ANCHORS_PER_PLANE - 1)}]")

    def mark(self, k: int) -> str:
        return chr(self.base + k)


Render = Callable[[list, bool], str]
"""render(messages, add_generation_prompt) -> text, with the row's tools already bound."""


class TurnNotFound(Exception):
    """The template renders this assistant turn in a way no span of the whole can describe."""

    def __init__(self, turn: int, why: str):
        super().__init__(turn, why)
        self.turn, self.why = turn, why


class Boundaries:
    """Snaps a character position back so it never splits an added token (`<|end|>`)."""

    def __init__(self, tokens: Sequence[str]):
        self.tokens = sorted({t for t in tokens if len(t) > 1}, key=len, reverse=True)

    def snap(self, text: str, pos: int) -> int:
        for t in self.tokens:
            at = text.find(t, max(0, pos - len(t) + 1), pos + len(t) - 1)
            if 0 <= at < pos:
                return self.snap(text, at)
        return pos

    def common(self, a: str, b: str) -> int:
        """Length of the common prefix of a and b, never ending inside an added token of either
        (`...<|end|>\\n<|endoftext|>` and `...<|end|>\\n<|assistant|>` share `...<|end|>\\n`)."""
        n = len(os.path.commonprefix([a, b]))  # noqa: RUF071 (characters are meant)
        while True:
            m = self.snap(b, self.snap(a, n))
            if m == n:
                return n
            n = m


def appendix(render: Render, probe: list, bounds: Boundaries) -> str:
    """What the template appends after a whole conversation but not before a generation prompt
    (Phi's eos), found on a probe conversation that ends with an assistant answer."""
    whole = render(probe, False)
    prompted = render(probe, True)
    if prompted.startswith(whole):
        return ""
    n = bounds.common(whole, prompted)
    answer = probe[-1]["content"]
    return whole[n:] if answer in whole[:n] else ""


def body_length(text: str, tail: str) -> int:
    return len(text) - len(tail) if tail and text.endswith(tail) else len(text)


def with_anchor(message: dict[str, Any], mark: str, *, middle: bool = False) -> dict[str, Any]:
    """The message with `mark` after its text (its content, or the name of its last tool call),
    before any trailing whitespace (which templates strip); with `middle`, before the first
    whitespace inside the content instead (for templates that test how a content ends)."""
    content = message.get("content")
    if isinstance(content, str) and content.strip():
        if middle:
            inner = re.search(r"\S\s", content)
            if inner is None:
                return message
            at = inner.start() + 1
        else:
            at = len(content.rstrip())
        return {**message, "content": content[:at] + mark + content[at:]}
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls and isinstance(calls[-1], dict):
        call = dict(calls[-1])
        fn = call.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            call["function"] = {**fn, "name": fn["name"] + mark}
        elif isinstance(call.get("name"), str):
            call["name"] = call["name"] + mark
        else:
            return message
        return {**message, "tool_calls": [*calls[:-1], call]}
    return message


def read_anchors(rendered: str, expected: str, anchors: Anchors) -> dict[int, int] | None:
    """{message index: where its anchor stood in `expected`}, if the anchored rendering is
    `expected` with anchors added (else the anchors changed what the template renders)."""
    found: dict[int, int] = {}
    removed = 0
    for m in anchors.pattern.finditer(rendered):
        found[ord(m.group()) - anchors.base] = m.start() - removed
        removed += 1
    if not removed or len(rendered) - removed != len(expected):
        return None
    if anchors.pattern.sub("", rendered) != expected:
        return None
    return found


class Aligner:
    """Locates the ends of assistant turns in the whole rendering through message anchors.

    Anchors go after every message's text; where that changes what the template renders (it
    tests how a content ends, as Qwen3 does for tool responses), inside it; failing that, on
    the assistant messages only. A cut rendering is read with the first placement that leaves
    both it and the whole rendering as they are."""

    PLACEMENTS = (("all", False), ("all", True), ("assistant", False))

    def __init__(self, render: Render, messages: list, whole: str, bounds: Boundaries):
        self.render, self.messages, self.whole, self.bounds = render, messages, whole, bounds
        self._placed: dict[int, tuple[list, dict[int, int]] | None] = {}
        free = [Anchors(b) for b in ANCHOR_PLANES if not Anchors(b).pattern.search(whole)]
        self.anchors = free[0] if free else None
        self.usable = self.anchors is not None and len(messages) <= ANCHORS_PER_PLANE

    def _placement(self, n: int) -> tuple[list, dict[int, int]] | None:
        """(anchored messages, {message: anchor position in the whole}) for placement n."""
        if n not in self._placed:
            who, middle = self.PLACEMENTS[n]
            marked = list(self.messages)
            for k, m in enumerate(self.messages):
                if who == "all" or _is_bot(m):
                    marked[k] = with_anchor(m, self.anchors.mark(k), middle=middle)
            found = read_anchors(self.render(marked, False), self.whole, self.anchors)
            self._placed[n] = (marked, found) if found else None
        return self._placed[n]

    def _align(self, upto: int, generation: bool, cut: str, body: int, last: int) -> int | None:
        """Where the text after the nearest common anchor (message <= last) in `cut` (messages
        before `upto`) stops matching the whole rendering."""
        if not self.usable:
            return None
        best = None  # (message, its anchor in cut, in whole): the nearest one wins
        for n in range(len(self.PLACEMENTS)):
            placed = self._placement(n)
            if placed is None:
                continue
            marked, in_whole = placed
            anchors = read_anchors(self.render(marked[:upto], generation), cut, self.anchors)
            if not anchors:
                continue
            k = max((k for k in anchors if k <= last and k in in_whole), default=None)
            if k is not None and (best is None or k > best[0]):
                best = (k, anchors[k], in_whole[k])
                if k == last:
                    break
        if best is None:
            return None
        _, a, b = best
        return b + self.bounds.common(cut[a:body], self.whole[b:])

    def start(self, turn: int, head: str) -> int:
        """End of the generation prompt before `turn`; `head` renders the messages before it."""
        at = self._align(turn, True, head, len(head), turn - 1) if turn else None
        if at is not None:
            return at
        at = self.bounds.common(head, self.whole)
        if at < self.floor(turn):
            raise TurnNotFound(turn, "its start cannot be located")
        return at

    def end(self, turn: int, start: int, cut: str, cut_body: int) -> int:
        """End of `turn`; `cut` renders the conversation through it (`cut_body`: without what is
        appended after a whole conversation)."""
        at = self._align(turn + 1, False, cut, cut_body, turn)
        if at is not None:
            return at
        at = self.bounds.common(cut[:cut_body], self.whole)
        if at <= start and not self.left_out(turn):
            raise TurnNotFound(turn, "its end cannot be located")
        return at

    def _in_whole(self) -> dict[int, int]:
        for n in range(len(self.PLACEMENTS)):
            placed = self._placement(n) if self.usable else None
            if placed is not None:
                return placed[1]
        return {}

    def left_out(self, turn: int) -> bool:
        """The template renders nothing of this message (its anchor is not in the whole)."""
        found = self._in_whole()
        return bool(found) and turn not in found

    def floor(self, turn: int) -> int:
        """Where the last message rendered before `turn` ends: nothing of the turn is earlier."""
        found = self._in_whole()
        own = found.get(turn, len(self.whole))
        return max((v for k, v in found.items() if k < turn and v <= own), default=0)


def _is_bot(message: dict[str, Any]) -> bool:
    return message.get("role") == "assistant"


def locate(
    render: Render,
    messages: list,
    whole: str,
    *,
    tail: str,
    bounds: Boundaries,
    opening: Callable[[], int],
) -> list[tuple[int, int]]:
    """[start, end) of every assistant turn's trained text in `whole`. `opening()`: how much of
    `whole` precedes everything (BOS), for an assistant turn that opens the conversation."""
    body = body_length(whole, tail)
    aligner: Aligner | None = None
    spans: list[tuple[int, int]] = []
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if not _is_bot(message):
            continue
        try:
            head = render(messages[:i], True)
        except Exception:
            if i:
                raise
            head = whole[: opening()]  # a template that cannot render an empty conversation
        if whole.startswith(head) and len(head) <= body:
            start = len(head)
        else:
            aligner = aligner or Aligner(render, messages, whole, bounds)
            start = aligner.start(i, head)
        if i == last:
            end = body
        else:
            cut = render(messages[: i + 1], False)
            cut_body = body_length(cut, tail)
            if whole.startswith(cut[:cut_body]):
                end = cut_body
            else:
                aligner = aligner or Aligner(render, messages, whole, bounds)
                end = aligner.end(i, start, cut, cut_body)
        while end > start and whole[end - 1].isspace():
            end -= 1
        if end < start and aligner is not None and aligner.left_out(i):
            end = start  # the template leaves this turn out: nothing of it to train
        if end < start or (spans and start < spans[-1][1]):
            raise TurnNotFound(i, "its end cannot be located")
        spans.append((start, end))
    return spans


def dropped(
    messages: list, tools: list | None, whole: str, spans: list[tuple[int, int]]
) -> set[str]:
    """What the template leaves out of the rendering: `system messages`, `assistant reasoning`,
    `tool calls`, `tool definitions`, ... (text of the row that does not appear in it; for an
    assistant message, not inside its own turn's span)."""
    kinds: set[str] = set()
    turns = iter(spans)
    for m in messages:
        role = m.get("role")
        where = whole
        if role == "assistant":
            start, end = next(turns, (0, 0))
            where = whole[start:end]
        content = m.get("content")
        if isinstance(content, str):
            if role == "assistant" and "</think>" in content:
                thought, _, content = content.rpartition("</think>")
                if not _appears(thought.split("<think>")[-1], where):
                    kinds.add("assistant reasoning")
            if not _appears(content, where):
                kinds.add(f"{role} messages")
        reasoning = m.get("reasoning_content")
        if isinstance(reasoning, str) and not _appears(reasoning, where):
            kinds.add("assistant reasoning")
        for call in m.get("tool_calls") or ():
            name = _call_name(call)
            if name and name not in where:
                kinds.add("tool calls")
    for tool in tools or ():
        name = _call_name(tool)
        if name and name not in whole:
            kinds.add("tool definitions")
    return kinds


def _appears(text: str, whole: str) -> bool:
    text = text.strip()
    if not text or text in whole:
        return True
    return json.dumps(text, ensure_ascii=False)[1:-1] in whole  # as tojson writes it


def _call_name(call: Any) -> str | None:
    if not isinstance(call, dict):
        return None
    fn = call.get("function")
    name = fn.get("name") if isinstance(fn, dict) else call.get("name")
    return name if isinstance(name, str) and name else None
