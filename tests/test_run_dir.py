"""Run directories: recognised by tuneplex's own marker, one writer at a time, `--overwrite` that
never deletes a user's file, resume that refuses changed inputs, damaged checkpoints, train.log."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tuneplex.cli import main
from tuneplex.files import fingerprint as fingerprint_file
from tuneplex.runs import (
    MARKER,
    damage,
    mark_complete,
    prune_checkpoints,
    remove_stale_temporaries,
    resume_checkpoint,
)

FAKE_JOB = "model: m\ndataset:\n  path: {data}\nschedule:\n  steps: 3\n"


def run_main(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def job(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    path = tmp_path / "fake.yaml"
    path.write_text(FAKE_JOB.format(data=data))
    return path


def train(capsys, job, out, *flags):
    return run_main(capsys, "train", job, "-b", "fake", "-o", out, *flags)


def tree(root):
    """Every path under `root` with its content (files) — to prove nothing was touched."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


# ------------------------------------------------------------------ ownership
def test_a_run_is_recognised_by_its_marker(fake_registry, job, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, job, out)[0] == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["format"] == 1 and len(marker["run_id"]) == 32
    assert marker["backend"] == "fake"
    assert str(job.parent / "data.jsonl") in marker["inputs"]["dataset.path"]
    code, _, err = train(capsys, job, out)
    assert code == 2 and err == (
        f"--output {out}: holds a tuneplex run; pass --resume to continue it or --overwrite "
        "to replace it\n"
    )
    assert train(capsys, job, out, "--resume")[0] == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["resumed"] for r in rows] == [False] * 3 + [True] * 3
    assert train(capsys, job, out, "--overwrite")[0] == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / MARKER).read_text())["run_id"] != marker["run_id"]


def test_a_run_resumes_only_with_the_backend_that_began_it(fake_registry, job, tmp_path):
    from pathlib import Path

    from tuneplex.errors import UsageError
    from tuneplex.runs import open_run

    out = tmp_path / "run"
    public = {"model": "m"}
    opened = dict(job=public, job_file=Path("j.yaml"), overwrite=False, note=print)
    open_run(out, backend="fake", resume=False, **opened).close()
    with pytest.raises(UsageError) as refused:
        open_run(out, backend="other", resume=True, **opened)
    assert refused.value.lines() == [
        f"--output {out}: was trained by the fake backend, not other; resume it with --backend fake"
    ]
    open_run(out, backend="fake", resume=True, **opened).close()


def test_a_resume_may_change_only_the_sections_the_backend_names(tmp_path):
    """The layout a backend reshards onto may change (`may_change`); anything else is refused."""
    from pathlib import Path

    from tuneplex.errors import UsageError
    from tuneplex.runs import open_run

    out = tmp_path / "run"
    was = {"model": "m", "parallelism": {"num_gpus_per_node": 2}}
    opened = dict(job_file=Path("j.yaml"), backend="fake", overwrite=False, note=print)
    open_run(out, job=was, resume=False, **opened).close()
    relaid = {"model": "m", "parallelism": {"num_gpus_per_node": 4}}
    open_run(out, job=relaid, resume=True, may_change=("parallelism",), **opened).close()
    with pytest.raises(UsageError) as refused:
        open_run(out, job=relaid, resume=True, **opened)
    assert refused.value.lines()[0] == (
        "parallelism.num_gpus_per_node: was 2 in the run being resumed, now 4"
    )
    with pytest.raises(UsageError) as refused:
        other = {**relaid, "model": "n"}
        open_run(out, job=other, resume=True, may_change=("parallelism",), **opened)
    assert refused.value.lines()[0] == "model: was 'm' in the run being resumed, now 'n'"


