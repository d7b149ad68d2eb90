"""Unpaired preference (KTO) rows: one prompt, one completion, and whether it is desirable.

TRL's unpaired preference format, in two forms told apart by the prompt's type (as for pairs,
`tuneplex.data.preference`):
  strings         {"prompt": str, "completion": str, "label": true|false}
  conversational  {"prompt": [messages], "completion": [messages], "label": ...} with an
                  optional tools field: the chat prompt + the completion's assistant (or tool)
                  messages, of which only the completion's assistant turns are trained

KTO's reference point is the policy's KL from the reference, estimated on MISMATCHED prompt /
completion pairs. TRL builds them per batch (each completion after the previous row's prompt of
the batch); here they are fixed per row, so that their reference log-probabilities are computed
once before the first step, as every other reference value is: row i's completion after the
prompt (and tools) of row (i+1) mod n, n the usable rows in file order. All rows must then share
one form. The examples are interleaved: 2i is row i, 2i+1 its mismatched pair (which needs no
trained token: a completion cut away counts 0 nats). Never packed.
"""

from __future__ import annotations

from typing import Any

from tuneplex.data import formats, preference
from tuneplex.data.spec import DataSpec
from tuneplex.errors import Problem, UsageError, show

COLUMNS = ("prompt", "completion", "label")


def normalise(row: dict[str, Any], where: str, spec: DataSpec) -> tuple[str, dict[str, Any]]:
    """(form, {"prompt", "completion", "tools", "label"}); raises a UsageError naming the row
    if it is no usable unpaired row."""
    for key in COLUMNS:
        if key not in row:
            raise UsageError(
                Problem(
                    where,
                    f"column {show(key)} missing; an unpaired (kto) row has prompt, completion "
                    f"and label (row has: {formats.cols(row)})",
                )
            )
    label = row["label"]
    if not isinstance(label, bool):
        raise UsageError(
            Problem(
                where,
                "column 'label' must be true (desirable) or false (undesirable), got "
                f"{formats.kind(label)}",
            )
        )
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise UsageError(
                Problem(
                    where,
                    "column 'completion' must be a string, as the prompt is, got "
                    f"{formats.kind(completion)}",
                )
            )
        return "prompt_completion", {"prompt": prompt, "completion": completion, "label": label}
    if not isinstance(prompt, list):
        raise UsageError(
            Problem(
                where,
                "column 'prompt' must be a string or a list of messages, got "
                f"{formats.kind(prompt)}",
            )
        )
    formats.messages(prompt, where, "prompt")
    messages = preference.side_messages(row, "completion", where)
    tools = formats.tools(row, where, spec)
    return "chat", {"prompt": prompt, "completion": messages, "tools": tools, "label": label}


def example(fmt: str, prompt_row: dict[str, Any], completion_row: dict[str, Any]) -> dict:
    """The example of `completion_row`'s completion after `prompt_row`'s prompt (and tools)."""
    if fmt == "prompt_completion":
        return {"prompt": prompt_row["prompt"], "completion": completion_row["completion"]}
    prompt = prompt_row["prompt"]
    return {
        "messages": [*prompt, *completion_row["completion"]],
        "tools": prompt_row["tools"],
        "trained_from": len(prompt),
    }


FORMS = {"prompt_completion": "string", "chat": "conversational"}
ONE_FORM = (
    "unpaired (kto) rows share one form, as each completion is also scored after the next "
    "row's prompt"
)


def other_form(fmt: str, form: str) -> str:
    """Why a row of form `fmt` cannot be among rows of form `form`."""
    return f"a {FORMS[fmt]} row among {FORMS[form]} rows: {ONE_FORM}"
