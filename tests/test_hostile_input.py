"""Hostile job files, flags and data rows: one `where: what` line each, exit 2, never a
traceback, never a hang; secrets never echoed. Run through the real command line."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tuneplex.cli import main
from tuneplex.errors import MAX_PROBLEMS

JOB = "model: org/base\ndataset:\n  training: train.jsonl\n"
SECRET = "Zq7vSeKr1tW4x"
LINE = re.compile(r"\S[^\n]*?: \S[^\n]*")  # `where: what`
DEEP = 5000


def tuneplex(*args):
    """The real command in its own process: a hang fails the test instead of stalling it."""
    proc = subprocess.run(
        [sys.executable, "-m", "tuneplex", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, proc.stdout, proc.stderr


@contextlib.contextmanager
def time_limit(seconds: float):
    """A Python-level hang becomes a TimeoutError (the job checks themselves are in-process)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cli(capsys, *args):
    """The command line in this process (quick); a Python-level hang fails the test."""
    with time_limit(10):
        code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def refused(result) -> list[str]:
    """A refusal's lines: exit 2, nothing on stdout, no traceback, each line `where: what`."""
    code, out, err = result
    assert code == 2, err
    assert out == "" and "Traceback" not in err, err
    lines = err.splitlines()
    assert lines and all(LINE.fullmatch(line) for line in lines), err
    assert err == "".join(line + "\n" for line in lines)  # no \r or other line break
    return lines


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------ job files and flags
LAUGHS = "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)
BOMB = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + LAUGHS


JOB_CASES = {
    "unhashable.yaml": (
        JOB + "? [a, b]\n: 1\n",
        [],
        "{job}:4:3: a key must be a string or a number, not a list",
    ),
    "unhashable-set.yaml": (
        JOB,
        ["--set", "training={[a, b]: 1}"],
        "--set training:1:2: a key must be a string or a number, not a list",
    ),
    "deep.yaml": (
        JOB + "training: " + "[" * DEEP + "]" * DEEP + "\n",
        [],
        "{job}:4:74: nested deeper than 64 levels",
    ),
    "deep.json": (
        '{"model": "m", "training": ' + "[" * DEEP + "]" * DEEP + "}",
        [],
        "{job}: nested deeper than 64 levels",
    ),
    "deep-for-us.json": (  # json reads 100 levels; a job may not have them
        '{"model": "m", "training": ' + "[" * 100 + "]" * 100 + "}",
        [],
        "{job}: nested deeper than 64 levels",
    ),
    "deep-set-value.yaml": (
        JOB,
        ["--set", "training=" + "[" * DEEP],
        "--set training:1:65: nested deeper than 64 levels",
    ),
    "deep-set-key.yaml": (
        JOB,
        ["--set", "a." * DEEP + "b=1"],
        "--set a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a...: "
        "nested deeper than 64 levels",
    ),
    "bigint.yaml": (
        JOB + "schedule:\n  seed: " + "7" * DEEP + "\n",
        [],
        "{job}:5:9: an integer of 5000 digits is too large (at most 100)",
    ),
    "bigint.json": (
        '{"model": "m",\n "schedule": {"seed": ' + "7" * DEEP + "}}",
        [],
        "{job}:2:23: an integer of 5000 digits is too large (at most 100)",
    ),
    "bigint-set.yaml": (
        JOB,
        ["--set", "schedule.seed=" + "7" * DEEP],
        "--set schedule.seed:1:1: an integer of 5000 digits is too large (at most 100)",
    ),
    "bad-date.yaml": (
        JOB + "schedule: {seed: 2021-02-30}\n",
        [],
        "{job}:4:18: not a valid !!timestamp value (day is out of range for month)",
    ),
    "bad-tagged-int.yaml": (
        JOB + "schedule: {seed: !!int twelve}\n",
        [],
        "{job}:4:18: not a valid !!int value (invalid literal for int() with base 10: 'twelve')",
    ),
    "bell.yaml": (
        JOB + "training: \x07\n",
        [],
        "{job}:4:11: character #x0007 is not allowed in YAML",
    ),
    "keys.yaml": (
        JOB + '"tra\\ni\\u2028n\\x1b[31m": 1\n',
        [],
        "'tra\\ni\\u2028n\\x1b[31m': unknown key (allowed: model, "
        "dataset, training, schedule, batch, optimizer, parallelism, output, integrations)",
    ),
    "long-key.yaml": (
        JOB + "training:\n  ? " + "k" * 10_000 + "\n  : 1\n",
        [],
        "training.'"
        + "k" * 27
        + "..."
        + "k" * 28
        + "': unknown key (allowed: training_type, finetuning_type, "
        "lora, max_seq_length, hidden_dropout, attention_dropout, precision, "
        "activation_checkpointing, compile, dpo, grpo, "
        "teacher_model, teacher_precision, distillation_ratio, distillation_temperature, "
        "offload_teacher, trust_remote_code)",
    ),
    "newline-key-set.yaml": (
        JOB,
        ["--set", "train\ning.lora.rank=4"],
        "'train\\ning': unknown key; did you mean 'training'? (allowed: model, dataset, "
        "training, schedule, batch, optimizer, parallelism, output, integrations)",
    ),
    "newline-value.yaml": (
        JOB + 'training: {training_type: "s\\nf\\rt"}\n',
        [],
        "training.training_type: must be one of: sft, distillation, dpo, grpo (got 's\\nf\\rt'); "
        "did you mean 'sft'?",
    ),
    "min-lr-above-peak.yaml": (
        JOB + "optimizer: {learning_rate: 1.0e-4, min_learning_rate: 1.0e-3}\n",
        [],
        "optimizer.min_learning_rate: 0.001 must be below learning_rate (0.0001)",
    ),
    "dropout-of-one.yaml": (
        JOB + "training: {hidden_dropout: 1}\n",
        [],
        "training.hidden_dropout: must be < 1 (got 1)",
    ),
    "too-big.yaml": (
        JOB + "# " + "x" * (1 << 20) + "\n",
        [],
        "{job}: larger than 1 MiB; a job file is a few kilobytes",
    ),
}


