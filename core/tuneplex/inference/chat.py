"""A multi-turn conversation with a model: the whole history rendered with the template each
turn, as training rendered conversations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tuneplex.errors import Problem, UsageError
from tuneplex.inference.engine import Generator, Sampling
from tuneplex.inference.prompts import Prompter

COMMANDS = "/reset, /system TEXT, /exit"


class Conversation:
    def __init__(
        self,
        prompter: Prompter,
        generator: Generator,
        *,
        sampling: Sampling,
        system: str | None = None,
    ):
        self.prompter, self.generator, self.sampling = prompter, generator, sampling
        self.system = system
        self.turns: list[dict[str, Any]] = []

    @property
    def messages(self) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def command(self, line: str) -> bool:
        """Whether `line` was a command (and did it); `/exit` raises EOFError."""
        text = line.strip()
        if not text.startswith("/"):
            return False
        name, _, rest = text.partition(" ")
        if name == "/exit":
            raise EOFError
        if name == "/reset":
            self.turns = []
        elif name == "/system":
            self.system = rest.strip() or None
            self.turns = []
        else:
            raise UsageError(Problem(name, f"unknown command; commands: {COMMANDS}"))
        return True

    def reply(self, text: str, *, on_text: Callable[[str], None] | None = None) -> str:
        """The model's answer to one more user message (streamed to `on_text` when given)."""
        self.turns.append({"role": "user", "content": text})
        ids = self.prompter.from_messages(self.messages)
        if on_text is None:
            answer = self.generator.generate([ids], self.sampling, batch_size=1)[0]
        else:
            answer = self.generator.stream(ids, self.sampling, on_text=on_text)
        self.turns.append({"role": "assistant", "content": answer.text})
        return answer.text

    def drop_last(self) -> None:
        """Forget an exchange that was interrupted."""
        while self.turns and self.turns[-1]["role"] == "assistant":
            self.turns.pop()
        if self.turns and self.turns[-1]["role"] == "user":
            self.turns.pop()
