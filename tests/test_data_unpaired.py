"""Unpaired preference (KTO) rows in the data pipeline: each row and its mismatched pair (its
completion after the next row's prompt) become two examples, rendered and masked as SFT rows;
labels kept as a column; bad rows reported as file:line; stats, inspect, RowTable."""

import json

import pytest
from helpers import trained_runs, untrained_text
from tuneplex.data import inspect
from tuneplex.data.collate import RowTable
from tuneplex.data.pipeline import prepare
from tuneplex.data.spec import DataSpec
from tuneplex.errors import UsageError

ROWS = [
    {"prompt": "Weather in Paris?", "completion": "Sunny today.", "label": True},
    {"prompt": "Two plus two?", "completion": "Five.", "label": False},
    {"prompt": "Capital of Italy?", "completion": "Rome.", "label": True},
]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spec_for(tokenizers, data, style="chatml", **kw):
    path, _ = tokenizers[style]
    kw.setdefault("max_seq_length", 256)
    return DataSpec(train=str(data), tokenizer=path, preference=True, unpaired=True, **kw)


def test_rows_and_their_mismatched_pairs_interleave(tokenizers, tmp_path):
    """2i is row i; 2i+1 its completion after row (i+1) mod n's prompt; labels per row."""
    _, tok = tokenizers["chatml"]
    split = prepare(spec_for(tokenizers, jsonl(tmp_path / "t.jsonl", ROWS))).train
    ex = split.examples
    assert len(ex) == 6 and ex["desirable"] == [True, True, False, False, True, True]
    for i, row in enumerate(ROWS):
        nxt = ROWS[(i + 1) % len(ROWS)]
        own, other = ex[2 * i], ex[2 * i + 1]
        for e in (own, other):
            assert trained_runs(tok, e["input_ids"], e["labels"]) == [
                row["completion"] + "<|im_end|>"
            ]
        assert row["prompt"] in untrained_text(tok, own["input_ids"], own["labels"])
        mismatched = untrained_text(tok, other["input_ids"], other["labels"])
        assert nxt["prompt"] in mismatched and row["prompt"] not in mismatched
    assert (split.stats.desirable, split.stats.undesirable) == (2, 1)
    assert split.stats.pairs is None and split.stats.examples == 6
    table = RowTable(ex)
    assert list(table.values["desirable"]) == [True, True, False, False, True, True]
    assert len(table) == 6 and set(table.row(0)) == {"input_ids", "labels"}


def test_conversational_rows_take_the_next_rows_prompt_and_tools(tokenizers, tmp_path):
    _, tok = tokenizers["chatml"]
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Question {i}?"}],
            "completion": [{"role": "assistant", "content": f"Answer {i}."}],
            "label": i % 2 == 0,
        }
        for i in range(2)
    ]
    ex = prepare(spec_for(tokenizers, jsonl(tmp_path / "t.jsonl", rows))).train.examples
    assert trained_runs(tok, ex[1]["input_ids"], ex[1]["labels"]) == ["Answer 0.<|im_end|>"]
    assert "Question 1?" in untrained_text(tok, ex[1]["input_ids"], ex[1]["labels"])
    assert "Question 0?" in untrained_text(tok, ex[3]["input_ids"], ex[3]["labels"])


def test_every_bad_row_is_reported_as_file_line(tokenizers, tmp_path):
    good = ROWS[0]
    user = [{"role": "user", "content": "Hi"}]
    bad = [
        ({"prompt": "Hi", "label": True}, "column 'completion' missing; an unpaired (kto) row has "
         "prompt, completion and label (row has: prompt, label)"),
        ({"prompt": "Hi", "completion": "Ok"}, "column 'label' missing; an unpaired (kto) row "
         "has prompt, completion and label (row has: prompt, completion)"),
        ({"prompt": "Hi", "completion": "Ok", "label": "yes"}, "column 'label' must be true "
         "(desirable) or false (undesirable), got str"),
        ({"prompt": "Hi", "completion": "Ok", "label": 1}, "column 'label' must be true "
         "(desirable) or false (undesirable), got int"),
        ({"prompt": "Hi", "completion": ["x"], "label": True}, "column 'completion' must be a "
         "string, as the prompt is, got list"),
        ({"prompt": 3, "completion": "Ok", "label": True}, "column 'prompt' must be a string or "
         "a list of messages, got int"),
        ({"prompt": user, "completion": "Ok", "label": True}, "column 'completion' must be a "
         "list of assistant messages, as the prompt is a list of messages, got str"),
        ({"prompt": user, "completion": user, "label": False}, "completion[0].role: an answer "
         "has assistant or tool messages (got 'user'); earlier turns belong in the prompt"),
        ({"prompt": user, "completion": [{"role": "assistant", "content": "Ok"}], "label": True},
         "a conversational row among string rows: unpaired (kto) rows share one form, as each "
         "completion is also scored after the next row's prompt"),
        ({"prompt": " ".join(["why"] * 80), "completion": "Ok", "label": True},
         "completion has no trained token after truncation to 48 tokens"),
    ]  # fmt: skip
    lines, expected = [], {}
    for row, reason in bad:
        lines.append(json.dumps(good))
        lines.append(json.dumps(row))
        expected[len(lines)] = reason
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError) as info:
        prepare(spec_for(tokenizers, data, max_seq_length=48))
    got = info.value.lines()
    assert got[:-1] == [f"{data}:{line}: {reason}" for line, reason in expected.items()]
    assert got[-1].startswith(f"dataset.training: {len(expected)} of {len(lines)} rows")
    skipped = prepare(spec_for(tokenizers, data, max_seq_length=48, skip_invalid_rows=True))
    stats = skipped.train.stats
    assert (stats.desirable, stats.undesirable, stats.examples) == (len(bad), 0, 2 * len(bad))
    assert stats.skipped_invalid_rows == len(bad)


def test_inspect_shows_each_row_its_label_and_its_mismatched_pair(tokenizers, tmp_path):
    prepared = prepare(spec_for(tokenizers, jsonl(tmp_path / "t.jsonl", ROWS)))
    text = inspect.render(prepared, 5, color=False)
    assert "── row 0, desirable:" in text and "── row 1, undesirable:" in text
    assert "── row 2, after the next row's prompt (KL term):" in text
    assert "3 rows -> 3 kto rows (2 desirable, 1 undesirable; 6 examples" in text
    out = inspect.examples_json(prepared, 2)
    assert [e["desirable"] for e in out["examples"]] == [True, False]
    assert out["stats"]["desirable"] == 2 and "pairs" not in out["stats"]
    assert json.loads(json.dumps(out)) == out