@pytest.mark.parametrize("name", JOB_CASES)
def test_hostile_job_is_one_line(tmp_path, capsys, name):
    text, args, expected = JOB_CASES[name]
    job = tmp_path / name
    job.write_text(text, encoding="utf-8")
    assert refused(cli(capsys, "validate", job, *args)) == [expected.format(job=job)]


ALIAS_CASES = {
    "laughs.yaml": (
        JOB + BOMB + "training: *i\n",
        [],
        "{job}:9:4: this value holds more than 100000 values (aliases expanded)",
    ),
    "laughs-in-a-list.yaml": (
        JOB + BOMB + "training:\n  lora:\n    target_modules: *i\n",
        [],
        "{job}:9:4: this value holds more than 100000 values (aliases expanded)",
    ),
    "itself.yaml": (
        JOB + "training: &t [1, *t]\n",
        [],
        "{job}:4:11: an alias refers to the value that contains it",
    ),
}


@pytest.mark.parametrize("name", ALIAS_CASES)
def test_alias_bomb_is_refused_in_one_line(tmp_path, name):
    """In a process of its own: expanding or printing the bomb would never end."""
    text, args, expected = ALIAS_CASES[name]
    job = tmp_path / name
    job.write_text(text, encoding="utf-8")
    assert refused(tuneplex("validate", job, *args)) == [expected.format(job=job)]


def test_large_aliased_value_is_quoted_briefly(tmp_path):
    """Within the alias budget (9**5 strings), a wrong value is still quoted in a few words."""
    job = tmp_path / "job.yaml"
    job.write_text(JOB + BOMB.split("e:")[0] + "schedule: {seed: *d}\n")
    lines = refused(tuneplex("validate", job))
    assert sorted(line.split(":")[0] for line in lines) == ["a", "b", "c", "d", "schedule.seed"]
    assert (
        "schedule.seed: expected an integer (got [[[...], [...], [...], [...], ...], [[...], "
        "[...], [...],...)"
    ) in lines


