"""Preference (DPO) rows in the data pipeline: pairs become two examples, chosen then rejected,
rendered and masked exactly as SFT rows; bad pairs reported as file:line; stats, cache, inspect."""

import json

import pytest
from helpers import trained_runs, untrained_text
from tuneplex.data import inspect, sources
from tuneplex.data.pipeline import build, cache_root, prepare
from tuneplex.data.spec import DataSpec, DataStats
from tuneplex.data.targets import IGNORE_INDEX
from tuneplex.errors import UsageError

EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}
SIDES = ("chosen", "rejected")
PAIR = {"prompt": "Weather in Paris?", "chosen": "Sunny today.", "rejected": "No idea."}


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spec_for(tokenizers, data, style="chatml", **kw):
    path, _ = tokenizers[style]
    kw.setdefault("max_seq_length", 256)
    kw.setdefault("preference", True)
    return DataSpec(train=str(data), tokenizer=path, **kw)


def encode(tok, rows, **kw):
    """build() straight from rows named t.jsonl:1, :2, ...; (split, [(ids, labels)])."""
    spec = DataSpec(
        train="t.jsonl",
        tokenizer="tok",
        max_seq_length=kw.pop("max_seq_length", 1024),
        preference=True,
        **kw,
    )
    split = build([(f"t.jsonl:{i + 1}", r) for i, r in enumerate(rows)], spec, tok, key="k")
    return split, [(r["input_ids"], r["labels"]) for r in split.examples]


def prompt_part(ids, labels):
    """The tokens before the first trained one."""
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    return ids[:first]


# ------------------------------------------------------------------ rendering and masks
@pytest.mark.parametrize("style", ["chatml", "llama3", "mistral"])
def test_string_pairs_interleave_chosen_and_rejected(tokenizers, style):
    _, tok = tokenizers[style]
    rows = [PAIR, {"prompt": "Two plus two?", "chosen": "Four.", "rejected": "Five."}]
    _, examples = encode(tok, rows)
    assert len(examples) == 4
    for i, row in enumerate(rows):
        for side, (ids, labels) in zip(SIDES, examples[2 * i : 2 * i + 2], strict=True):
            assert trained_runs(tok, ids, labels) == [row[side] + EOT[style]]
            rest = untrained_text(tok, ids, labels)
            assert row["prompt"] in rest and row[side] not in rest
        (c_ids, c_lab), (r_ids, r_lab) = examples[2 * i : 2 * i + 2]
        assert prompt_part(c_ids, c_lab) == prompt_part(r_ids, r_lab)  # one prompt, two answers


def test_string_pairs_without_a_template(tokenizers):
    _, tok = tokenizers["llama3"]  # adds BOS; EOS appended and trained, as for SFT rows
    _, [(ids, labels), (ids2, labels2)] = encode(
        tok,
        [{"prompt": "Q: two plus two?", "chosen": " A: four.", "rejected": " A: five."}],
        chat_template="none",
    )
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
    assert trained_runs(tok, ids, labels) == [" A: four." + tok.eos_token]
    assert trained_runs(tok, ids2, labels2) == [" A: five." + tok.eos_token]


def conversation_pair(style):
    turns = [
        ("user", "What is the weather in Paris today?"),
        ("assistant", "It is sunny in Paris."),
        ("user", "And in London tomorrow?"),
    ]
    prompt = [{"role": r, "content": c} for r, c in turns]
    if style != "mistral":  # Mistral's template allows only alternating user/assistant
        prompt.insert(0, {"role": "system", "content": "You answer weather questions briefly."})
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Rainy, I think."}],
        "rejected": [{"role": "assistant", "content": "The river is blue!"}],
    }


@pytest.mark.parametrize("style", ["chatml", "llama3", "mistral"])
def test_conversational_pairs_train_only_the_side(tokenizers, style):
    _, tok = tokenizers[style]
    row = conversation_pair(style)
    split, [chosen, rejected] = encode(tok, [row])
    assert split.stats.formats == {"chat": 1}
    for side, (ids, labels) in (("chosen", chosen), ("rejected", rejected)):
        assert trained_runs(tok, ids, labels) == [row[side][0]["content"] + EOT[style]]
        rest = untrained_text(tok, ids, labels)
        for m in row["prompt"]:  # the prompt's assistant turn included: never trained
            assert m["content"] in rest
    assert prompt_part(*chosen) == prompt_part(*rejected)


