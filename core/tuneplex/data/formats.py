"""Recognising a row's format and checking its structure, before any tokenization.

Four formats, detected per row (or forced by `format` in the job):
  chat               `messages` (system/user/assistant/tool roles, tool_calls) + optional `tools`
  column_mapped      any columns mapped to context / question / answer
  prompt_completion  input/output or prompt/completion
  text               `text_field`: every token trained
"""

from __future__ import annotations

import itertools
from typing import Any

from tuneplex.data.spec import DEFAULT_PAIRS, DataSpec
from tuneplex.errors import Problem, UsageError, show, show_key

ROLES = ("system", "user", "assistant", "tool")


def detect(row: dict[str, Any], where: str, spec: DataSpec) -> str:
    """The row's format name; raises a UsageError naming the row and its columns if unknown."""
    if spec.format != "auto":
        return spec.format
    if spec.messages_field in row:
        return "chat"
    if spec.column_mapping is not None:
        return "column_mapped"
    for prompt_key, completion_key in DEFAULT_PAIRS:
        if prompt_key in row and completion_key in row:
            return "prompt_completion"
    if spec.text_field in row:
        return "text"
    settings = (
        "--column-mapping"
        if spec.train_key.startswith("--")  # a command's data file, not a job's
        else "dataset.format / dataset.column_mapping"
    )
    raise UsageError(
        Problem(
            where,
            f"cannot tell this row's format (columns: {cols(row)}); expected "
            f"'{spec.messages_field}', 'input'/'output', 'prompt'/'completion' or "
            f"'{spec.text_field}' (or set {settings})",
        )
    )


def normalise(row: dict[str, Any], where: str, spec: DataSpec) -> tuple[str, dict[str, Any]]:
    """(format, example). Examples: {"messages", "tools"} | {"prompt", "completion"} | {"text"}."""
    fmt = detect(row, where, spec)
    if fmt == "chat":
        return fmt, _chat(row, where, spec)
    if fmt == "text":
        return fmt, {"text": _string(row, spec.text_field, where, "dataset.text_field")}
    if fmt == "column_mapped":
        mapping = spec.column_mapping or {}
        parts = []
        for role in ("context", "question"):
            col = mapping.get(role)
            if col is not None:
                value = _string(row, col, where, f"dataset.column_mapping.{role}")
                if value.strip():
                    parts.append(value)
        answer = _string(row, mapping["answer"], where, "dataset.column_mapping.answer")
        return fmt, {"prompt": "\n\n".join(parts), "completion": answer}
    # prompt_completion
    for prompt_key, completion_key in DEFAULT_PAIRS:
        if prompt_key in row and completion_key in row:
            return fmt, {
                "prompt": _string(row, prompt_key, where, None),
                "completion": _string(row, completion_key, where, None),
            }
    raise UsageError(
        Problem(
            where,
            f"no input/output or prompt/completion columns (columns: {cols(row)}); map yours "
            "with dataset.column_mapping",
        )
    )


def _string(row: dict[str, Any], col: str, where: str, setting: str | None) -> str:
    if col not in row:
        via = f" ({setting})" if setting else ""
        raise UsageError(Problem(where, f"column {show(col)}{via} missing; row has: {cols(row)}"))
    value = row[col]
    if not isinstance(value, str):
        raise UsageError(Problem(where, f"column {show(col)} must be a string, got {kind(value)}"))
    return value


def _chat(row: dict[str, Any], where: str, spec: DataSpec) -> dict[str, Any]:
    key = spec.messages_field
    if key not in row:
        raise UsageError(Problem(where, f"no {show(key)} field (columns: {cols(row)})"))
    return {"messages": messages(row[key], where, key), "tools": tools(row, where, spec)}