def test_a_huge_shared_value_is_quoted_in_bounded_time():
    """What an alias bomb builds (9**9 strings through shared lists) is quoted in a few words."""
    from tuneplex.errors import show

    value = ["lol"] * 9
    for _ in range(8):
        value = [value] * 9
    with time_limit(2):
        assert show(value) == "[[[...], [...], [...], [...], ...], [[...], [...], [...],..."
        assert show(2**60_000) == "<an integer of 60001 bits>"
        assert show("a\nb\x1b[2J\u202e" * 100) == (
            "'a\\nb\\x1b[2J\\u202ea\\nb\\x1b[2...1b[2J\\u202ea\\nb\\x1b[2J\\u202e'"
        )


@pytest.mark.parametrize(
    "path,expected",
    [
        ("/dev/zero", "/dev/zero: not a regular file (a character device)"),
        ("FIFO", "{fifo}: not a regular file (a named pipe)"),
        ("DIR", "{dir}: is a directory, not a job file"),
    ],
    ids=["dev-zero", "fifo", "directory"],
)
def test_job_must_be_a_regular_file(tmp_path, path, expected):
    fifo = tmp_path / "job.yaml"
    os.mkfifo(fifo)
    path = {"FIFO": str(fifo), "DIR": str(tmp_path)}.get(path, path)
    assert refused(tuneplex("validate", path)) == [expected.format(fifo=fifo, dir=tmp_path)]


# ------------------------------------------------------------------ secrets
WANDB = JOB + "integrations:\n  wandb:\n    project: p\n"


SECRET_CASES = {
    "missing-space": (WANDB + f"    api_key:{SECRET}\n", []),
    "missing-space-alone": (
        JOB + f"integrations:\n  wandb:\n    api_key:{SECRET}\n",
        [],
    ),
    "missing-space-flow": (JOB + f"integrations:\n  wandb: {{project: p, api_key:{SECRET}}}\n", []),
    "in-a-string": (JOB + f"integrations:\n  wandb: 'api_key: {SECRET}'\n", []),
    "in-a-list": (JOB + f"integrations:\n  wandb: [p, 'api_key = {SECRET}']\n", []),
    "tag": (WANDB + f"    api_key: !{SECRET}\n", []),
    "yaml-tag": (WANDB + f"    api_key: !!{SECRET}\n", []),
    "alias": (WANDB + f"    api_key: *{SECRET}\n", []),
    "anchor": (WANDB + f"    api_key: &{SECRET}\n", []),
    "at-sign": (WANDB + f"    api_key: @{SECRET}\n", []),
    "backtick": (WANDB + f"    api_key: `{SECRET}\n", []),
    "percent": (WANDB + f"    api_key: %{SECRET}\n", []),
    "bad-escape": (WANDB + f'    api_key: "{SECRET}\\q"\n', []),
    "open-list": (WANDB + f"    api_key: [{SECRET}\n", []),
    "next-line": (WANDB + f"    api_key:\n      !{SECRET}\n", []),
    "as-a-key-inside": (WANDB + f"    api_key: {{{SECRET}: *x}}\n", []),
    "as-a-key": (WANDB + f"    api_key:{SECRET}: 1\n", []),
    "as-keys-twice": (
        WANDB + f"    api_key: a\n    api_key:{SECRET}: 1\n    api_key:{SECRET}: 1\n",
        [],
    ),
    "duplicate": (WANDB + f"    api_key: {SECRET}\n    api_key: {SECRET}\n", []),
    "error-elsewhere": (
        WANDB + f"    api_key: 12{SECRET}\n    project: [\n",
        [],
    ),
    "mlflow-token-tag": (
        JOB + f"integrations:\n  mlflow:\n    tracking_uri: x\n    token: !{SECRET}\n",
        [],
    ),
    "mlflow-token-colon": (
        JOB + f"integrations:\n  mlflow:\n    tracking_uri: x\n    token: {SECRET}: x\n",
        [],
    ),
    "password-alias": (JOB + f"db_password: *{SECRET}\n", []),
    "secret-tag": (JOB + f"client_secret: !{SECRET}\n", []),
    "token-in-a-list": (JOB + f"- my_token: !{SECRET}\n", []),
    "set-tag": (WANDB, ["--set", f"integrations.wandb.api_key=!{SECRET}"]),
    "set-alias": (WANDB, ["--set", f"integrations.wandb.api_key=*{SECRET}"]),
    "set-open-list": (WANDB, ["--set", f"integrations.wandb.api_key=[{SECRET}"]),
    "set-duplicate": (WANDB, ["--set", f"integrations.wandb.api_key={{a: 1, a: {SECRET}}}"]),
    "set-no-equals": (WANDB, ["--set", f"integrations.wandb.api_key:{SECRET}"]),
    "set-section-tag": (WANDB, ["--set", f"integrations.wandb={{project: p, api_key: !{SECRET}}}"]),
    "set-string": (WANDB, ["--set", f"integrations.wandb=api_key:{SECRET}"]),
    "set-valid": (WANDB, ["--set", f"integrations.wandb.api_key={SECRET}"]),  # printed masked
}