def test_the_same_conversation_as_sft_trains_the_prompts_answer_too(tokenizers):
    """The check above has teeth: as an SFT chat, the prompt's assistant turn is trained."""
    _, tok = tokenizers["chatml"]
    row = conversation_pair("chatml")
    spec = DataSpec(train="t.jsonl", tokenizer="tok", max_seq_length=1024)
    split = build([("t.jsonl:1", {"messages": row["prompt"] + row["chosen"]})], spec, tok, key="k")
    (ex,) = split.examples
    assert trained_runs(tok, ex["input_ids"], ex["labels"]) == [
        "It is sunny in Paris.<|im_end|>",
        "Rainy, I think.<|im_end|>",
    ]


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_a_side_with_tool_calls_and_tool_results(tokenizers, style):
    _, tok = tokenizers[style]
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    row = {
        "prompt": [{"role": "user", "content": "Weather in Paris?"}],
        "chosen": [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "22C and sunny"},
            {"role": "assistant", "content": "It is 22C and sunny."},
        ],
        "rejected": [{"role": "assistant", "content": "I cannot know."}],
        "tools": [{"name": "get_weather"}],
    }
    _, [(ids, labels), (ids2, labels2)] = encode(tok, [row])
    runs = trained_runs(tok, ids, labels)
    assert len(runs) == 2 and json.dumps(call) in runs[0]
    assert runs[1].endswith("It is 22C and sunny." + EOT[style])
    assert "22C and sunny" + EOT[style] in untrained_text(tok, ids, labels)
    assert trained_runs(tok, ids2, labels2) == ["I cannot know." + EOT[style]]


def test_passthrough_trains_only_the_sides_contents(tokenizers):
    _, tok = tokenizers["chatml"]
    row = conversation_pair("chatml")
    _, [(ids, labels), (ids2, labels2)] = encode(tok, [row], chat_template="passthrough")
    assert trained_runs(tok, ids, labels) == ["Rainy, I think."]
    assert trained_runs(tok, ids2, labels2) == ["The river is blue!"]
    assert "It is sunny in Paris." in untrained_text(tok, ids, labels)


# ------------------------------------------------------------------ bad rows
def bad_pairs(tmp_path):
    """(data file, expected reason per line) for good pairs with every kind of bad one."""
    user = [{"role": "user", "content": "Hi"}]
    answer = [{"role": "assistant", "content": "Hello there."}]
    common = " ".join(["blue river"] * 40)
    bad = [
        (
            {"prompt": "Hi", "chosen": "Hello."},
            "column 'rejected' missing; a preference row has prompt, chosen and rejected (row "
            "has: prompt, chosen)",
        ),
        (
            {"prompt": "Hi", "chosen": answer, "rejected": "x"},
            "column 'chosen' must be a string, as the prompt is, got list",
        ),
        (
            {"prompt": user, "chosen": answer, "rejected": "x"},
            "column 'rejected' must be a list of assistant messages, as the prompt is a list of "
            "messages, got str",
        ),
        (
            {"prompt": 3, "chosen": "a", "rejected": "b"},
            "column 'prompt' must be a string or a list of messages, got int",
        ),
        (
            {"prompt": "Hi", "chosen": "Same.", "rejected": "Same."},
            "chosen and rejected are identical",
        ),
        (
            {"prompt": user, "chosen": [], "rejected": answer},
            "'chosen' must be a non-empty list of messages",
        ),
        (
            {"prompt": user, "chosen": answer, "rejected": [*user, *answer]},
            "rejected[0].role: an answer has assistant or tool messages (got 'user'); earlier "
            "turns belong in the prompt",
        ),
        (
            {"prompt": [{"role": "robot", "content": "x"}], "chosen": answer, "rejected": answer},
            "prompt[0].role: must be one of system, user, assistant, tool (got 'robot')",
        ),
        (
            {"prompt": user, "chosen": [{"role": "assistant"}], "rejected": answer},
            "chosen[0].content: missing",
        ),
        (
            {"prompt": " ".join(["why"] * 80), "chosen": "a", "rejected": "b"},
            "chosen has no trained token after truncation to 48 tokens",
        ),
        (
            {"prompt": "Hi", "chosen": "Ok", "rejected": [{"role": "tool", "content": "r"}]},
            "column 'rejected' must be a string, as the prompt is, got list",
        ),
        (
            {"prompt": user, "chosen": answer, "rejected": [{"role": "tool", "content": "22C"}]},
            "rejected has no trained token after truncation to 48 tokens",
        ),
        (
            {"prompt": "Hi", "chosen": common + " yes", "rejected": common + " no"},
            "chosen and rejected are identical after truncation to 48 tokens",
        ),
    ]
    lines, expected = [], {}
    for row, reason in bad:
        lines.append(json.dumps(PAIR))
        lines.append(json.dumps(row))
        expected[len(lines)] = reason
    lines.append('{"prompt": ')
    expected[len(lines)] = "invalid JSON: Expecting value (column 1)"
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data, expected


