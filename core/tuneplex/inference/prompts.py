"""Prompts rendered exactly as training rendered them, and where a model's answer stops.

One `Encoder` (the training pipeline's) renders every prompt: a run's job decides the template
(the tokenizer's chat template, `dataset.prompt_template`, passthrough); a row of any training
format gives what training put before its answer, and keeps the answer as the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tuneplex.data import formats, sources
from tuneplex.data.spec import DataSpec
from tuneplex.data.templates import Encoder, prompt_text
from tuneplex.errors import Problem, UsageError, first_line

FILE_KEY = "--file"


@dataclass(frozen=True)
class Prompt:
    text: str
    """The prompt as the user wrote it (a row's last user message, or its prompt)."""
    ids: list[int]
    """The rendered prompt's token ids, ending with the generation prompt."""
    reference: str | None = None
    """The row's own answer, when it has one."""
    where: str | None = None
    """`file:line` of a row."""
    row: Mapping[str, Any] = field(default_factory=dict)
    """A file row as read: its other columns are what a reward function is given."""


@dataclass(frozen=True)
class Stop:
    """Where generation ends: any of these token ids (not printed), or any of these strings
    (cut off) for an end of turn that is not one token."""

    token_ids: tuple[int, ...]
    strings: tuple[str, ...] = ()


class Prompter:
    """Renders prompts for one tokenizer and one way of rendering (a DataSpec's)."""

    def __init__(self, tokenizer: Any, spec: DataSpec):
        self.tok = tokenizer
        self.spec = spec
        self.encoder = Encoder(tokenizer, spec)
        self.encoder.calibrate([])  # what the template appends after a whole conversation
        self.stop = stop_of(self.encoder, tokenizer)

    @property
    def chat(self) -> bool:
        """Whether prompts are chats (a template renders turns) rather than plain text."""
        return self.encoder.template is not None or self.encoder.mode == "passthrough"

    def encode(self, fmt: str, example: dict[str, Any], *, where: str = "prompt") -> list[int]:
        try:
            return self.encoder.prompt_ids(fmt, example)
        except UsageError:
            raise
        except Exception as exc:  # jinja's raise_exception and friends
            raise UsageError(Problem(where, f"chat template error: {first_line(exc)}")) from None

    def from_text(self, text: str, *, system: str | None = None) -> Prompt:
        """A prompt typed by the user: one user turn (after a system turn), or the text itself
        where training rendered no chat."""
        if not self.chat:
            if system is not None:
                raise UsageError(
                    Problem("--system", "this model is prompted with plain text (no chat template)")
                )
            return Prompt(text=text, ids=self.encode("prompt_completion", {"prompt": text}))
        messages = [{"role": "user", "content": text}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        where = "--system" if system is not None else "prompt"
        return Prompt(text=text, ids=self.encode("chat", {"messages": messages}, where=where))

    def from_messages(self, messages: list[dict[str, Any]], tools=None) -> list[int]:
        """The ids of a whole conversation so far, ready for the next answer (`chat`)."""
        return self.encode("chat", {"messages": messages, "tools": tools})

    def from_file(self, path: str | Path) -> list[Prompt]:
        """Every row of a data file in a training format as a prompt with its reference."""
        return self.from_rows(path, read_file_rows(path, key=FILE_KEY), key=FILE_KEY)

    def from_rows(self, path: str | Path, rows: list, *, key: str) -> list[Prompt]:
        """`rows` of the file `path` (as `read_file_rows` gives them) as prompts; rows that
        cannot be used are reported together, `file:line` each, under `key`."""
        spec = replace(self.spec, train=str(path), train_key=key)
        prompts: list[Prompt] = []
        problems: list[Problem] = []
        for where, row in rows:
            if isinstance(row, Problem):
                problems.append(row)
                continue
            try:
                prompts.append(replace(self._row(where, row, spec), row=row))
            except UsageError as exc:
                problems.append(exc.problems[0])
        if problems:
            from tuneplex.data.pipeline import report_problems

            raise UsageError(report_problems(key, problems, len(rows)))
        return prompts

    def _row(self, where: str, row: dict[str, Any], spec: DataSpec) -> Prompt:
        fmt, example, answer = formats.prompt_of(row, where, spec)
        return Prompt(
            text=prompt_text(fmt, example),
            ids=self.encode(fmt, example, where=where),
            reference=answer,
            where=where,
        )


def stop_of(encoder: Encoder, tok: Any) -> Stop:
    """The end-of-sequence token, and the end-of-turn token(s) training taught: a turn's end
    that is one token stops on that token, a longer one on its text."""
    ids: list[int] = [tok.eos_token_id] if tok.eos_token_id is not None else []
    strings: list[str] = []
    end = (encoder.turn_end() or "").strip()
    if end:
        found = tok.backend_tokenizer.encode(end, add_special_tokens=False).ids
        added = set(getattr(tok, "added_tokens_decoder", {}))
        if len(found) == 1 or found[0] in added:  # `<|end|>`, also when more follows it
            ids.append(found[0])
        else:
            strings.append(end)
    return Stop(token_ids=tuple(dict.fromkeys(ids)), strings=tuple(strings))


def read_file_rows(path: str | Path, *, key: str) -> list:
    """A command's data file as the pipeline reads it: `[(file:line, row or Problem)]`, read
    once for everything a command does with it; an empty file is refused under `key`."""
    rows = sources.read_rows(sources.resolve(str(path), key=key), key=key)
    if not rows:
        raise UsageError(Problem(key, f"{path}: no rows"))
    return rows