@pytest.mark.parametrize("case", SECRET_CASES)
def test_secret_is_never_echoed(tmp_path, capsys, case):
    text, args = SECRET_CASES[case]
    job = tmp_path / "job.yaml"
    job.write_text(text, encoding="utf-8")
    code, out, err = cli(capsys, "validate", job, *args)
    assert code in (0, 2) and "Traceback" not in err, err
    if code == 2:
        refused((code, out, err))
    pieces = {SECRET[i : i + 4] for i in range(len(SECRET) - 3)}
    assert not [p for p in pieces if p in out + err], out + err


def test_secret_in_malformed_json_job(tmp_path, capsys):
    job = tmp_path / "job.json"
    job.write_text('{"integrations": {"wandb": {"api_key": ' + SECRET + "}}}")
    assert refused(cli(capsys, "validate", job)) == [f"{job}:1:40: Expecting value"]


# ------------------------------------------------------------------ data rows
CHAT = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Sunny today."},
    ]
}
GOOD = json.dumps(CHAT).encode() + b"\n"


def data_job(tmp_path, tokenizers, data) -> Path:
    path, _ = tokenizers["chatml"]
    job = tmp_path / "job.yaml"
    job.write_text(
        f"model: {path}\ndataset:\n  training: {json.dumps(str(data))}\n"
        "training:\n  max_seq_length: 64\n"
    )
    return job


def inspect(capsys, job) -> list[str]:
    return refused(cli(capsys, "data", "inspect", job))


UNKNOWN = (
    "; expected 'messages', 'input'/'output', 'prompt'/'completion' or 'text' "
    "(or set dataset.format / dataset.column_mapping)"
)
NOT_UTF8 = "not UTF-8 text (byte 0xe9 at column {}: invalid continuation byte)"
HUGE_INT = b"7" * DEEP
NESTED = b"[" * 100_000 + b"]" * 100_000
TOO_LONG = "a number has more than 4300 digits"
TOO_DEEP = "nested too deeply to read"
MANY_KEYS = json.dumps({f"k{i}": i for i in range(10_000)}).encode()
ROW_CASES = {
    "huge-int": (GOOD + b'{"text": "a", "n": ' + HUGE_INT + b"}\n", 2, TOO_LONG),
    "deep": (GOOD + b'{"text": "a", "n": ' + NESTED + b"}\n", 2, TOO_DEEP),
    "latin-1": (GOOD + GOOD + b'{"text": "caf\xe9"}\n', 3, NOT_UTF8.format(14)),
    "control-keys": (
        GOOD + b'{"a\\nb\\u001b[2J": "x", "\\u2028": 1}\n',
        2,
        "cannot tell this row's format (columns: 'a\\nb\\x1b[2J', '\\u2028')" + UNKNOWN,
    ),
    "control-role": (
        b'{"messages": [{"role": "us\\ner", "content": "x"}]}\n',
        1,
        "messages[0].role: must be one of system, user, assistant, tool (got 'us\\ner')",
    ),
    "many-keys": (
        MANY_KEYS + b"\n",
        1,
        "cannot tell this row's format (columns: k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, k10, "
        "k11, ... (9988 more))" + UNKNOWN,
    ),
}