def test_every_bad_pair_is_reported_at_once(tokenizers, tmp_path):
    data, expected = bad_pairs(tmp_path)
    with pytest.raises(UsageError) as info:
        prepare(spec_for(tokenizers, data, max_seq_length=48))
    lines = info.value.lines()
    assert lines[:-1] == [f"{data}:{line}: {reason}" for line, reason in expected.items()]
    assert lines[-1] == (
        f"dataset.training: {len(expected)} of {2 * len(expected) - 1} rows cannot be used; fix "
        "them, or set dataset.skip_invalid_rows: true to leave them out (counted in the stats)"
    )


def test_skip_invalid_rows_leaves_bad_pairs_out_and_counts_them(tokenizers, tmp_path):
    data, expected = bad_pairs(tmp_path)
    spec = spec_for(tokenizers, data, max_seq_length=48, skip_invalid_rows=True)
    for attempt in ("built", "cached"):
        stats = prepare(spec).train.stats
        good = len(expected) - 1
        assert stats.rows == 2 * len(expected) - 1, attempt
        assert stats.pairs == good and stats.examples == 2 * good
        assert stats.skipped_invalid_rows == len(expected)
        assert stats.first_skipped == f"{data}:2: {expected[2]}"
        assert stats.formats == {"prompt_completion": good}
        assert stats.dropped_no_trained_tokens == 0


def test_sft_keeps_refusing_preference_rows(tokenizers, tmp_path):
    data = jsonl(tmp_path / "train.jsonl", [PAIR])
    with pytest.raises(UsageError) as info:
        prepare(spec_for(tokenizers, data, preference=False))
    assert "cannot tell this row's format (columns: prompt, chosen, rejected)" in str(
        info.value.lines()[0]
    )


def test_packing_is_refused(tokenizers, tmp_path):
    data = jsonl(tmp_path / "train.jsonl", [PAIR])
    with pytest.raises(UsageError) as info:
        prepare(spec_for(tokenizers, data, packing=True))
    assert info.value.lines() == [
        "dataset.training: preference pairs are never packed; turn sequence packing off"
    ]


# ------------------------------------------------------------------ stats and cache
def test_stats_count_pairs_sides_and_truncation(tokenizers):
    _, tok = tokenizers["chatml"]
    long = " ".join(["blue river"] * 40)
    rows = [PAIR, {"prompt": "Describe it.", "chosen": long, "rejected": "Short."}]
    split, examples = encode(tok, rows, max_seq_length=48)
    s = split.stats
    assert (s.rows, s.pairs, s.examples, s.truncated) == (2, 2, 4, 1)
    assert len(examples[2][0]) == 48  # the long chosen side, cut on its own
    trained = [sum(1 for x in lab if x != IGNORE_INDEX) for _, lab in examples]
    assert s.chosen_tokens == trained[0] + trained[2]
    assert s.rejected_tokens == trained[1] + trained[3]
    assert s.trained_tokens == sum(trained)
    assert s.tokens == sum(len(ids) for ids, _ in examples)


