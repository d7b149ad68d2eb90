"""Preference (DPO) rows: one prompt, two answers, `chosen` and `rejected`.

Two forms, told apart by the prompt's type:
  strings         {"prompt": str, "chosen": str, "rejected": str}: each side is a prompt/completion
                  example (the prompt untrained)
  conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]} with an
                  optional tools field: each side is the chat prompt + the side's messages
                  (assistant or tool ones), of which only the side's assistant turns are trained

A pair becomes two examples rendered and masked exactly as SFT rows are, so the trainer compares
the two answers to one prompt token for token. Packing never applies: the sides are scored
apart, as whole sequences.
"""

from __future__ import annotations

from typing import Any

from tuneplex.data import formats
from tuneplex.data.spec import DataSpec
from tuneplex.data.targets import IGNORE_INDEX
from tuneplex.errors import Problem, UsageError, show, show_key

SIDES = ("chosen", "rejected")
SIDE_ROLES = ("assistant", "tool")


def check_spec(spec: DataSpec) -> None:
    """Refuse the settings that cannot apply to preference rows."""
    problems = []
    if spec.packing:
        problems.append("preference pairs are never packed; turn sequence packing off")
    if spec.format != "auto" or spec.column_mapping is not None:
        problems.append(
            "preference rows have prompt, chosen and rejected columns; a data format or "
            "column mapping does not apply to them"
        )
    if problems:
        raise UsageError([Problem(spec.train_key, p) for p in problems])


def normalise(
    row: dict[str, Any], where: str, spec: DataSpec
) -> tuple[str, tuple[dict[str, Any], dict[str, Any]]]:
    """(format of the sides, (chosen example, rejected example)), the examples as
    `formats.normalise` gives them ("prompt_completion" or "chat"); raises a UsageError naming
    the row if it is no usable pair."""
    for key in ("prompt", *SIDES):
        if key not in row:
            raise UsageError(
                Problem(
                    where,
                    f"column {show(key)} missing; a preference row has prompt, chosen and "
                    f"rejected (row has: {formats.cols(row)})",
                )
            )
    prompt = row["prompt"]
    if isinstance(prompt, str):
        for side in SIDES:
            if not isinstance(row[side], str):
                raise UsageError(
                    Problem(
                        where,
                        f"column {show(side)} must be a string, as the prompt is, got "
                        f"{formats.kind(row[side])}",
                    )
                )
        _distinct(row, where)
        pair = tuple({"prompt": prompt, "completion": row[side]} for side in SIDES)
        return "prompt_completion", pair
    if not isinstance(prompt, list):
        raise UsageError(
            Problem(
                where,
                "column 'prompt' must be a string or a list of messages, got "
                f"{formats.kind(prompt)}",
            )
        )
    formats.messages(prompt, where, "prompt")
    sides = [side_messages(row, side, where) for side in SIDES]
    _distinct(row, where)
    tools = formats.tools(row, where, spec)
    pair = tuple(
        {"messages": [*prompt, *messages], "tools": tools, "trained_from": len(prompt)}
        for messages in sides
    )
    return "chat", pair


def side_messages(row: dict[str, Any], side: str, where: str) -> list[dict[str, Any]]:
    """The answer messages in column `side` (assistant or tool ones), checked."""
    value = row[side]
    if not isinstance(value, list):
        raise UsageError(
            Problem(
                where,
                f"column {show(side)} must be a list of assistant messages, as the prompt is a "
                f"list of messages, got {formats.kind(value)}",
            )
        )
    formats.messages(value, where, side)
    for i, msg in enumerate(value):
        if msg["role"] not in SIDE_ROLES:
            raise UsageError(
                Problem(
                    where,
                    f"{show_key(side)}[{i}].role: an answer has assistant or tool messages "
                    f"(got {show(msg['role'])}); earlier turns belong in the prompt",
                )
            )
    return value


def _distinct(row: dict[str, Any], where: str) -> None:
    if row["chosen"] == row["rejected"]:
        raise UsageError(Problem(where, "chosen and rejected are identical"))


def check_sides(where: str, sides: list[tuple[Any, Any]], limit: int) -> Problem | None:
    """What makes a pair's two encoded sides, (ids, labels) truncated to `limit` tokens, useless
    for preference training: a side without a trained token, or two identical sides."""
    import numpy as np

    for side, (_, labels) in zip(SIDES, sides, strict=True):
        if not (labels != IGNORE_INDEX).any():
            return Problem(where, f"{side} has no trained token after truncation to {limit} tokens")
    (a, a_lab), (b, b_lab) = sides
    if np.array_equal(a, b) and np.array_equal(a_lab, b_lab):
        return Problem(
            where, f"chosen and rejected are identical after truncation to {limit} tokens"
        )
    return None
