"""Loss masks are exactly the answer tokens, for three chat template styles and every format."""

import json

import pytest
from helpers import trained_runs, untrained_text
from tuneplex.data.pipeline import build
from tuneplex.data.spec import DataSpec
from tuneplex.data.targets import IGNORE_INDEX
from tuneplex.errors import UsageError

EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}


def spec(**kw):
    return DataSpec(**{"train": "t.jsonl", "tokenizer": "tok", "max_seq_length": 1024, **kw})


def encode(tok, rows, **kw):
    split = build([(f"t.jsonl:{i + 1}", r) for i, r in enumerate(rows)], spec(**kw), tok, key="k")
    return split, [(r["input_ids"], r["labels"]) for r in split.examples]


def conversation(style):
    turns = [
        ("user", "What is the weather in Paris today?"),
        ("assistant", "It is sunny in Paris."),
        ("user", "And in London tomorrow? Say [/INST] if unsure."),
        ("assistant", "Rainy, I think. The river is blue!"),
        ("user", "Thanks."),
        ("assistant", "Hello world, one two three."),
    ]
    msgs = [{"role": r, "content": c} for r, c in turns]
    if style != "mistral":  # Mistral's template allows only alternating user/assistant
        msgs.insert(0, {"role": "system", "content": "You answer weather questions briefly."})
    return msgs


@pytest.mark.parametrize("style", ["chatml", "llama3", "mistral"])
def test_every_assistant_turn_trained_nothing_else(tokenizers, style):
    _, tok = tokenizers[style]
    msgs = conversation(style)
    _, [(ids, labels)] = encode(tok, [{"messages": msgs}])
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert trained_runs(tok, ids, labels) == [a + EOT[style] for a in answers]
    rest = untrained_text(tok, ids, labels)
    for m in msgs:
        if m["role"] != "assistant":
            assert m["content"] in rest


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_tool_turns_never_trained_tool_calls_are(tokenizers, style):
    _, tok = tokenizers[style]
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}],
        },
        {"role": "tool", "content": "22C and sunny"},
        {"role": "assistant", "content": "It is 22C and sunny."},
    ]
    _, [(ids, labels)] = encode(tok, [{"messages": msgs, "tools": [{"name": "get_weather"}]}])
    runs = trained_runs(tok, ids, labels)
    assert len(runs) == 2
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in runs[0]
    assert runs[1].endswith("It is 22C and sunny." + EOT[style])
    assert "22C and sunny" + EOT[style] in untrained_text(tok, ids, labels)


def test_heterogeneous_tool_arguments_kept_exactly(tokenizers):
    _, tok = tokenizers["chatml"]
    calls = [
        {"name": "search", "arguments": {"query": "rivers"}},
        {"name": "calc", "arguments": {"expression": "2+2", "precision": 2}},
    ]
    rows = [
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": [c]},
            ]
        }
        for c in calls
    ]
    _, encoded = encode(tok, rows)
    for call, (ids, _) in zip(calls, encoded, strict=True):
        text = tok.decode(ids, skip_special_tokens=False)
        assert json.dumps(call) in text  # no keys added, nothing None-filled
        assert "null" not in text


@pytest.mark.parametrize("style", ["chatml", "llama3", "mistral"])
def test_prompt_completion_through_the_template(tokenizers, style):
    _, tok = tokenizers[style]
    _, [(ids, labels)] = encode(tok, [{"input": "Two plus two?", "output": "Four."}])
    runs = trained_runs(tok, ids, labels)
    assert runs == ["Four." + EOT[style]]


def test_prompt_completion_without_template_bos_and_eos(tokenizers):
    _, tok = tokenizers["llama3"]  # this tokenizer adds BOS by itself
    _, [(ids, labels)] = encode(
        tok, [{"prompt": "Q: two plus two?", "completion": " A: four."}], chat_template="none"
    )
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    assert trained_runs(tok, ids, labels) == [" A: four.<|eot_id|>"]
    assert untrained_text(tok, ids, labels) == "<|begin_of_text|>Q: two plus two?"