def test_other_stats_unchanged_and_old_cache_entries_load(tokenizers):
    _, tok = tokenizers["chatml"]
    spec = DataSpec(train="t.jsonl", tokenizer="tok", max_seq_length=64)
    stats = build([("t.jsonl:1", {"input": "a?", "output": "b."})], spec, tok, key="k").stats
    saved = stats.as_dict()
    assert not {"pairs", "chosen_tokens", "rejected_tokens"} & saved.keys()
    assert DataStats(**saved) == stats  # a stats.json written before preference data loads


def test_cache_reused_and_keyed_apart_from_sft(tokenizers, tmp_path, monkeypatch):
    # rows that are both a prompt/completion row (SFT) and a pair (preference)
    rows = [
        {**PAIR, "completion": "Sunny."},
        {"prompt": "2+2?", "completion": "4", "chosen": "4", "rejected": "5"},
    ]
    data = jsonl(tmp_path / "train.jsonl", rows)
    first = prepare(spec_for(tokenizers, data))
    calls = []
    real = sources.read_rows
    monkeypatch.setattr(sources, "read_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = prepare(spec_for(tokenizers, data))
    assert calls == []  # read from the cache
    assert again.train.stats == first.train.stats and again.train.stats.pairs == 2
    assert again.train.examples["labels"] == first.train.examples["labels"]
    sft = prepare(spec_for(tokenizers, data, preference=False))
    assert calls == [1]  # another cache entry
    assert sft.train.stats.examples == 2 and sft.train.stats.pairs is None
    assert len([p for p in cache_root().iterdir() if (p / "stats.json").is_file()]) == 2


def test_prepare_with_validation_pairs(tokenizers, tmp_path):
    train = jsonl(tmp_path / "train.jsonl", [PAIR])
    val = jsonl(tmp_path / "val.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    prepared = prepare(spec_for(tokenizers, train, validation=str(val)))
    assert prepared.validation.stats.pairs == 1 and len(prepared.validation.examples) == 2


# ------------------------------------------------------------------ inspect
def test_inspect_shows_both_sides_of_each_pair(tokenizers, tmp_path):
    row = conversation_pair("chatml")
    data = jsonl(tmp_path / "train.jsonl", [PAIR, row])
    prepared = prepare(spec_for(tokenizers, data))
    text = inspect.render(prepared, 5, color=False)
    assert "── pair 0, chosen:" in text and "── pair 1, rejected:" in text
    assert "⟦Sunny today.<|im_end|>⟧" in text and "⟦No idea.<|im_end|>⟧" in text
    assert "It is sunny in Paris.<|im_end|>" in text
    assert "⟦It is sunny in Paris." not in text  # the prompt's answer is not trained
    assert "2 rows -> 2 preference pairs (4 examples)" in text
    assert "trained per pair: chosen" in text
    assert "[bold green]" in inspect.render(prepared, 1, color=True)

    out = inspect.examples_json(prepared, 1)
    assert out["stats"]["pairs"] == 2
    (pair,) = out["examples"]
    _, tok = tokenizers["chatml"]
    for side, answer in (("chosen", "Sunny today."), ("rejected", "No idea.")):
        ex = pair[side]
        assert trained_runs(tok, ex["input_ids"], ex["labels"]) == [answer + "<|im_end|>"]
    assert json.loads(json.dumps(out)) == out


def test_pipeline_notes_for_pairs_name_the_first_row(tokenizers, tmp_path):
    data = jsonl(tmp_path / "train.jsonl", [PAIR, {"prompt": "a", "chosen": "b", "rejected": "b"}])
    lines = []
    prepare(spec_for(tokenizers, data, skip_invalid_rows=True), report=lines.append)
    assert lines == [
        "dataset.training: left out 1 of 2 rows that cannot be used (dataset.skip_invalid_rows); "
        f"first: {data}:2: chosen and rejected are identical"
    ]