def messages(value: Any, where: str, key: str) -> list[dict[str, Any]]:
    """`value` (the row's column `key`) checked as a non-empty list of chat messages: roles,
    contents, tool calls."""
    if not isinstance(value, list) or not value:
        raise UsageError(Problem(where, f"{show(key)} must be a non-empty list of messages"))
    for i, msg in enumerate(value):
        at = f"{show_key(key)}[{i}]"
        if not isinstance(msg, dict):
            raise UsageError(Problem(where, f"{at}: expected an object, got {kind(msg)}"))
        role = msg.get("role")
        if role not in ROLES:
            raise UsageError(
                Problem(where, f"{at}.role: must be one of {', '.join(ROLES)} (got {show(role)})")
            )
        content = msg.get("content")
        has_calls = bool(msg.get("tool_calls"))
        if content is None and not (role == "assistant" and has_calls):
            raise UsageError(Problem(where, f"{at}.content: missing"))
        if content is not None and not isinstance(content, str):
            raise UsageError(Problem(where, f"{at}.content: must be a string, got {kind(content)}"))
        if "tool_calls" in msg and not isinstance(msg["tool_calls"], list):
            raise UsageError(Problem(where, f"{at}.tool_calls: must be a list"))
    return value


def tools(row: dict[str, Any], where: str, spec: DataSpec) -> list | None:
    """The row's tool definitions (`spec.tools_field`), None when it has none."""
    value = row.get(spec.tools_field)
    if value is not None and not isinstance(value, list):
        raise UsageError(Problem(where, f"{show(spec.tools_field)} must be a list"))
    return value or None


def cols(row: dict[str, Any], most: int = 12) -> str:
    """The row's column names as a message quotes them: odd ones quoted, the list capped."""
    names = [show_key(str(k)) for k in itertools.islice(row, most)]
    more = f", ... ({len(row) - most} more)" if len(row) > most else ""
    return ", ".join(names) + more if names else "(none)"


def kind(value: Any) -> str:
    return type(value).__name__ if value is not None else "null"


# -- prompts (rows a model is asked to answer: evaluation, reinforcement learning) -------------
def prompt_format(row: dict[str, Any], where: str, spec: DataSpec) -> str:
    """`detect` for a row that may hold a prompt alone: a lone `prompt` (or `input`) column is a
    prompt_completion row without its completion."""
    if spec.format != "auto" or spec.messages_field in row or spec.column_mapping is not None:
        return detect(row, where, spec)
    if any(prompt_key in row for prompt_key, _ in DEFAULT_PAIRS):
        return "prompt_completion"
    return detect(row, where, spec)


def prompt_of(
    row: dict[str, Any], where: str, spec: DataSpec
) -> tuple[str, dict[str, Any], str | None]:
    """(format, example, answer): what a model is given to answer — a chat without its final
    assistant turn (which is the answer), a prompt (its completion the answer, if the row has
    one), a column-mapped question, or a text row — and the row's own answer, or None."""
    fmt = prompt_format(row, where, spec)
    if fmt == "chat":
        example = _chat(row, where, spec)
        messages_ = example["messages"]
        answer = None
        if messages_[-1]["role"] == "assistant":
            answer, messages_ = messages_[-1].get("content"), messages_[:-1]
            if not messages_:
                raise UsageError(
                    Problem(where, "the only message is the answer; no prompt before it")
                )
        return fmt, {"messages": messages_, "tools": example["tools"]}, answer
    if fmt == "prompt_completion":
        for prompt_key, completion_key in DEFAULT_PAIRS:
            if prompt_key in row:
                answer = (
                    _string(row, completion_key, where, None) if completion_key in row else None
                )
                return fmt, {"prompt": _string(row, prompt_key, where, None)}, answer
    fmt, example = normalise(row, where, spec)
    return fmt, {k: v for k, v in example.items() if k != "completion"}, example.get("completion")


def reference_text(value: Any) -> str | None:
    """A reference answer as text: a string that is not blank, or a JSON number (`42` is as good
    as "42"); anything else (a bool, null, a list) is no answer."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return str(value)
    return value if isinstance(value, str) and value.strip() else None


def reference_of(row: dict[str, Any], *, column: str, where: str, what: str) -> str:
    """The row's reference answer in `column`, refused when missing or unusable (`what` says
    whose reference it is): a row without one could never earn the reward, so it is bad data."""
    if column not in row:
        raise UsageError(
            Problem(where, f"column {show(column)} ({what}) missing; row has: {cols(row)}")
        )
    text = reference_text(row[column])
    if text is None:
        value = row[column]
        got = "blank" if isinstance(value, str) else f"a {kind(value)}"
        raise UsageError(
            Problem(where, f"column {show(column)} ({what}) is {got}; expected the answer as text")
        )
    return text
