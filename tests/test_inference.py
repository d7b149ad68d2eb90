"""generate / chat / eval on real runs: tiny local models trained here, transformers as the
reference, the training pipeline as the judge of prompt rendering."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers import chat_rows, run_job, write_rows  # noqa: E402
from tuneplex.cli import main  # noqa: E402
from tuneplex.data.targets import IGNORE_INDEX  # noqa: E402

FT = {"lora": "lora", "merged": "lora_merged", "full": "all_weights"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    train, val = root / "train.jsonl", root / "val.jsonl"
    write_rows(train, chat_rows(24))
    write_rows(val, chat_rows(6, seed=1))
    return train, val


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, data):
    """{kind: run directory} for lora / merged / full, trained in fp32 (lazily, once)."""
    root = tmp_path_factory.mktemp("runs")
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            run = root / kind
            said = io.StringIO()  # not into the output of the test that asked first
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                code = main(
                    ["train", str(run_job(root, tiny_model, data, FT[kind])), "-o", str(run)]
                )
            assert code == 0, said.getvalue()
            made[kind] = run
        return made[kind]

    return get


def _loaded(ref, **kw):
    from tuneplex.inference.loading import load
    from tuneplex.inference.target import resolve

    scratch = Path(kw.pop("scratch"))
    return load(resolve(str(ref), device="cpu", scratch=scratch, **kw), device="cpu")


def _reference_generate(model, ids, *, stop, pad_id, max_new_tokens):
    """transformers' own greedy generate, one prompt at a time, no padding."""
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(stop),
        pad_token_id=pad_id,
    )[0, len(ids) :].tolist()
    for k, t in enumerate(out):  # the stop token ends it and is not part of the answer
        if t in stop:
            return out[:k]
    return out


def _last_val_loss(run: Path, step: int | None = None) -> float:
    vals = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "val"
    ]
    if step is None:
        return vals[-1]["loss"]
    return next(v["loss"] for v in vals if v["step"] == step)


SLOW = pytest.mark.slow  # each trains one more run


@pytest.mark.parametrize(
    "kind", ["lora", pytest.param("merged", marks=SLOW), pytest.param("full", marks=SLOW)]
)
def test_greedy_generate_equals_transformers_token_for_token(runs, data, kind, tmp_path):
    run = runs(kind)
    loaded = _loaded(run, scratch=tmp_path)
    assert loaded.target.adapter == (kind == "lora")
    prompter, gen = loaded.engine()
    from tuneplex.inference.engine import Sampling

    prompts = [*prompter.from_file(data[1]), prompter.from_text("Reverse: river blue a")]
    done = gen.generate([p.ids for p in prompts], Sampling(max_new_tokens=24), batch_size=4)
    stopped = 0
    for p, c in zip(prompts, done, strict=True):
        ref = _reference_generate(
            loaded.model, p.ids, stop=prompter.stop.token_ids, pad_id=gen.pad_id, max_new_tokens=24
        )
        assert c.ids == ref
        assert not set(c.ids) & set(prompter.stop.token_ids)
        assert "<|im_end|>" not in c.text
        stopped += c.stopped
    assert stopped >= 1  # the trained model ends its turns: the stop token is honoured


