"""Helpers shared by the training tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import json
import random

import yaml
from tuneplex.cli import main
from tuneplex.runs import read_metrics


def chat_rows(n: int, *, seed: int = 0) -> list[dict]:
    """A small 'reverse the words' chat task over the tiny tokenizer's vocabulary."""
    from tuneplex.tiny import WORDS

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS[:30]) for _ in range(rng.randint(3, 6))]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "Reverse: " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(reversed(words))},
                ]
            }
        )
    return rows


def write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def merge_yaml(base: str, extra: str) -> str:
    """`base` with the top-level sections of `extra` merged in (one level deep)."""
    doc = yaml.safe_load(base)
    for key, value in (yaml.safe_load(extra) or {}).items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key].update(value)
        else:
            doc[key] = value
    return yaml.safe_dump(doc)


def train(capsys, *args) -> tuple[int, str, str]:
    """`tuneplex train ARGS` in-process: (exit code, stdout, stderr)."""
    code = main(["train", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def losses(run, split="train") -> list[float]:
    return [e["loss"] for e in read_metrics(run) if e["split"] == split]
