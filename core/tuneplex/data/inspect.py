"""`tuneplex data inspect`: what the model will see, and which tokens it learns from."""

from __future__ import annotations

import json
from typing import Any

from tuneplex.data.pipeline import Prepared
from tuneplex.data.targets import IGNORE_INDEX


def examples_json(prepared: Prepared, n: int) -> dict[str, Any]:
    """The first `n` examples (input_ids, labels) and the stats. For preference data each
    example is a pair: {"chosen": {input_ids, labels}, "rejected": {input_ids, labels}}."""
    split = prepared.train
    if _unpaired(split):
        examples = _unpaired_rows(split, n)
    elif _paired(split):
        examples = _pairs(split, n)
    elif _prompts(split):
        examples = _prompt_rows(split, n)
    else:
        head = split.examples.select(range(min(n, len(split.examples))))
        examples = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in head]
    out: dict[str, Any] = {"examples": examples, "stats": split.stats.as_dict()}
    if prepared.validation is not None:
        out["validation_stats"] = prepared.validation.stats.as_dict()
    return out


def _paired(split) -> bool:
    return split.stats.pairs is not None


def _unpaired(split) -> bool:
    return split.stats.desirable is not None


def _unpaired_rows(split, n: int) -> list[dict[str, Any]]:
    """The first `n` unpaired KTO rows: row 2i, its label, and 2i+1 (its completion after
    the next row's prompt, the KL term's mismatched pair)."""
    head = split.examples.select(range(min(2 * n, len(split.examples))))
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in head]
    labels = head["desirable"][::2]
    return [
        {"row": a, "desirable": d, "mismatched": b}
        for a, b, d in zip(rows[::2], rows[1::2], labels, strict=True)
    ]


def _prompts(split) -> bool:
    return split.stats.prompts is not None


def _prompt_rows(split, n: int) -> list[dict[str, Any]]:
    """The first `n` prompts: their ids, reference and the columns a reward is given."""
    head = split.examples.select(range(min(n, len(split.examples))))
    return [
        {
            "input_ids": r["input_ids"],
            "reference": r["reference"],
            "columns": json.loads(r["columns"]),
        }
        for r in head
    ]


def _pairs(split, n: int) -> list[dict[str, Any]]:
    """The first `n` preference pairs: rows 2i (chosen) and 2i+1 (rejected)."""
    head = split.examples.select(range(min(2 * n, len(split.examples))))
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in head]
    return [{"chosen": a, "rejected": b} for a, b in zip(rows[::2], rows[1::2], strict=True)]


def _segments(tok, ids: list[int], labels: list[int]):
    """Runs of (trained?, text), decoded run by run so multi-byte characters stay whole."""
    runs: list[tuple[bool, list[int]]] = []
    for tid, lab in zip(ids, labels, strict=True):
        trained = lab != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(tid)
        else:
            runs.append((trained, [tid]))
    return [(t, tok.decode(run, skip_special_tokens=False)) for t, run in runs]


def render(prepared: Prepared, n: int, *, color: bool) -> str:
    """Plain text (trained parts in ⟦ ⟧) or rich markup (trained parts green); preference
    data pair by pair, chosen then rejected."""
    from rich.markup import escape

    tok = prepared.tokenizer
    split = prepared.train
    lines = []

    def show(head: str, row: dict[str, Any]) -> None:
        trained = sum(1 for x in row["labels"] if x != IGNORE_INDEX)
        head = f"{head}: {len(row['input_ids'])} tokens, {trained} trained "
        lines.append(f"[bold]{escape(head)}[/bold]" if color else head)
        text = ""
        for is_trained, seg in _segments(tok, row["input_ids"], row["labels"]):
            if color:
                text += (
                    f"[bold green]{escape(seg)}[/bold green]"
                    if is_trained
                    else (f"[dim]{escape(seg)}[/dim]")
                )
            else:
                text += f"⟦{seg}⟧" if is_trained else seg
        lines.extend([text, ""])

    if _unpaired(split):
        for i, row in enumerate(_unpaired_rows(split, n)):
            label = "desirable" if row["desirable"] else "undesirable"
            show(f"── row {i}, {label}", row["row"])
            show(f"── row {i}, after the next row's prompt (KL term)", row["mismatched"])
    elif _paired(split):
        for i, pair in enumerate(_pairs(split, n)):
            show(f"── pair {i}, chosen", pair["chosen"])
            show(f"── pair {i}, rejected", pair["rejected"])
    elif _prompts(split):
        for i, row in enumerate(_prompt_rows(split, n)):
            head = f"── prompt {i}: {len(row['input_ids'])} tokens (the model generates after it)"
            lines.append(f"[bold]{escape(head)}[/bold]" if color else head)
            text = tok.decode(row["input_ids"], skip_special_tokens=False)
            lines.append(f"[dim]{escape(text)}[/dim]" if color else text)
            reference = row["reference"]
            lines.append(f"reference: {reference if reference is not None else '(none)'}")
            others = ", ".join(sorted(row["columns"])) or "(none)"
            lines.extend([f"columns given to the reward: {others}", ""])
    else:
        for i, row in enumerate(split.examples.select(range(min(n, len(split.examples))))):
            show(f"── example {i}", row)
    lines.append(_stats_block("train", split.stats.as_dict()))
    if prepared.validation is not None:
        lines.append(_stats_block("validation", prepared.validation.stats.as_dict()))
    return "\n".join(lines)


def _stats_block(name: str, stats: dict[str, Any]) -> str:
    eff = stats.get("packing_efficiency")
    pairs = stats.get("pairs")
    if stats.get("prompts") is not None:
        parts = [
            f"{name}: {stats['rows']} rows -> {stats['prompts']} prompts",
            f"prompt tokens {stats['tokens']}",
        ]
    elif stats.get("desirable") is not None:
        parts = [
            f"{name}: {stats['rows']} rows -> {stats['desirable'] + stats['undesirable']} kto "
            f"rows ({stats['desirable']} desirable, {stats['undesirable']} undesirable; "
            f"{stats['examples']} examples with their mismatched pairs)",
            f"tokens {stats['tokens']}",
            f"trained {stats['trained_tokens']}",
            f"truncated rows {stats['truncated']}",
        ]
    elif pairs is None:
        parts = [
            f"{name}: {stats['rows']} rows -> {stats['examples']} examples",
            f"tokens {stats['tokens']}",
            f"trained {stats['trained_tokens']}",
            f"truncated {stats['truncated']}",
            f"dropped (no trained token) {stats['dropped_no_trained_tokens']}",
        ]
    else:
        per = max(pairs, 1)
        parts = [
            f"{name}: {stats['rows']} rows -> {pairs} preference pairs ({stats['examples']} "
            "examples)",
            f"tokens {stats['tokens']}",
            f"trained {stats['trained_tokens']}",
            f"trained per pair: chosen {stats['chosen_tokens'] / per:.1f}, rejected "
            f"{stats['rejected_tokens'] / per:.1f}",
            f"truncated sides {stats['truncated']}",
        ]
    parts.append(f"formats {json.dumps(stats['formats'])}")
    if eff is not None:
        parts.append(f"packed rows {stats['packed_rows']}, packing efficiency {eff:.1%}")
    if stats.get("skipped_invalid_rows"):
        parts.append(f"left out (invalid) {stats['skipped_invalid_rows']}")
    for kind, seen in sorted((stats.get("template_drops") or {}).items()):
        parts.append(f"template drops {kind} in {seen['rows']} rows")
    return " | ".join(parts)