@pytest.mark.parametrize("case", ROW_CASES)
def test_hostile_jsonl_row(tokenizers, tmp_path, capsys, case):
    content, line, message = ROW_CASES[case]
    data = write_bytes(tmp_path / "train.jsonl", content)
    assert inspect(capsys, data_job(tmp_path, tokenizers, data)) == [f"{data}:{line}: {message}"]


JSON_CASES = {
    "huge-int": (b'[{"text": "a"},\n {"n": ' + HUGE_INT + b"}]", "", TOO_LONG),
    "deep": (b'[{"text": "a"},\n ' + NESTED + b"]", "", TOO_DEEP),
    "latin-1": (b'[{"text": "a"},\n\n {"text": "caf\xe9"}]', ":3", NOT_UTF8.format(15)),
    "control-key": (
        b'[{"text": "a"},\n {"a\\nb": "x"}]',
        "[1]",
        "cannot tell this row's format (columns: 'a\\nb')" + UNKNOWN,
    ),
}


@pytest.mark.parametrize("case", JSON_CASES)
def test_hostile_json_file(tokenizers, tmp_path, capsys, case):
    content, where, message = JSON_CASES[case]
    data = write_bytes(tmp_path / "train.json", content)
    assert inspect(capsys, data_job(tmp_path, tokenizers, data)) == [f"{data}{where}: {message}"]


def test_hostile_file_in_a_directory(tokenizers, tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    write_bytes(d / "a.jsonl", GOOD)
    bad = write_bytes(d / "b.jsonl", GOOD + b'{"text": "caf\xe9"}\n')
    job = data_job(tmp_path, tokenizers, d)
    assert inspect(capsys, job) == [f"{bad}:2: {NOT_UTF8.format(14)}"]
    bad.unlink()
    os.mkfifo(d / "c.jsonl")  # skipping it would lose data without a word
    assert refused(tuneplex("data", "inspect", job)) == [
        f"dataset.training: {d / 'c.jsonl'}: not a regular file (a named pipe)"
    ]


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_dataset_must_be_a_regular_file(tokenizers, tmp_path, kind):
    data = tmp_path / "train.jsonl"
    if kind == "fifo":
        os.mkfifo(data)
    else:
        data = Path("/dev/zero")
    what = "a named pipe" if kind == "fifo" else "a character device"
    job = data_job(tmp_path, tokenizers, data)
    assert refused(tuneplex("data", "inspect", job)) == [
        f"dataset.training: {data}: not a regular file ({what})"
    ]


# ------------------------------------------------------------------ property-based
# Generated jobs (valid ones, then the schema's own keys given hostile values), serialised as
# YAML or JSON, then mutated as text with the snippets fuzzing found, plus `--set` flags.
BASES = {
    "automodel": {"model": "org/base", "dataset": {"training": "train.jsonl"}},
    "unsloth": {"model": {"name": "org/base"}, "dataset": {"path": "d.jsonl"}},
}
SNIPPETS = [
    "? [a, b]\n: 1\n", "{[x]: 1}", "&a ", "*a", "*nowhere", "!tag ", "!!int x", "!!binary @",
    "!!set {a}", "<<: *a\n", "[" * 300, "{a: " * 300, "7" * 5000, "0x" + "f" * 300, "1:2:3:4",
    "2021-02-30", "\x07", "\x00", "\t", "\r", "\u2028", "\x85", "\ufeff", '"\\', "'", "- ", ": ",
    "\n", "\n  ", "%YAML 1.1\n---\n", "---\n", "...\n", "@", "`", "#", ".nan", "-.inf", "~",
    "api_key:", "api_key: !s3cr3t", "a: &a [*a]\n", "x: &l [1, 1, 1, 1, 1, 1, 1, 1, 1]\n",
]  # fmt: skip


def schema_paths(backend: str) -> list[tuple[str, ...]]:
    """Every key path of a backend's job schema: ("training", "lora", "rank"), ..."""
    from tuneplex.plugins import registry
    from tuneplex.schema.base import model_in

    paths, stack = [], [((), registry().get(backend).backend.job_schema)]
    while stack:
        prefix, model = stack.pop()
        for name, field in model.model_fields.items():
            paths.append((*prefix, name))
            if (inner := model_in(field.annotation)) is not None:
                stack.append(((*prefix, name), inner))
    return sorted(paths)


def hostile_values(keys):
    plausible = st.sampled_from(["sft", "lora", "auto", "org/base", "d.jsonl", "bf16", "online"])
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-3, 100)
        | st.integers(min_value=-(10**150), max_value=10**150)
        | st.floats()
        | plausible
        | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
        max_leaves=8,
    )