def test_text_format_trains_every_token(tokenizers):
    _, tok = tokenizers["chatml"]  # no BOS
    split, [(ids, labels)] = encode(tok, [{"text": "The river is blue."}])
    assert labels == ids
    assert tok.decode(ids, skip_special_tokens=False) == "The river is blue.<|im_end|>"
    assert split.stats.formats == {"text": 1}


def test_custom_text_field(tokenizers):
    _, tok = tokenizers["chatml"]
    split, _ = encode(tok, [{"body": "Hello world."}], text_field="body")
    assert split.stats.formats == {"text": 1}


def test_column_mapped(tokenizers):
    _, tok = tokenizers["chatml"]
    rows = [{"instruction": "Answer briefly.", "input": "Capital of France?", "response": "Paris."}]
    mapping = {"context": "instruction", "question": "input", "answer": "response"}
    split, [(ids, labels)] = encode(tok, rows, column_mapping=mapping)
    assert split.stats.formats == {"column_mapped": 1}
    assert trained_runs(tok, ids, labels) == ["Paris.<|im_end|>"]
    assert "Answer briefly.\n\nCapital of France?" in untrained_text(tok, ids, labels)


def test_missing_mapped_column_names_the_row_columns(tokenizers):
    _, tok = tokenizers["chatml"]
    with pytest.raises(UsageError) as info:
        encode(
            tok,
            [{"question": "q", "answer": "a"}, {"question": "q", "reply": "a"}],
            column_mapping={"question": "question", "answer": "answer"},
        )
    assert info.value.lines() == [
        "t.jsonl:2: column 'answer' (dataset.column_mapping.answer) missing; "
        "row has: question, reply"
    ]


def test_passthrough_concatenates_and_masks_assistant_contents(tokenizers):
    _, tok = tokenizers["chatml"]
    msgs = [
        {"role": "user", "content": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"},
        {"role": "assistant", "content": "Hello world.<|im_end|>"},
    ]
    _, [(ids, labels)] = encode(tok, [{"messages": msgs}], chat_template="passthrough")
    assert trained_runs(tok, ids, labels) == ["Hello world.<|im_end|>"]
    assert tok.decode(ids, skip_special_tokens=False) == msgs[0]["content"] + msgs[1]["content"]


def test_custom_jinja_template(tokenizers):
    _, tok = tokenizers["chatml"]
    template = (
        "{% for m in messages %}{% if m.role == 'user' %}Question: {{ m.content }}\n"
        "{% elif m.role == 'assistant' %}Answer: {{ m.content }}{{ eos_token }}\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}Answer: {% endif %}"
    )
    msgs = [
        {"role": "user", "content": "Two?"},
        {"role": "assistant", "content": "Two."},
        {"role": "user", "content": "Three?"},
        {"role": "assistant", "content": "Three."},
    ]
    _, [(ids, labels)] = encode(tok, [{"messages": msgs}], chat_template=template)
    # "Answer: " ends with a space that the tokenizer merges into the answer's first token
    # ("ĠTwo"): a token holding any answer character is trained, since the model must emit it
    assert trained_runs(tok, ids, labels) == [" Two.<|im_end|>", " Three.<|im_end|>"]


def test_template_that_drops_an_earlier_answer_trains_what_it_renders_and_says_so(tokenizers):
    _, tok = tokenizers["chatml"]
    # drops all but the last assistant answer, as some reasoning templates do with old thoughts:
    # the conversation as rendered is what trains, and the loss of the first answer is reported
    template = (
        "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}"
        "{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "second answer"},
    ]
    split, [(ids, labels)] = encode(tok, [{"messages": msgs}], chat_template=template)
    assert trained_runs(tok, ids, labels) == [" second answer"]
    assert split.stats.template_drops == {"assistant messages": {"rows": 1, "first": "t.jsonl:1"}}


def test_template_error_names_the_row(tokenizers):
    _, tok = tokenizers["mistral"]
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
            ]
        },
    ]
    with pytest.raises(UsageError) as info:
        encode(tok, rows)
    assert info.value.lines() == [
        "t.jsonl:2: chat template error: Conversation roles must alternate "
        "user/assistant/user/assistant/..."
    ]


def test_chat_rows_without_template_mode(tokenizers):
    _, tok = tokenizers["chatml"]
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    with pytest.raises(UsageError) as info:
        encode(tok, rows, chat_template="none")
    assert "apply_chat_template: true" in info.value.lines()[0]


