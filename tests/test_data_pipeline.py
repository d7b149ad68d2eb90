"""Sources, cache, packing and `tuneplex data inspect`, on real files and a real tiny model."""

import json
import random
from pathlib import Path

import pytest
import yaml
from tuneplex.cli import app, main
from tuneplex.data import pipeline, sources
from tuneplex.data.packing import best_fit, pack
from tuneplex.data.pipeline import prepare
from tuneplex.data.spec import DataSpec
from tuneplex.data.targets import IGNORE_INDEX
from tuneplex.errors import UsageError
from typer.testing import CliRunner

CHAT = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Sunny today."},
    ]
}


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spec_for(tokenizers, data, **kw):
    path, _ = tokenizers["chatml"]
    return DataSpec(
        train=str(data), tokenizer=path, max_seq_length=kw.pop("max_seq_length", 256), **kw
    )


# ------------------------------------------------------------------ sources
def test_jsonl_json_parquet_and_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "data"
    d.mkdir()
    jsonl(d / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    (d / "b.json").write_text(json.dumps([{"text": "three"}]))
    pq.write_table(pa.table({"text": ["four", "five"]}), d / "c.parquet")
    (d / "notes.txt").write_text("ignored")
    src = sources.resolve(str(d), key="dataset.training")
    rows = sources.read_rows(src, key="dataset.training")
    assert [r["text"] for _, r in rows] == ["one", "two", "three", "four", "five"]
    assert rows[0][0] == f"{d / 'a.jsonl'}:1"


def test_rows_read_exactly_as_written(tmp_path):
    rows = [{"messages": [], "x": {"a": 1}}, {"messages": [], "x": {"b": [1, 2]}}]
    src = sources.resolve(str(jsonl(tmp_path / "d.jsonl", rows)), key="k")
    assert [r for _, r in sources.read_rows(src, key="k")] == rows


@pytest.mark.parametrize(
    "content,message",
    [
        (
            '{"text": "ok"}\n{"text": "broken\n',
            ":2: invalid JSON: Invalid control character at (column 17)",
        ),
        ('{"text": "ok"}\n\n[1, 2]\n', ":3: expected a JSON object, got a list"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    rows = sources.read_rows(sources.resolve(str(path), key="k"), key="k")
    assert rows[0] == (f"{path}:1", {"text": "ok"})
    assert [str(row) for _, row in rows[1:]] == [f"{path}{message}"]


def test_missing_path_and_bad_suffix(tmp_path):
    with pytest.raises(UsageError) as info:
        sources.resolve(str(tmp_path / "nope.jsonl"), key="dataset.training")
    assert info.value.lines() == [
        f"dataset.training: {tmp_path / 'nope.jsonl'}: no such file or directory"
    ]
    (tmp_path / "d.csv").write_text("a,b")
    with pytest.raises(UsageError) as info:
        sources.resolve(str(tmp_path / "d.csv"), key="k")
    assert "unsupported file type" in info.value.lines()[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError) as info:
        sources.resolve(str(tmp_path / "empty"), key="k")
    assert "directory has no .jsonl, .json, .parquet files" in info.value.lines()[0]


def test_hub_id_offline_without_cache_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    src = sources.resolve("someorg/somedata", key="dataset.training")
    assert src.hub_id == "someorg/somedata"
    with pytest.raises(UsageError) as info:
        sources.read_rows(src, key="dataset.training")
    assert info.value.lines() == [
        "dataset.training: someorg/somedata: not a local file or directory, and not loadable: "
        "the Hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache"
    ]


def test_empty_dataset(tokenizers, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    with pytest.raises(UsageError) as info:
        prepare(spec_for(tokenizers, data))
    assert info.value.lines() == [f"dataset.training: {data}: no rows"]


def test_tokenizer_path_missing(tmp_path):
    with pytest.raises(UsageError) as info:
        pipeline.load_tokenizer(str(tmp_path / "nowhere"))
    assert info.value.lines()[0].startswith(
        f"model: {tmp_path / 'nowhere'}: cannot load a tokenizer"
    )


# ------------------------------------------------------------------ cache
def test_rerun_reads_the_cache_and_changes_invalidate_it(tokenizers, tmp_path, monkeypatch):
    data = jsonl(tmp_path / "train.jsonl", [CHAT, {"input": "a?", "output": "b."}])
    spec = spec_for(tokenizers, data)
    first = prepare(spec)
    calls = []
    real = sources.read_rows
    monkeypatch.setattr(sources, "read_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = prepare(spec)
    assert calls == []  # nothing read or tokenized: loaded from the cache
    assert again.train.examples["input_ids"] == first.train.examples["input_ids"]
    assert again.train.stats == first.train.stats

    prepare(spec_for(tokenizers, data, max_seq_length=128))
    assert len(calls) == 1  # another max_seq_length
    prepare(spec_for(tokenizers, data, chat_template="passthrough"))
    assert len(calls) == 2  # another template
    other_tok, _ = tokenizers["llama3"]
    prepare(DataSpec(train=str(data), tokenizer=other_tok, max_seq_length=256))
    assert len(calls) == 3  # another tokenizer
    jsonl(data, [CHAT, {"input": "a?", "output": "c."}])
    changed = prepare(spec)
    assert len(calls) == 4  # another content
    assert changed.train.examples["input_ids"] != first.train.examples["input_ids"]
    prepare(spec)
    assert len(calls) == 4


def test_a_cache_entry_written_meanwhile_by_another_job_is_kept(tokenizers, tmp_path):
    """Two jobs preparing the same data at once: the second to finish finds the entry the
    first wrote (the same content, perhaps being read) and leaves it as it is."""
    from tuneplex.data import pipeline
    from tuneplex.data.pipeline import cache_root

    spec = spec_for(tokenizers, jsonl(tmp_path / "train.jsonl", [CHAT]))
    first = prepare(spec)
    (where,) = [p for p in cache_root().iterdir() if (p / "stats.json").is_file()]
    held = (where / "stats.json").stat().st_ino
    pipeline._save(first.train, where)  # as the slower of two jobs would, at its end
    assert (where / "stats.json").stat().st_ino == held
    assert sorted(p.name for p in cache_root().iterdir()) == [where.name]  # no leftovers
    assert prepare(spec).train.examples["input_ids"] == first.train.examples["input_ids"]


# ------------------------------------------------------------------ packing
def test_best_fit_uses_each_example_once_within_capacity():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 200))]
        bins = best_fit(lengths, 128)
        flat = sorted(i for b in bins for i in b)
        assert flat == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
        # best fit never needs more than ~1.7x the lower bound; check it packs tightly here
        assert len(bins) <= -(-sum(lengths) // 128) * 1.25 + 1


def test_best_fit_rejects_oversized():
    with pytest.raises(ValueError):
        best_fit([10, 200], 128)


def test_pack_positions_restart_per_sample():
    import numpy as np

    ex = [(np.array([1, 2, 3]), np.array([-100, 2, 3])), (np.array([4, 5]), np.array([4, 5]))]
    (row,) = pack(ex, 8)
    assert row["input_ids"].tolist() == [1, 2, 3, 4, 5]
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1]
    assert row["seq_lens"].tolist() == [3, 2]
    assert row["labels"].tolist() == [-100, 2, 3, 4, 5]


def test_packing_stats_and_rows(tokenizers, tmp_path):
    rows = [CHAT, {"input": "two plus two?", "output": "four."}, {"text": "The river is blue."}] * 5
    data = jsonl(tmp_path / "train.jsonl", rows)
    prepared = prepare(spec_for(tokenizers, data, packing=True, max_seq_length=64))
    split = prepared.train
    assert split.stats.packed_rows == len(split.packed)
    total = sum(len(r) for r in split.packed["input_ids"])
    assert total == split.stats.tokens
    assert split.stats.packing_efficiency == round(total / (len(split.packed) * 64), 4)
    assert all(len(r) <= 64 for r in split.packed["input_ids"])
    assert split.dataset is split.packed


def test_packed_logits_equal_solo_logits(tokenizers, tmp_path):
    """No attention across samples: each token's logits in a packed row equal its logits when
    its sample runs alone (tiny Llama, fp32)."""
    import torch
    from tuneplex.testing.tiny import build_llama

    path, tok = tokenizers["chatml"]
    model = build_llama(tmp_path / "model", tokenizer=tok)
    model.eval()
    rows = [
        CHAT,
        {"input": "two plus two?", "output": "four."},
        {"text": "The river is blue."},
        {"input": "why is the sky blue?", "output": "Because of the light and the air."},
    ]
    data = jsonl(tmp_path / "train.jsonl", rows)
    prepared = prepare(DataSpec(train=str(data), tokenizer=path, max_seq_length=256, packing=True))
    (packed,) = prepared.train.packed  # all four fit in one row
    assert len(packed["seq_lens"]) == 4
    with torch.no_grad():
        ids = torch.tensor([packed["input_ids"]])
        pos = torch.tensor([packed["position_ids"]])
        # no attention mask and no KV cache: transformers then builds the block-diagonal mask
        # from the restarting position ids (the trainer calls the model the same way)
        packed_logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        start = 0
        for n in packed["seq_lens"]:
            solo = model(input_ids=ids[:, start : start + n], use_cache=False).logits[0]
            torch.testing.assert_close(packed_logits[start : start + n], solo, atol=1e-5, rtol=1e-5)
            start += n
        # and the check has teeth: without position ids the samples do attend to each other
        leaky = model(input_ids=ids, use_cache=False).logits[0]
        n0 = packed["seq_lens"][0]
        assert not torch.allclose(leaky[n0 : n0 + 5], packed_logits[n0 : n0 + 5], atol=1e-3)


# ------------------------------------------------------------------ CLI
def write_job(tmp_path, tokenizers, rows, extra=""):
    data = jsonl(tmp_path / "train.jsonl", rows)
    path, _ = tokenizers["chatml"]
    job = tmp_path / "job.yaml"
    job.write_text(
        f"model: {path}\ndataset:\n  training: {data}\ntraining:\n  max_seq_length: 128\n" + extra
    )
    return job


def test_inspect_json(tokenizers, tmp_path):
    job = write_job(tmp_path, tokenizers, [CHAT, {"text": "The river is blue."}])
    result = CliRunner().invoke(app, ["data", "inspect", str(job), "--json", "-n", "2"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert len(out["examples"]) == 2
    ex = out["examples"][0]
    assert len(ex["input_ids"]) == len(ex["labels"])
    _, tok = tokenizers["chatml"]
    trained = [
        t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE_INDEX
    ]
    assert tok.decode(trained) == "Sunny today.<|im_end|>"
    assert out["stats"]["rows"] == 2 and out["stats"]["formats"] == {"chat": 1, "text": 1}
    assert out["stats"]["trained_tokens"] == sum(
        sum(1 for x in e["labels"] if x != IGNORE_INDEX) for e in out["examples"]
    )


def test_inspect_text_marks_trained_tokens(tokenizers, tmp_path):
    job = write_job(tmp_path, tokenizers, [CHAT], "batch:\n  sequence_packing: true\n")
    result = CliRunner().invoke(app, ["data", "inspect", str(job), "-n", "1"])
    assert result.exit_code == 0, result.output
    assert "⟦Sunny today.<|im_end|>⟧" in result.output
    assert "packing efficiency" in result.output


def test_inspect_never_loads_weights(tokenizers, tmp_path):
    """The job's model directory holds only a tokenizer: inspect must still work."""
    job = write_job(tmp_path, tokenizers, [CHAT])
    assert CliRunner().invoke(app, ["data", "inspect", str(job), "--json"]).exit_code == 0


def test_inspect_bad_data_is_one_line_exit_2(tokenizers, tmp_path, capsys):
    job = write_job(tmp_path, tokenizers, [CHAT])
    (tmp_path / "train.jsonl").write_text(json.dumps(CHAT) + "\n{oops\n")
    assert main(["data", "inspect", str(job)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"{tmp_path / 'train.jsonl'}:2: invalid JSON: Expecting property name enclosed "
        "in double quotes (column 2)\n"
    )


def test_inspect_unsloth_job(tokenizers, tmp_path):
    data = jsonl(tmp_path / "train.jsonl", [CHAT])
    path, _ = tokenizers["llama3"]
    job = tmp_path / "u.yaml"
    job.write_text(
        f"model:\n  name: {path}\ndataset:\n  path: {data}\n  apply_chat_template: true\n"
    )
    result = CliRunner().invoke(app, ["data", "inspect", str(job), "-b", "unsloth", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["stats"]["formats"] == {"chat": 1}


def test_collated_padding_changes_nothing(tokenizers, tmp_path):
    """A padded batch gives every real token the logits it has alone; padding is never trained."""
    import torch
    from tuneplex.data.collate import collate
    from tuneplex.testing.tiny import build_llama

    path, tok = tokenizers["chatml"]
    model = build_llama(tmp_path / "model", tokenizer=tok).eval()
    data = jsonl(tmp_path / "train.jsonl", [CHAT, {"text": "Blue."}])
    rows = list(
        prepare(DataSpec(train=str(data), tokenizer=path, max_seq_length=64)).train.examples
    )
    batch = collate(rows, pad_id=tok.pad_token_id, pad_to_multiple_of=8)
    assert batch["input_ids"].shape[1] % 8 == 0
    short = len(rows[1]["input_ids"])
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all()
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            solo = model(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(out[i, :k], solo, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ bad rows, all at once
def write_bad_data(tmp_path, bad: int) -> Path:
    """Good chat rows with `bad` unusable lines among them: broken JSON, a role the data
    format rejects, and chats the template refuses (roles that do not alternate)."""
    lines = []
    for i in range(bad):
        lines.append(json.dumps(CHAT))
        kind = i % 3
        if kind == 0:
            lines.append('{"messages": [')
        elif kind == 1:
            lines.append(json.dumps({"messages": [{"role": "robot", "content": "x"}]}))
        else:
            msgs = [*CHAT["messages"], {"role": "assistant", "content": "again"}]
            lines.append(json.dumps({"messages": msgs}))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


ALTERNATING = (
    "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def template_job(tmp_path, tokenizers, data: Path, template: str) -> Path:
    """An automodel job over `data` rendered with the chat `template`."""
    path, _ = tokenizers["chatml"]
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "model": path,
                "dataset": {"training": str(data), "prompt_template": template},
                "training": {"max_seq_length": 128},
            }
        )
    )
    return job


def bad_rows_job(tmp_path, tokenizers, bad: int) -> Path:
    return template_job(tmp_path, tokenizers, write_bad_data(tmp_path, bad), ALTERNATING)


def test_every_bad_row_is_reported_in_one_run(tokenizers, tmp_path, capsys):
    job = bad_rows_job(tmp_path, tokenizers, 25)
    assert main(["data", "inspect", str(job)]) == 2
    lines = capsys.readouterr().err.splitlines()
    data = tmp_path / "train.jsonl"
    expected = {
        0: "invalid JSON: Expecting value (column 1)",
        1: "messages[0].role: must be one of system, user, assistant, tool (got 'robot')",
        2: "chat template error: roles must alternate",
    }
    assert lines[:20] == [f"{data}:{2 * i + 2}: {expected[i % 3]}" for i in range(20)]
    assert lines[20:] == [
        "... and 5 more rows",
        "dataset.training: 25 of 50 rows cannot be used; fix them, or set "
        "dataset.skip_invalid_rows: true to leave them out (counted in the stats)",
    ]


def test_skip_invalid_rows_leaves_them_out_and_counts_them(tokenizers, tmp_path, capsys):
    job = bad_rows_job(tmp_path, tokenizers, 25)
    data = tmp_path / "train.jsonl"
    skip = ["--set", "dataset.skip_invalid_rows=true"]
    for attempt in ("built", "cached"):  # the cached rerun says it too
        assert main(["data", "inspect", str(job), "--json", *skip]) == 0
        out = capsys.readouterr()
        stats = json.loads(out.out)["stats"]
        assert stats["rows"] == 50 and stats["examples"] == 25, attempt
        assert stats["skipped_invalid_rows"] == 25
        assert stats["formats"] == {"chat": 25}
        assert stats["first_skipped"] == f"{data}:2: invalid JSON: Expecting value (column 1)"
        assert out.err.splitlines() == [
            "dataset.training: left out 25 of 50 rows that cannot be used "
            f"(dataset.skip_invalid_rows); first: {data}:2: invalid JSON: Expecting value "
            "(column 1)"
        ]
    assert main(["data", "inspect", str(job), *skip]) == 0
    assert "left out (invalid) 25" in capsys.readouterr().out


DROPS_SYSTEM = (
    "{% for m in messages %}{% if m.role != 'system' %}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_text_the_template_drops_is_reported_with_a_count_and_the_first_row(
    tokenizers, tmp_path, capsys
):
    system = {"role": "system", "content": "Be brief."}
    rows = [CHAT, {"messages": [system, *CHAT["messages"]]}, CHAT]
    data = jsonl(tmp_path / "train.jsonl", rows)
    job = template_job(tmp_path, tokenizers, data, DROPS_SYSTEM)
    assert main(["data", "inspect", str(job), "-n", "0"]) == 0
    out = capsys.readouterr()
    assert out.err.splitlines() == [
        f"dataset.training: the chat template drops system messages (1 of 3 rows; first: {data}:2)"
    ]
    assert "template drops system messages in 1 rows" in out.out


@pytest.mark.parametrize(
    "backend,job",
    [
        (
            "automodel",
            {"model": "m", "dataset": {"training": "t.jsonl", "skip_invalid_rows": True}},
        ),
        (
            "unsloth",
            {"model": {"name": "m"}, "dataset": {"path": "t.jsonl", "skip_invalid_rows": True}},
        ),
    ],
)
def test_both_backends_pass_skip_invalid_rows_to_the_pipeline(backend, job):
    from tuneplex.plugins import registry
    from tuneplex.schema.loading import validate_job

    b = registry().get(backend).backend
    assert b.data_spec(validate_job(b.job_schema, job)).skip_invalid_rows is True
    del job["dataset"]["skip_invalid_rows"]
    assert b.data_spec(validate_job(b.job_schema, job)).skip_invalid_rows is False