def test_generate_cli_json_matches_the_engine(runs, tmp_path, capsys):
    run = runs("lora")
    code = main(["generate", str(run), "Reverse: river blue a", "Reverse: code fast", "--json"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    rows = [json.loads(line) for line in out]
    assert [set(r) for r in rows] == [{"prompt", "completion", "completion_tokens"}] * 2
    assert rows[0]["prompt"] == "Reverse: river blue a"
    loaded = _loaded(run, scratch=tmp_path)
    prompter, gen = loaded.engine()
    from tuneplex.inference.engine import Sampling

    want = gen.generate(
        [prompter.from_text(r["prompt"]).ids for r in rows], Sampling(max_new_tokens=256)
    )
    assert [r["completion"] for r in rows] == [c.text for c in want]
    assert [r["completion_tokens"] for r in rows] == [len(c.ids) for c in want]


def test_generate_file_keeps_references_and_order(runs, data, capsys):
    code = main(
        ["generate", str(runs("lora")), "--file", str(data[1]), "--json", "--batch-size", "2"]
    )
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    source = [json.loads(line) for line in data[1].read_text().splitlines()]
    assert [r["reference"] for r in rows] == [s["messages"][-1]["content"] for s in source]
    assert [r["prompt"] for r in rows] == [s["messages"][0]["content"] for s in source]


def test_sampling_is_seeded(runs, capsys):
    args = [
        "generate",
        str(runs("lora")),
        "Reverse: a b c",
        "--temperature",
        "1.5",
        "--top-k",
        "50",
    ]
    args += ["--top-p", "0.95", "--max-new-tokens", "12"]
    outs = []
    for seed in ("1", "1", "2"):
        assert main([*args, "--seed", seed, "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out)["completion"])
    assert outs[0] == outs[1]
    assert outs[0] != outs[2] or outs[0] == ""  # different seeds, different draws


@pytest.mark.parametrize("kind", ["lora", pytest.param("full", marks=SLOW)])
def test_checkpoint_target_reproduces_that_steps_validation_loss(runs, data, kind, capsys):
    run = runs(kind)
    code = main(
        [
            "eval",
            str(run),
            "--checkpoint",
            "step_3",
            "--data",
            str(data[1]),
            "--json",
            "--no-generate",
        ]
    )
    assert code == 0
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert got["model"]["loss"] == pytest.approx(_last_val_loss(run, 3), abs=1e-5)


def test_eval_reproduces_the_runs_validation_losses(runs, data, capsys):
    run = runs("lora")
    code = main(["eval", str(run), "--data", str(data[1]), "--baseline", "--json"])
    assert code == 0
    got = json.loads(capsys.readouterr().out)
    assert set(got) == {"model", "baseline"}
    keys = {"loss", "perplexity", "n", "exact_match", "token_f1"}
    assert set(got["model"]) == set(got["baseline"]) == keys
    assert got["model"]["loss"] == pytest.approx(_last_val_loss(run), abs=1e-5)
    assert got["baseline"]["loss"] == pytest.approx(_last_val_loss(run, 0), abs=1e-5)
    assert got["model"]["perplexity"] == pytest.approx(math.exp(got["model"]["loss"]))
    assert got["model"]["n"] == 6
    assert got["model"]["exact_match"] >= got["baseline"]["exact_match"]
    # kept in the run, shown by `runs show`
    from tuneplex.runs.listing import latest_eval

    assert latest_eval(run)["model"] == got["model"]
    assert main(["runs", "show", str(run)]) == 0
    shown = capsys.readouterr().out
    assert f"eval       final on {data[1]}" in shown
    assert (
        f"  loss         {got['model']['loss']:.4f} (base {got['baseline']['loss']:.4f})" in shown
    )


def test_eval_side_by_side_and_samples(runs, data, capsys):
    code = main(
        [
            "eval",
            str(runs("lora")),
            "--data",
            str(data[1]),
            "--baseline",
            "--samples",
            "2",
            "--metrics",
            "exact_match,contains",
            "--max-new-tokens",
            "16",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    head = out.splitlines()[2].split()
    assert head == ["base", "tuned", "change"]
    assert "contains" in out and "token_f1" not in out
    assert out.count("    reference: ") == 2 and out.count("    base:      ") == 2


def test_chat_through_stdin_equals_generate(runs, tmp_path, monkeypatch, capsys):
    import io

    run = runs("lora")
    monkeypatch.setattr(
        "sys.stdin",
        io.StringIO("Reverse: blue river\n/reset\nReverse: code a\nReverse: fast slow\n"),
    )
    assert main(["chat", str(run), "--max-new-tokens", "16"]) == 0
    replies = capsys.readouterr().out.splitlines()
    assert len(replies) == 3
    assert main(["generate", str(run), "Reverse: blue river", "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == replies[0]
    history = {
        "messages": [
            {"role": "user", "content": "Reverse: code a"},
            {"role": "assistant", "content": replies[1]},
            {"role": "user", "content": "Reverse: fast slow"},
            {"role": "assistant", "content": "(the answer)"},
        ]
    }
    write_rows(tmp_path / "h.jsonl", [history])
    assert (
        main(["generate", str(run), "--file", str(tmp_path / "h.jsonl"), "--max-new-tokens", "16"])
        == 0
    )
    assert capsys.readouterr().out.rstrip("\n") == replies[2]


# -- prompts rendered as training rendered them -------------------------------------------


def _rows():
    return [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Reverse: a b"},
                {"role": "assistant", "content": "b a"},
                {"role": "user", "content": "Reverse: river blue"},
                {"role": "assistant", "content": "blue river"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Repeat: x"},
                {"role": "assistant", "content": "x"},
            ]
        },
        # without a template prompt and answer are one text: a space keeps their tokens apart
        {"prompt": "Reverse: c d =", "completion": " d c"},
        {"input": "Count: a b c\n", "output": "three"},
    ]


@pytest.mark.parametrize("mode", ["tokenizer", "passthrough"])
@pytest.mark.parametrize("style", ["chatml", "llama3", "mistral"])
def test_file_prompts_are_training_renderings_minus_the_answer(tokenizers, tmp_path, style, mode):
    from tuneplex.data.pipeline import build
    from tuneplex.data.sources import read_rows, resolve
    from tuneplex.data.spec import DataSpec
    from tuneplex.inference.prompts import Prompter

    path, tok = tokenizers[style]
    rows = _rows() if style != "mistral" else _rows()[1:]  # mistral takes no system turn
    write_rows(tmp_path / "rows.jsonl", rows)
    spec = DataSpec(
        train=str(tmp_path / "rows.jsonl"), tokenizer=path, max_seq_length=512, chat_template=mode
    )
    built = build(read_rows(resolve(spec.train, key="k"), key="k"), spec, tok, key="k").examples
    prompts = Prompter(tok, spec).from_file(spec.train)
    assert len(prompts) == len(rows) == len(built)
    for prompt, example, row in zip(prompts, built, rows, strict=True):
        labels = example["labels"]
        # the last answer's first trained token: everything before it is the prompt
        last = max(
            i
            for i, t in enumerate(labels)
            if t != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)
        )
        assert prompt.ids == example["input_ids"][:last], row
        answer = (
            row.get("messages", [{}])[-1].get("content")
            or row.get("completion")
            or row.get("output")
        )
        assert prompt.reference == answer


def test_stop_is_the_end_of_turn_token_training_taught(tmp_path):
    from tuneplex.data.spec import DataSpec
    from tuneplex.inference.prompts import Prompter
    from tuneplex.testing.tiny import CHATML, build_tokenizer

    # end of sequence and end of turn differ: both stop
    tok = build_tokenizer(
        tmp_path / "t", style={"template": CHATML, "bos": None, "eos": "</s>", "add_bos": False}
    )
    spec = DataSpec(train="", tokenizer=str(tmp_path / "t"), max_seq_length=64)
    stop = Prompter(tok, spec).stop
    assert set(stop.token_ids) == {
        tok.convert_tokens_to_ids("</s>"),
        tok.convert_tokens_to_ids("<|im_end|>"),
    }
    # a template that ends a turn with plain text stops on that text
    custom = (
        "{% for m in messages %}### {{ m.role }}:\n{{ m.content }}\n### end\n{% endfor %}"
        "{% if add_generation_prompt %}### assistant:\n{% endif %}"
    )
    stop = Prompter(
        tok, DataSpec(train="", tokenizer="t", max_seq_length=64, chat_template=custom)
    ).stop
    assert stop.strings == ("### end",)
    # no template (plain prompts): the end of sequence, which training appended
    stop = Prompter(
        tok, DataSpec(train="", tokenizer="t", max_seq_length=64, chat_template="none")
    ).stop
    assert stop.token_ids == (tok.convert_tokens_to_ids("</s>"),) and stop.strings == ()


def test_stop_strings_cut_the_answer(tiny_model, tmp_path):
    from tuneplex.inference.engine import Generator, Sampling
    from tuneplex.inference.prompts import Stop

    loaded = _loaded(tiny_model, scratch=tmp_path)
    ids = loaded.tokenizer("Reverse: a b", add_special_tokens=False)["input_ids"]
    free = Generator(loaded.model, loaded.tokenizer, stop=Stop(token_ids=()), device=loaded.device)
    full = free.generate([ids], Sampling(max_new_tokens=12))[0]
    cut_at = loaded.tokenizer.decode(full.ids[:4])
    word = loaded.tokenizer.decode(full.ids[4:6])
    assert word and word not in cut_at
    gen = Generator(
        loaded.model,
        loaded.tokenizer,
        stop=Stop(token_ids=(), strings=(word,)),
        device=loaded.device,
    )
    done = gen.generate([ids], Sampling(max_new_tokens=12))[0]
    assert done.stopped and done.text == full.text[: full.text.find(word)]
    streamed: list[str] = []
    again = gen.stream(ids, Sampling(max_new_tokens=12), on_text=streamed.append)
    assert "".join(streamed) == again.text == done.text


# -- bad input: one line, exit 2 -----------------------------------------------------------


def test_refusals_are_one_line(runs, data, tmp_path, capsys):
    run = runs("lora")
    cases = [
        (["generate", str(tmp_path / "nothing"), "hi"], "no such run or model directory"),
        (
            ["generate", str(run), "hi", "--checkpoint", "step_999"],
            "step_999: no such complete checkpoint",
        ),
        (
            ["generate", str(run), "hi", "--checkpoint", "bestest"],
            "expected best, latest or step_N",
        ),
        (
            ["eval", str(run), "--data", str(data[1]), "--metrics", "exact"],
            "unknown metric 'exact'",
        ),
        (["eval", str(run)], "give --data F"),
        (
            ["eval", str(tmp_path / "model-dir"), "--data", str(data[1]), "--baseline"],
            "is a model of its own",
        ),
        (["generate", str(run)], "give prompts, or --file"),
        (["generate", str(run), "hi", "--dtype", "int4"], "--dtype: 'int4'"),
    ]
    shutil.copytree(run / "final", tmp_path / "adapter-only")
    from tuneplex.testing.tiny import build_llama, build_tokenizer

    build_llama(tmp_path / "model-dir", tokenizer=build_tokenizer(tmp_path / "model-dir"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"nope": 1}\nnot json\n')
    cases.append((["generate", str(run), "--file", str(bad)], f"{bad}:2"))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    shutil.rmtree(unfinished / "final")
    cases.append(
        (
            ["generate", str(unfinished), "hi"],
            "no final/ (the run did not finish); checkpoints: step_3",
        )
    )
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    for f in (damaged / "final").glob("*.safetensors"):
        f.unlink()
    cases.append((["generate", str(damaged), "hi"], "damaged: no .safetensors weights"))
    for args, expected in cases:
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert expected in err, (args, err)
        if "--file" not in args:
            assert len(err.strip().splitlines()) == 1, err
    assert not (run / "evals").exists() or all(p.stat().st_size for p in (run / "evals").iterdir())


def test_a_bare_adapter_directory_loads_on_its_base(runs, tmp_path, capsys):
    run = runs("lora")
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "final", adapter)
    assert main(["generate", str(adapter), "Reverse: a b", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert main(["generate", str(run), "Reverse: a b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == alone


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "merged_16bit"])
def test_unsloth_outputs_generate_and_evaluate(
    cpu_seam, tiny_model, data, tmp_path, method, capsys
):
    """The unsloth backend's final/ (adapter or merged 16-bit model) through the same commands;
    on this CPU the 16-bit trainer stand-in computes as the loaded model does."""
    pytest.importorskip("trl")
    job = tmp_path / "job.yaml"
    job.write_text(
        f"""\
model: {{name: {tiny_model}, max_seq_length: 128, load_in_4bit: false}}
dataset: {{path: {data[0]}, validation_path: {data[1]}, apply_chat_template: true}}
training: {{use_gradient_checkpointing: false}}
schedule: {{epochs: 2, seed: 1}}
batch: {{per_device_train_batch_size: 4, gradient_accumulation_steps: 2}}
optimizer: {{learning_rate: 1.0e-2}}
output: {{save_method: {method}}}
"""
    )
    run = tmp_path / "run"
    assert main(["train", str(job), "--backend", "unsloth", "-o", str(run)]) == 0
    capsys.readouterr()
    loaded = _loaded(run, scratch=tmp_path / "s")
    assert loaded.target.adapter == (method == "lora")
    prompter, gen = loaded.engine()
    from tuneplex.inference.engine import Sampling

    prompts = prompter.from_file(data[1])
    done = gen.generate([p.ids for p in prompts], Sampling(max_new_tokens=16), batch_size=3)
    for p, c in zip(prompts, done, strict=True):
        ref = _reference_generate(
            loaded.model, p.ids, stop=prompter.stop.token_ids, pad_id=gen.pad_id, max_new_tokens=16
        )
        assert c.ids == ref
    assert main(["eval", str(run), "--data", str(data[1]), "--json", "--no-generate"]) == 0
    got = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    # merged_16bit holds bf16 weights: the run's loss to bf16 precision
    assert got["model"]["loss"] == pytest.approx(
        summary["val_loss"], abs=1e-4 if method == "lora" else 0.05
    )


def test_eval_runs_a_local_lm_eval_task_on_a_run(runs, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from tuneplex.testing.tiny import WORDS

    rows = [
        {"question": " ".join(WORDS[i : i + 3]), "choices": WORDS[i : i + 3], "label": i % 3}
        for i in range(6)
    ]
    write_rows(tmp_path / "rows.jsonl", rows)
    task = tmp_path / "pick.yaml"
    task.write_text(
        f"task: tiny_pick\noutput_type: multiple_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'rows.jsonl'}\ntest_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: label\n'
        'doc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    run = runs("lora")
    assert main(["eval", str(run), "--lm-eval", str(task), "--baseline"]) == 0
    out = capsys.readouterr().out
    assert out.count("tiny_pick") == 2  # the tuned model's table and the base model's
    from tuneplex.runs.listing import latest_eval

    report = latest_eval(run)
    for side in ("model", "baseline"):
        acc = report["lm_eval"][side]["results"]["tiny_pick"]["acc,none"]
        assert 0.0 <= acc <= 1.0
    assert main(["eval", str(run), "--lm-eval", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_column_mapping_names_a_files_prompt_and_answer(runs, tmp_path, capsys):
    rows = [{"q": "Reverse: a b", "gold": "b a"}, {"q": "Reverse: river", "gold": "river"}]
    write_rows(tmp_path / "qa.jsonl", rows)
    run = str(runs("lora"))
    args = ["generate", run, "--file", str(tmp_path / "qa.jsonl"), "--json"]
    assert main([*args, "--column-mapping", "question=q,answer=gold"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(g["prompt"], g["reference"]) for g in got] == [
        ("Reverse: a b", "b a"),
        ("Reverse: river", "river"),
    ]
    assert main(["generate", run, "Reverse: a b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completion"] == got[0]["completion"]
    assert main(args) == 2  # without the mapping the rows' format is unknown: say how
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (
        "--file: 2 of 2 rows cannot be used; fix them, or map their prompt and answer columns "
        "with --column-mapping"
    )
    assert main([*args, "--column-mapping", "question=q,gold"]) == 2
    assert capsys.readouterr().err.strip() == (
        "--column-mapping: 'gold': expected ROLE=COLUMN with ROLE one of context, question, answer"
    )


def test_system_turns_tools_and_checkpoint_choices(runs, tokenizers, tmp_path):
    from tuneplex.data.spec import DataSpec
    from tuneplex.inference.prompts import Prompter
    from tuneplex.inference.target import resolve

    path, tok = tokenizers["chatml"]
    prompter = Prompter(tok, DataSpec(train="", tokenizer=path, max_seq_length=512))
    asked = prompter.from_text("Reverse: a b", system="Be brief.")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: a b"}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert asked.ids == tok(rendered, add_special_tokens=False)["input_ids"]
    # a row's tools are rendered into its prompt, as training rendered them
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    write_rows(
        tmp_path / "t.jsonl",
        [{"messages": [*chat, {"role": "assistant", "content": "b a"}], "tools": tools}],
    )
    (row,) = prompter.from_file(tmp_path / "t.jsonl")
    assert '"lookup"' in tok.decode(row.ids) and row.reference == "b a"
    assert row.row["tools"] == tools  # the row as read: what a reward function is given
    # --checkpoint best / latest name the steps the run's records say
    run = runs("lora")
    vals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    best = min((v for v in vals if v["split"] == "val"), key=lambda v: v["loss"])["step"]
    kept = sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").iterdir())
    for choice, step in (("best", best), ("latest", kept[-1]), ("3", 3)):
        target = resolve(str(run), checkpoint=choice, device="cpu", scratch=tmp_path / choice)
        assert target.checkpoint == f"step_{step}" and target.adapter
        assert (Path(target.path) / "adapter_config.json").is_file()


def test_the_latest_eval_report_is_the_last_written(tmp_path):
    from tuneplex.runs.listing import latest_eval

    evals = tmp_path / "evals"
    evals.mkdir()
    for name, n in (("20261206-201219", 1), ("20261206-201220", 2), ("20261206-201220-2", 3)):
        (evals / f"{name}.json").write_text(json.dumps({"model": {"n": n}}))
    (evals / "20261206-201221-broken.json").write_text("{not json")
    assert latest_eval(tmp_path)["model"] == {"n": 3}
    assert latest_eval(tmp_path / "elsewhere") is None