def test_truncation_counted_and_answerless_rows_dropped(tokenizers):
    _, tok = tokenizers["chatml"]
    long_prompt = "word " * 200
    rows = [
        {"input": "short?", "output": "yes."},
        {"input": "short?", "output": "yes " * 100},  # truncated, still has trained tokens
        {"input": long_prompt, "output": "lost."},  # answer cut off entirely: dropped
        {"messages": [{"role": "user", "content": "no answer here"}]},  # nothing to train
    ]
    split, encoded = encode(tok, rows, max_seq_length=64)
    assert split.stats.truncated == 2
    assert split.stats.dropped_no_trained_tokens == 2
    assert split.stats.examples == 2 and split.stats.rows == 4
    assert all(len(ids) <= 64 for ids, _ in encoded)
    assert split.stats.tokens == sum(len(ids) for ids, _ in encoded)
    assert split.stats.trained_tokens == sum(
        sum(1 for x in lab if x != IGNORE_INDEX) for _, lab in encoded
    )


def test_no_trainable_token_at_all_fails_clearly(tokenizers):
    _, tok = tokenizers["chatml"]
    with pytest.raises(UsageError) as info:
        encode(tok, [{"messages": [{"role": "user", "content": "hi"}]}])
    assert info.value.lines() == [
        "k: no example has a trained token (1 rows, 1 without an answer after truncation to "
        "1024 tokens)"
    ]


@pytest.mark.parametrize(
    "row,message",
    [
        (
            {"foo": 1},
            "t.jsonl:1: cannot tell this row's format (columns: foo); expected "
            "'messages', 'input'/'output', 'prompt'/'completion' or 'text' "
            "(or set dataset.format / dataset.column_mapping)",
        ),
        ({"messages": []}, "t.jsonl:1: 'messages' must be a non-empty list of messages"),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            "t.jsonl:1: messages[0].role: must be one of system, user, assistant, tool "
            "(got 'robot')",
        ),
        ({"messages": [{"role": "user"}]}, "t.jsonl:1: messages[0].content: missing"),
        (
            {"messages": [{"role": "user", "content": 3}]},
            "t.jsonl:1: messages[0].content: must be a string, got int",
        ),
        ({"input": "a", "output": 5}, "t.jsonl:1: column 'output' must be a string, got int"),
    ],
)
def test_bad_rows(tokenizers, row, message):
    _, tok = tokenizers["chatml"]
    with pytest.raises(UsageError) as info:
        encode(tok, [row])
    assert info.value.lines() == [message]


def test_forced_format(tokenizers):
    _, tok = tokenizers["chatml"]
    # a row with both shapes: auto picks chat; forcing text uses the text field
    row = {
        "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        "text": "plain words",
    }
    split, _ = encode(tok, [row])
    assert split.stats.formats == {"chat": 1}
    split, [(ids, _)] = encode(tok, [row], format="text")
    assert split.stats.formats == {"text": 1}
    assert tok.decode(ids, skip_special_tokens=False) == "plain words<|im_end|>"


def test_same_data_same_tokens_for_both_backends(tokenizers, tmp_path):
    """The backends build their DataSpec differently; the tokens and masks must not differ."""
    from tuneplex.data.pipeline import prepare
    from tuneplex.plugins import registry
    from tuneplex.schema.loading import validate_job

    path, _ = tokenizers["llama3"]
    data = tmp_path / "train.jsonl"
    rows = [{"messages": conversation("llama3")}, {"input": "a?", "output": "b."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    jobs = {
        "automodel": {
            "model": path,
            "dataset": {"training": str(data)},
            "training": {"max_seq_length": 256},
        },
        "unsloth": {
            "model": {"name": path, "max_seq_length": 256},
            "dataset": {"path": str(data), "apply_chat_template": True},
        },
    }
    out = {}
    for name, job in jobs.items():
        backend = registry().get(name).backend
        prepared = prepare(backend.data_spec(validate_job(backend.job_schema, job)))
        out[name] = [(r["input_ids"], r["labels"]) for r in prepared.train.examples]
    assert out["automodel"] == out["unsloth"]