def test_a_users_folder_with_a_job_json_is_not_a_run(fake_registry, tmp_path, capsys):
    """The reported loss: a home-like folder whose own job file is named job.json."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("private key")
    (home / ".bashrc").write_text("alias ll='ls -l'")
    (home / "projects").mkdir()
    (home / "projects" / "notes.md").write_text("notes")
    (home / "data.jsonl").write_text('{"text": "x"}\n')
    user_job = home / "job.json"
    user_job.write_text(json.dumps({"model": "m", "dataset": {"path": str(home / "data.jsonl")}}))
    before = tree(home)
    for flag in ("--overwrite", "--resume", None):
        code, out, err = train(capsys, user_job, home, *([flag] if flag else []))
        assert code == 2 and out == "" and len(err.splitlines()) == 1, err
        assert err.startswith(f"--output {home}: not a tuneplex run directory (no {MARKER})")
        assert tree(home) == before


def test_overwrite_refuses_cwd_its_parents_and_home(
    fake_registry, job, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "project"
    assert train(capsys, job, out)[0] == 0
    (out / "inner").mkdir()
    before = tree(out)
    monkeypatch.chdir(out / "inner")
    for target in (out, out / "inner" / ".."):
        code, _, err = train(capsys, job, target, "--overwrite")
        assert code == 2 and err == (
            f"--output {target}: is the current directory or one of its parents; refusing "
            "to --overwrite it\n"
        )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(out))
    code, _, err = train(capsys, job, out, "--overwrite")
    assert code == 2 and "is / or the home directory" in err
    assert tree(out) == before
    code, _, err = train(capsys, job, "/", "--overwrite")
    assert code == 2 and len(err.splitlines()) == 1 and "refusing to delete anything" in err


def test_overwrite_refuses_a_path_through_a_symlink(fake_registry, job, tmp_path, capsys):
    real = tmp_path / "real-run"
    assert train(capsys, job, real)[0] == 0
    link = tmp_path / "link"
    link.symlink_to(real)
    before = tree(real)
    code, _, err = train(capsys, job, link / ".", "--overwrite")
    assert code == 2 and f"is reached through a symlink (it is {real})" in err
    assert tree(real) == before


def test_overwrite_refuses_a_run_holding_the_jobs_own_files(fake_registry, tmp_path, capsys):
    out = tmp_path / "run"
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "x"}\n')
    job = tmp_path / "job.yaml"
    job.write_text(FAKE_JOB.format(data=data))
    assert train(capsys, job, out)[0] == 0
    inside_job = out / "my-job.yaml"
    inside_job.write_text(FAKE_JOB.format(data=data))
    code, _, err = train(capsys, inside_job, out, "--overwrite")
    assert code == 2 and err == (
        f"--output {out}: holds the job file {inside_job}; refusing to --overwrite it\n"
    )
    inside_data = out / "data.jsonl"
    inside_data.write_text('{"text": "mine"}\n')
    code, _, err = train(capsys, job, out, "--overwrite", "--set", f"dataset.path={inside_data}")
    assert code == 2 and err == (
        f"--output {out}: holds dataset.path ({inside_data}); refusing to --overwrite it\n"
    )
    assert inside_job.exists() and inside_data.read_text() == '{"text": "mine"}\n'


def test_overwrite_removes_only_what_tuneplex_wrote(fake_registry, job, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, job, out)[0] == 0
    (out / "notes.txt").write_text("my notes")
    (out / "checkpoints" / "step_1").mkdir(parents=True)
    (out / "checkpoints" / "README").write_text("mine too")
    (out / "final").mkdir()
    (out / ".summary.json.tmp-123").write_text("{")
    code, _, err = train(capsys, job, out, "--overwrite")
    assert code == 0
    assert err == (
        f"tuneplex: kept 2 entries tuneplex did not write in {out}: checkpoints/README, notes.txt\n"
    )
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "checkpoints" / "README").read_text() == "mine too"
    assert not (out / "checkpoints" / "step_1").exists() and not (out / "final").exists()
    assert not (out / ".summary.json.tmp-123").exists()


def test_output_that_cannot_be_a_directory(fake_registry, job, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = {
        a_file: "exists and is not a directory",
        a_file / "run": "cannot be a directory: a file is on its path",
        "/proc/tuneplex-run": "cannot create it",
    }
    for target, message in cases.items():
        code, _, err = train(capsys, job, target)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"--output {target}: {message}"), err
    assert a_file.read_text() == "x"


# ------------------------------------------------------------------ one writer
HOLDER = """
import json, sys, time
from pathlib import Path
from tuneplex.runs import open_run
out = Path(sys.argv[1])
job = json.loads((out / "job.json").read_text())
run = open_run(
    out, job=job, job_file=Path("j.yaml"), backend="fake", resume=True, overwrite=False, note=print
)
print("locked", flush=True)
time.sleep(120)
"""


WORKER = """
import sys, time
from tuneplex.runs import hold_as_worker
hold_as_worker(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("holder_code", [HOLDER, WORKER], ids=["train", "orphaned-worker"])
def test_one_writer_per_run_and_the_lock_dies_with_its_process(
    fake_registry, job, tmp_path, capsys, holder_code
):
    """A `train` holding the run, or rank 0 of the workers of one whose launcher was killed
    (they still finish their stop): either way a second train is refused until it is gone."""
    out = tmp_path / "run"
    assert train(capsys, job, out)[0] == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", holder_code, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree(out)
        for flags in ((), ("--resume",), ("--overwrite",)):
            code, _, err = train(capsys, job, out, *flags)
            host = os.uname().nodename
            assert code == 2 and err == (
                f"{out}: in use by another tuneplex train (pid {holder.pid} on host {host})\n"
            )
        assert tree(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert train(capsys, job, out, "--resume")[0] == 0


# ------------------------------------------------------------------ resume
def test_resume_refuses_changed_data_and_model_files(fake_registry, job, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "tokenizer.json").write_text("{}")
    out = tmp_path / "run"
    sets = ("--set", f"model={model}")
    assert train(capsys, job, out, *sets)[0] == 0
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n{"text": "more"}\n')
    (model / "tokenizer.json").write_text('{"added": 1}')
    before = tree(out)
    code, _, err = train(capsys, job, out, "--resume", *sets)
    assert code == 2
    assert err.splitlines() == [
        f"dataset.path: {data} changed since the run started; start a new run or restore the file",
        f"model: {model / 'tokenizer.json'} changed since the run started; start a new run or "
        "restore the file",
    ]
    assert tree(out) == before
    data.write_text('{"text": "hello"}\n')
    (model / "tokenizer.json").write_text("{}")
    (model / "config.json").unlink()
    code, _, err = train(capsys, job, out, "--resume", *sets)
    assert code == 2 and err == (
        f"model: {model / 'config.json'} was removed since the run started; start a new run "
        "or restore the file\n"
    )
    (model / "config.json").write_text('{"hidden_size": 8}')
    assert train(capsys, job, out, "--resume", *sets)[0] == 0


def test_resume_cleans_crash_temporaries(fake_registry, job, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, job, out)[0] == 0
    debris = [out / ".summary.json.tmp-4242", out / "checkpoints" / ".step_4.tmp-77"]
    debris[1].mkdir(parents=True)
    debris[0].write_text("{")
    (debris[1] / "model.safetensors").write_bytes(b"\0" * 10)
    assert train(capsys, job, out, "--resume")[0] == 0
    assert not any(p.exists() for p in debris)


def _checkpoint(run, step, payload=b"x" * 100):
    path = run / "checkpoints" / f"step_{step}"
    path.mkdir(parents=True)
    (path / "weights.bin").write_bytes(payload)
    (path / "state.json").write_text(json.dumps({"step": step}))
    mark_complete(path, step=step)
    return path


def test_damaged_checkpoints_are_named_and_skipped(tmp_path):
    run = tmp_path / "run"
    good = _checkpoint(run, 2)
    truncated = _checkpoint(run, 4)
    with (truncated / "weights.bin").open("r+b") as fh:
        fh.truncate(50)
    broken_json = _checkpoint(run, 6)
    (broken_json / "state.json").write_text('{"step": 6,')  # same size, not JSON
    assert damage(good) is None
    assert damage(truncated) == "weights.bin is 50 bytes, 100 were written (truncated?)"
    assert damage(broken_json) == "state.json: unreadable JSON"
    warnings = []
    assert resume_checkpoint(run, warn=warnings.append) == (2, good)
    assert warnings == [
        "tuneplex: checkpoints/step_6 is damaged: state.json: unreadable JSON (and 1 older, "
        "also damaged); resuming from checkpoints/step_2"
    ]
    (good / "weights.bin").unlink()
    from tuneplex.errors import UsageError

    with pytest.raises(UsageError) as exc:
        resume_checkpoint(run, warn=warnings.append)
    assert exc.value.lines() == [
        "--resume: no intact checkpoint: checkpoints/step_6 is damaged: state.json: unreadable "
        "JSON (and 2 older, also damaged)"
    ]


def test_a_checkpoint_without_its_marker_never_counts(tmp_path):
    run = tmp_path / "run"
    path = _checkpoint(run, 3)
    (path / "tuneplex_complete.json").unlink()
    assert damage(path) == "no tuneplex_complete.json (never finished)"
    (path / "tuneplex_complete.json").write_text("{not json")
    assert damage(path) == "unreadable tuneplex_complete.json"


def test_pruning_never_leaves_a_half_deleted_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        _checkpoint(run, step)
    prune_checkpoints(run, keep=1)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_3"]
    # a prune cut short: the checkpoint was renamed away first, so it never looks complete
    half = run / "checkpoints" / ".step_2.del-99"
    half.mkdir()
    (half / "tuneplex_complete.json").write_text("{}")
    assert resume_checkpoint(run, warn=print)[0] == 3
    assert remove_stale_temporaries(run) == [".step_2.del-99"]


def test_weight_fingerprints_sample_large_files(tmp_path):
    """Large weight files: size, header and 32 evenly spaced blocks (first and last included)
    — a replaced or re-saved file is seen; hashing every byte of every shard is not paid."""
    big = tmp_path / "model.safetensors"
    big.write_bytes(b"\0" * (65 << 20))
    a = fingerprint_file(big)
    with big.open("r+b") as fh:
        fh.seek((65 << 20) - 1)
        fh.write(b"\1")
    b = fingerprint_file(big)
    with big.open("ab") as fh:
        fh.write(b"\0")
    c = fingerprint_file(big)
    assert a.startswith("sampled:") and len({a, b, c}) == 3
    small = tmp_path / "train.jsonl"
    small.write_text("a\n")
    d = fingerprint_file(small)
    small.write_text("b\n")
    assert not d.startswith("sampled:") and fingerprint_file(small) != d


# ------------------------------------------------------------------ what the terminal shows
def test_internal_error_is_one_line_with_its_traceback_in_train_log(
    fake_registry, job, tmp_path, capfd
):
    out = tmp_path / "run"
    code = main(["train", str(job), "-b", "fake", "-o", str(out), "--set", "schedule.crash=true"])
    captured = capfd.readouterr()
    log = out / "train.log"
    assert code == 1
    assert captured.err == (
        "internal error: ZeroDivisionError: a defect deep inside the backend (traceback in "
        f"{log})\n"
    )
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError" in text
    assert "a third-party library warns here" in text and "a C extension prints here" in text


def test_time_bound(tmp_path):
    """Fingerprinting an input directory stops at a bounded number of files."""
    from tuneplex.runs.inputs import MAX_FILES, files_of

    root = tmp_path / "many"
    root.mkdir()
    for i in range(MAX_FILES + 10):
        (root / f"{i}.txt").write_text("")
    t0 = time.perf_counter()
    assert len(files_of(root)) == MAX_FILES
    assert time.perf_counter() - t0 < 30


def test_a_signal_before_the_backend_takes_over_is_one_line(fake_registry, job, tmp_path, capsys):
    """SIGTERM while the backend is still starting (importing torch, say): exit 143, one line
    whose resume command names the backend that ran."""
    import threading

    out = tmp_path / "run"
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    code, _, err = train(capsys, job, out, "--set", "schedule.pause_s=1.5")
    timer.join()
    assert code == 143
    assert err == (
        "interrupted by SIGTERM; `tuneplex train ... --backend fake --resume` continues from the "
        "start (no checkpoint yet)\n"
    )
    assert (out / "job.json").is_file()  # the run stays, resumable
    code, _, err = train(capsys, job, out, "--resume", "--set", "schedule.pause_s=1.5")
    assert code == 0, err


def test_a_settled_file_is_hashed_once_per_process(tmp_path, monkeypatch):
    """The run's input record and the data cache key read the same files: hashed once, while
    a file that changes (or just changed: timestamps are coarse) is read again."""
    from tuneplex import files

    reads = []
    real = files._hash
    monkeypatch.setattr(files, "_hash", lambda *a, **kw: reads.append(a[0]) or real(*a, **kw))
    monkeypatch.setattr(files, "SETTLED_S", 0.05)
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    assert files.fingerprint(data) == files.fingerprint(data)
    assert len(reads) == 2  # just written: not trusted yet
    time.sleep(0.1)
    first = files.fingerprint(data)
    assert files.fingerprint(data) == first and len(reads) == 3
    data.write_text('{"text": "b"}\n')
    assert files.fingerprint(data) != first and len(reads) == 4