def put(data: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        if not isinstance(data.get(key), dict):
            data[key] = {}
        data = data[key]
    data[path[-1]] = value


def mutate(draw, text: str) -> str:
    """Up to three edits of the serialised job: a snippet inserted, a slice cut or repeated."""
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        end = draw(st.integers(at, min(len(text), at + 40)))
        op = draw(st.sampled_from(["insert", "delete", "repeat"]))
        if op == "insert":
            text = text[:at] + draw(st.sampled_from(SNIPPETS) | st.text(max_size=5)) + text[at:]
        else:
            text = text[:at] + text[end:] if op == "delete" else text[:end] + text[at:]
    return text


def jobs(backend: str):
    """(file name, file bytes, --set items) for `tuneplex validate`."""
    names = sorted({p[-1] for p in schema_paths(backend)})
    keys = st.sampled_from(names) | st.text(max_size=12)
    paths = st.sampled_from(schema_paths(backend)) | st.lists(keys, min_size=1, max_size=4)
    values = hostile_values(keys)
    flag = st.builds(
        "{}={}".format,
        st.sampled_from(schema_paths(backend)).map(".".join) | st.text(max_size=10),
        st.sampled_from(SNIPPETS) | st.text(max_size=10) | values.map(json.dumps),
    )

    @st.composite
    def job(draw):
        data = json.loads(json.dumps(BASES[backend]))
        for path, value in draw(st.lists(st.tuples(paths, values), max_size=4)):
            put(data, tuple(path), value)
        as_json = draw(st.booleans())
        unicode = draw(st.booleans())
        text = json.dumps(data) if as_json else yaml.safe_dump(data, allow_unicode=unicode)
        raw = mutate(draw, text).encode()
        if draw(st.sampled_from([False] * 9 + [True])):  # a byte that is not UTF-8
            at = draw(st.integers(0, len(raw)))
            raw = raw[:at] + b"\xe9" + raw[at:]
        sets = draw(st.lists(flag | st.text(max_size=10), max_size=2))
        return ("job.json" if as_json else "job.yaml"), raw, sets

    return job()


@pytest.mark.parametrize("backend", list(BASES))
def test_generated_jobs_are_valid_or_one_line_per_problem(tmp_path, capsys, backend):
    cli(capsys, "validate", "warm-up.yaml", "-b", backend)  # loading plugins is not a job's time

    @settings(
        max_examples=150,
        deadline=5000,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(jobs(backend))
    def check(case):
        name, raw, sets = case
        job = write_bytes(tmp_path / name, raw)
        start = time.monotonic()
        code, out, err = cli(capsys, "validate", job, "-b", backend, *(f"--set={s}" for s in sets))
        assert time.monotonic() - start < 5
        if code == 0:
            assert err == "" and out.startswith(f"# {job}: valid {backend} job\n")
        else:
            lines = refused((code, out, err))
            assert len(lines) <= MAX_PROBLEMS + 1 and max(map(len, lines)) < 3200

    check()
