"""Try tuneplex's loss masks on chat template files by hand.

    python scripts/check_chat_templates.py DIR_OR_FILES... [--show] [--work /tmp/tuneplex-templates]

Each template (a .jinja file) is paired with a small local tokenizer that knows the template's
markers as special tokens (`<|...|>`, `<｜...｜>`, `[INST]`-style, `<start_of_turn>`, ...), and
run through the data pipeline on conversations with system messages, several turns, tool calls
and reasoning. For every row that builds, the trained text is checked against what an SFT run
should learn, independently of how the pipeline finds it:
  - every assistant answer (and tool call name) lies inside a trained run, one run per turn;
  - no system, user or tool text is trained;
  - every run ends with a special token (the end-of-turn token) and does not start with the
    template's generation prompt (the assistant header).
A table follows: template, rows tried, rows exact, rows the template itself cannot render (its
own errors), rows refused by tuneplex. `--show` prints each row with trained text in ⟦ ⟧.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

MARKERS = re.compile(
    r"<\|[^|<>\s'\"]{1,40}\|>|<｜[^｜]{1,40}｜>|\[/?[A-Z_]{3,20}\]|<(?:start|end)_of_turn>|"
    r"</?s>|<(?:bos|eos|pad)>|</?think>|</?tool_call>|</?tool_response>"
)
EOS_PREFERENCE = (
    "<|eot_id|>",
    "<|im_end|>",
    "<end_of_turn>",
    "<｜end▁of▁sentence｜>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "</s>",
)
BOS_PREFERENCE = ("<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<bos>", "<s>")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def call(cid: str, city: str, *, as_string: bool) -> dict:
    args = {"city": f"{city} CALL-{cid[:3].upper()}"}
    return {
        "id": cid,
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps(args) if as_string else args},
    }


def conversations() -> list[dict]:
    u = lambda t: {"role": "user", "content": t}  # noqa: E731
    a = lambda t: {"role": "assistant", "content": t}  # noqa: E731
    s = {"role": "system", "content": "You are terse. SYSTEM-TEXT."}
    rows = [
        {"messages": [u("Hello there USER-ONE"), a("Hi, ANSWER-ONE.")]},
        {"messages": [s, u("Capital of France? USER-ONE"), a("Paris ANSWER-ONE.")]},
        {
            "messages": [
                s,
                u("One? USER-ONE"),
                a("Uno ANSWER-ONE."),
                u("Two? Say [INST] or <|im_start|> if unsure. USER-TWO"),
                a("Dos ANSWER-TWO."),
                u("Three? USER-THREE"),
                a("Tres ANSWER-THREE."),
            ]
        },
        {"messages": [u("A? USER-ONE"), a("B ANSWER-ONE."), u("C? USER-TWO"), a("D ANSWER-TWO.")]},
        {
            "messages": [
                u("Why? USER-ONE"),
                a("<think>\nBecause REASON-ONE.\n</think>\n\nSo ANSWER-ONE."),
                u("And? USER-TWO"),
                a("<think>\nThen REASON-TWO.\n</think>\n\nThus ANSWER-TWO."),
            ]
        },
        {
            "messages": [
                u("Why? USER-ONE"),
                {"role": "assistant", "content": "So ANSWER-ONE.", "reasoning_content": "RSN-ONE"},
            ]
        },
    ]
    rows.append(  # a tool result sent as a user message (Qwen3 does not count it as a query)
        {
            "messages": [
                u("Q? USER-ONE"),
                {"role": "assistant", "content": "A ANSWER-ONE.", "reasoning_content": "R1"},
                u("<tool_response>\nTOOL-ONE\n</tool_response>"),
                {"role": "assistant", "content": "B ANSWER-TWO.", "reasoning_content": "R2"},
                u("More? USER-TWO"),
                a("C ANSWER-THREE."),
            ]
        }
    )
    rows.append(  # answers with whitespace around them, which templates trim
        {
            "messages": [
                u("  Spaces? USER-ONE \n"),
                a("\n  Kept ANSWER-ONE.  \n"),
                u("More? USER-TWO"),
                a("Done ANSWER-TWO.\n\n"),
            ]
        }
    )
    for as_string in (False, True):
        rows.append(
            {
                "messages": [
                    s,
                    u("Weather in Paris? USER-ONE"),
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [call("abc123def", "Paris", as_string=as_string)],
                    },
                    {"role": "tool", "tool_call_id": "abc123def", "content": "22C TOOL-ONE"},
                    a("It is 22C ANSWER-ONE."),
                ],
                "tools": TOOLS,
            }
        )
        rows.append(
            {
                "messages": [
                    u("Paris and Rome? USER-ONE"),
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [call("abc123def", "Paris", as_string=as_string)],
                    },
                    {"role": "tool", "tool_call_id": "abc123def", "content": "22C TOOL-ONE"},
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [call("xyz789ghi", "Rome", as_string=as_string)],
                    },
                    {"role": "tool", "tool_call_id": "xyz789ghi", "content": "25C TOOL-TWO"},
                    a("Paris 22C, Rome 25C ANSWER-ONE."),
                    u("Thanks USER-TWO"),
                    a("Welcome ANSWER-TWO."),
                ],
                "tools": TOOLS,
            }
        )
    return rows


def tokenizer_for(template: str, out: Path):
    from tuneplex.testing.tiny import build_tokenizer

    markers = sorted(set(MARKERS.findall(template)) | {"<s>", "</s>"})
    eos = next(t for t in EOS_PREFERENCE if t in markers)
    bos = next((t for t in BOS_PREFERENCE if t in markers and t in template), None)
    if bos is None and "bos_token" in template:
        bos = "<s>"
    style = {"template": template, "specials": markers, "bos": bos, "eos": eos, "add_bos": False}
    return build_tokenizer(out, style=style, vocab_size=600)


def check_row(tok, row: dict, ids: list[int], labels: list[int]) -> str | None:
    """None if the trained text is what SFT should learn, else what is wrong."""
    runs, cur = [], []
    for t, lab in zip(ids, labels, strict=True):
        if lab != -100:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    texts = [tok.decode(r, skip_special_tokens=False) for r in runs]
    trained = "".join(texts)
    whole = tok.decode(ids, skip_special_tokens=False)
    specials = set(tok.all_special_tokens) | {
        t.content for t in tok.added_tokens_decoder.values() if t.special
    }
    for tag in re.findall(r"(?:ANSWER|CALL)-[A-Z]+", json.dumps(row["messages"])):
        if tag in whole and tag not in trained:
            return f"{tag} rendered but not trained"
    # what the template appends after a whole conversation but not before a generation prompt
    # (Phi's eos) is never trained: compared token by token, as the tokenizer splits it
    kw = {"tools": row.get("tools"), "tokenize": False}
    whole_ids = tok(tok.apply_chat_template(row["messages"], **kw), add_special_tokens=False)
    prompt_ids = tok(
        tok.apply_chat_template(row["messages"], add_generation_prompt=True, **kw),
        add_special_tokens=False,
    )["input_ids"]
    whole_ids = whole_ids["input_ids"]
    pairs = enumerate(zip(whole_ids, prompt_ids, strict=False))
    same = next((j for j, (x, y) in pairs if x != y), None)
    if same is not None and any(lab != -100 for lab in labels[len(ids) - len(whole_ids) + same :]):
        return "text appended after the conversation is trained"
    for run in runs:
        if not tok.decode(run[-1:]).strip():
            return f"run ends with whitespace: {tok.decode(run, skip_special_tokens=False)!r}"
    for text in texts:
        if not any(text.rstrip().endswith(s) for s in specials):
            return f"run does not end with a special token: {text!r}"
        if text.lstrip().startswith(("<|im_start|>assistant", "<|start_header_id|>assistant")):
            return f"run starts with the assistant header: {text!r}"
    for tag in re.findall(r"(?:USER|SYSTEM|TOOL)-[A-Z]+", trained):
        return f"{tag} trained"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--show", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tuneplex-templates"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tuneplex.data.inspect import _segments
    from tuneplex.data.pipeline import build
    from tuneplex.data.spec import DataSpec
    from tuneplex.errors import UsageError

    files = []
    for p in args.paths:
        files += sorted(p.glob("*.jinja")) if p.is_dir() else [p]
    table = []
    for f in files:
        template = f.read_text()
        tok = tokenizer_for(template, args.work / f.stem)
        tried = exact = template_errors = refused = wrong = 0
        for i, row in enumerate(conversations()):
            tried += 1
            spec = DataSpec(train="rows", tokenizer="t", max_seq_length=4096)
            try:
                split = build([(f"row{i}", row)], spec, tok, key="dataset")
            except UsageError as exc:
                line = exc.lines()[0]
                if "chat template error" in line:
                    template_errors += 1
                else:
                    refused += 1
                if args.show:
                    print(f"── {f.stem} row {i}: {line}")
                continue
            ex = split.examples[0]
            bad = check_row(tok, row, ex["input_ids"], ex["labels"])
            exact += bad is None
            wrong += bad is not None
            if args.show or bad:
                drops = split.stats.template_drops
                print(
                    f"── {f.stem} row {i}: {'exact' if bad is None else 'WRONG: ' + bad}"
                    + (f" (template drops {', '.join(drops)})" if drops else "")
                )
                if args.show:
                    segs = _segments(tok, ex["input_ids"], ex["labels"])
                    print("".join(f"⟦{s}⟧" if t else s for t, s in segs))
        table.append((f.name, tried, exact, template_errors, refused, wrong))
    print(
        f"\n{'template':<22}{'rows':>5}{'exact':>7}{'template error':>16}{'refused':>9}{'wrong':>7}"
    )
    for name, *nums in table:
        cells = zip(nums, (5, 7, 16, 9, 7), strict=True)
        print(f"{name:<22}" + "".join(f"{n:>{w}}" for n, w in cells))
    return 0 if all(r[4] == 0 and r[5] == 0 for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
