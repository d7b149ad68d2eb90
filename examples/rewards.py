"""Reward functions for `examples/automodel-grpo-python.yaml`.

A reward is `name(prompts, completions, **columns) -> list[float]`: the prompts as the user wrote
them, the completions as text (cut at the end of turn), and each of the rows' other columns as a
list. TRL calls its reward functions the same way, so one written for TRL works here unchanged.
"""

import re


def brevity(prompts, completions, **columns):
    """1.0 for an answer of at most three words, falling to 0 at twelve."""
    return [max(0.0, min(1.0, (12 - len(c.split())) / 9)) for c in completions]


def has_number(prompts, completions, **columns):
    """1.0 when the answer holds a number."""
    return [1.0 if re.search(r"\d", c) else 0.0 for c in completions]
