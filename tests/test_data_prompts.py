"""Prompt rows in the data pipeline (reinforcement learning): each row becomes the prompt as
training renders what comes before an answer, with the generation prompt; its answer becomes
the reference and its other columns what a reward is given; bad rows are reported as file:line;
`tuneplex data inspect` shows them."""

import json

import pytest
from tuneplex.data import inspect
from tuneplex.data.pipeline import build, prepare
from tuneplex.data.spec import DataSpec
from tuneplex.errors import UsageError


def spec(tok="tok", **kw) -> DataSpec:
    kw.setdefault("max_seq_length", 256)
    return DataSpec(train="t.jsonl", tokenizer=tok, prompts=True, **kw)


def encode(tok, rows, **kw):
    split = build([(f"t.jsonl:{i + 1}", r) for i, r in enumerate(rows)], spec(**kw), tok, key="k")
    return split, list(split.examples)


def test_chat_prompt_and_string_prompt_render_with_the_generation_prompt(tokenizers):
    _, tok = tokenizers["chatml"]
    rows = [
        {"messages": [{"role": "user", "content": "Add 2 and 3."}], "answer": "#### 5"},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Add 1 and 1."},
                {"role": "assistant", "content": "2"},
            ]
        },
        {"prompt": "Add 4 and 4.", "completion": "8", "level": 3},
        {"prompt": "Just a prompt."},
    ]
    split, examples = encode(tok, rows)
    texts = [tok.decode(e["input_ids"]) for e in examples]
    assert texts[0] == "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n"
    assert texts[1].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert texts[1].endswith("Add 1 and 1.<|im_end|>\n<|im_start|>assistant\n")
    assert [e["prompt"] for e in examples] == [
        "Add 2 and 3.",
        "Add 1 and 1.",
        "Add 4 and 4.",
        "Just a prompt.",
    ]
    # the answer is the reference: a final assistant turn, a completion; none otherwise
    assert [e["reference"] for e in examples] == [None, "2", "8", None]
    assert [json.loads(e["columns"]) for e in examples] == [
        {"answer": "#### 5"},
        {},
        {"completion": "8", "level": 3},
        {},
    ]
    assert (split.stats.prompts, split.stats.examples, split.stats.trained_tokens) == (4, 4, 0)


def test_column_mapping_and_a_reference_column(tokenizers):
    _, tok = tokenizers["chatml"]
    rows = [{"question": "What is 2 + 2?", "answer": "... #### 4", "gold": 4}]
    mapping = {"question": "question", "answer": "answer"}
    _, [mapped] = encode(tok, rows, column_mapping=mapping)
    assert mapped["prompt"] == "What is 2 + 2?" and mapped["reference"] == "... #### 4"
    assert json.loads(mapped["columns"]) == {"answer": "... #### 4", "gold": 4}
    _, [named] = encode(
        tok, rows, column_mapping=mapping, reference_column="gold", reference_required=True
    )
    assert named["reference"] == "4"  # a JSON number is as good an answer as its text


def test_bad_rows_are_named_together(tokenizers):
    _, tok = tokenizers["chatml"]
    rows = [
        {"text": "no prompt here"},
        {"prompt": "x " * 400, "answer": "1"},
        {"prompt": "fine", "answer": " "},
        {"messages": [{"role": "assistant", "content": "only an answer"}]},
        {"prompt": "fine too", "answer": "7"},
    ]
    with pytest.raises(UsageError) as info:
        encode(tok, rows, reference_column="answer", reference_required=True, max_seq_length=64)
    lines = info.value.lines()
    assert lines[0].startswith("t.jsonl:1: a text row (text) holds no prompt")
    assert lines[1].startswith("t.jsonl:2: the prompt has ")
    assert lines[1].endswith("tokens, max_seq_length is 64; shorten it or raise max_seq_length")
    assert lines[2] == (
        "t.jsonl:3: column 'answer' (the reward's reference) is blank; expected the answer as text"
    )
    assert lines[3] == "t.jsonl:4: the only message is the answer; no prompt before it"
    assert lines[4].startswith("k: 4 of 5 rows cannot be used")
    split, examples = encode(
        tok,
        rows,
        reference_column="answer",
        reference_required=True,
        max_seq_length=64,
        skip_invalid_rows=True,
    )
    assert [e["prompt"] for e in examples] == ["fine too"]
    assert split.stats.skipped_invalid_rows == 4


def test_a_row_without_its_own_answer_when_the_reward_needs_one(tokenizers):
    _, tok = tokenizers["chatml"]
    with pytest.raises(UsageError) as info:
        encode(tok, [{"prompt": "2 + 2?"}], reference_required=True)
    assert info.value.lines()[0].startswith("t.jsonl:1: no reference answer for the reward")


def test_inspect_shows_prompts_references_and_columns(tokenizers, tmp_path):
    path, _ = tokenizers["chatml"]
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Add 4 and 4.", "completion": "8", "level": 3}) + "\n")
    prepared = prepare(DataSpec(train=str(data), tokenizer=path, max_seq_length=64, prompts=True))
    text = inspect.render(prepared, 1, color=False)
    assert "── prompt 0: " in text and "(the model generates after it)" in text
    assert "<|im_start|>user\nAdd 4 and 4.<|im_end|>\n<|im_start|>assistant\n" in text
    assert "reference: 8" in text
    assert "columns given to the reward: completion, level" in text
    assert "train: 1 rows -> 1 prompts" in text
    out = inspect.examples_json(prepared, 1)
    assert out["examples"][0]["reference"] == "8"
    assert out["stats"]["prompts"] == 1
