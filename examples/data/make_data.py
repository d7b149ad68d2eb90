"""Regenerate the bundled demo data: `python examples/data/make_data.py`.

Small rule-following chats (repeat, reverse, first word, count) over a closed vocabulary, so a
tiny model trained for a minute on a CPU visibly lowers its validation loss; and preference
pairs over the same tasks (pairs.jsonl, val-pairs.jsonl) for dpo; arithmetic prompts with their
answers (arithmetic.jsonl, val-arithmetic.jsonl) for grpo's math reward. Deterministic.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tuneplex.testing.tiny import WORDS

SYSTEM = "You follow the instruction exactly."
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def example(rng: random.Random) -> dict:
    words = [rng.choice(WORDS[:40]) for _ in range(rng.randint(3, 8))]
    text = " ".join(words)
    task = rng.randrange(4)
    if task == 0:
        question, answer = f"Repeat: {text}", text
    elif task == 1:
        question, answer = f"Reverse: {text}", " ".join(reversed(words))
    elif task == 2:
        question, answer = f"First word of: {text}", words[0]
    else:
        question, answer = f"Count the words: {text}", f"{NUMBERS[len(words)]} words"
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def pair(rng: random.Random) -> dict:
    """A preference pair (DPO): the right answer chosen, a plausible wrong one rejected."""
    row = example(rng)["messages"]
    right = row[2]["content"]
    words = row[1]["content"].split(": ", 1)[1].split()
    wrong = " ".join(words[1:] + words[:1]) if len(set(words)) > 1 else right + " " + right
    if wrong == right:
        wrong = f"{NUMBERS[(len(words) + 1) % 10]} words"
    return {
        "prompt": row[:2],
        "chosen": [{"role": "assistant", "content": right}],
        "rejected": [{"role": "assistant", "content": wrong}],
    }


def arithmetic(rng: random.Random) -> dict:
    """A prompt for reinforcement learning (grpo): a small sum, its answer GSM8K-style."""
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return {
        "messages": [
            {"role": "system", "content": "Answer with the number only."},
            {"role": "user", "content": f"What is {a} + {b}?"},
        ],
        "answer": f"#### {a + b}",
    }


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random(7)
    for name, count in (("train.jsonl", 1200), ("val.jsonl", 100)):
        with (here / name).open("w") as fh:
            for _ in range(count):
                fh.write(json.dumps(example(rng)) + "\n")
    rng = random.Random(11)
    for name, count in (("pairs.jsonl", 400), ("val-pairs.jsonl", 50)):
        with (here / name).open("w") as fh:
            for _ in range(count):
                fh.write(json.dumps(pair(rng)) + "\n")
    rng = random.Random(13)
    for name, count in (("arithmetic.jsonl", 400), ("val-arithmetic.jsonl", 40)):
        with (here / name).open("w") as fh:
            for _ in range(count):
                fh.write(json.dumps(arithmetic(rng)) + "\n")


if __name__ == "__main__":
    main()
