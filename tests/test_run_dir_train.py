"""The run directory under real automodel training on CPU: damaged checkpoints on resume, one
writer while a real training runs, what the terminal shows, refusals that leave no run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch")

from helpers import chat_job_factory, train
from tuneplex.runs import read_metrics

JOB = """\
model: {model}
dataset: {{training: {train}, validation: {val}}}
training: {{max_seq_length: 128}}
schedule: {{epochs: 2, seed: 7}}
batch: {{global_batch_size: 4, micro_batch_size: 2}}
optimizer: {{learning_rate: 1.0e-2, warmup_steps: 2}}
output: {{checkpoint_steps: 2}}
"""


@pytest.fixture
def job(tmp_path, tiny_model):
    return chat_job_factory(tmp_path, JOB, model=tiny_model)


def _truncate(path, keep: int) -> None:
    with path.open("r+b") as fh:
        fh.truncate(keep)


def test_resume_skips_a_damaged_checkpoint_and_continues_the_same_losses(capsys, job, tmp_path):
    whole = tmp_path / "whole"
    code, _, err = train(capsys, job(), "-o", whole)
    assert code == 0, err
    steps = sorted(int(p.name[5:]) for p in (whole / "checkpoints").iterdir())
    assert steps == [2, 4, 6, 8]
    broken = tmp_path / "broken"
    shutil.copytree(whole, broken)
    shutil.rmtree(broken / "final")
    (broken / "summary.json").unlink()
    shard = "dcp/__0_0.distcp"  # the one process's shard file
    _truncate(broken / "checkpoints" / "step_8" / shard, 1000)
    (broken / "checkpoints" / "step_6" / shard).unlink()  # a missing shard
    code, out, err = train(capsys, job(), "-o", broken, "--resume")
    assert code == 0, err
    assert err.splitlines() == [
        f"tuneplex: checkpoints/step_8 is damaged: {shard} is 1000 bytes, "
        f"{(whole / 'checkpoints' / 'step_8' / shard).stat().st_size} were "
        "written (truncated?) (and 1 older, also damaged); resuming from checkpoints/step_4"
    ]
    assert "resuming from" in out and "step_4" in out
    a, b = read_metrics(whole), read_metrics(broken)
    assert [(e["step"], e["split"]) for e in a] == [(e["step"], e["split"]) for e in b]
    assert [e["loss"] for e in a] == [e["loss"] for e in b]  # bit-equal on CPU fp32
    assert (broken / "final" / "adapter_model.safetensors").is_file() or (
        broken / "final" / "model.safetensors"
    ).is_file()


def test_resume_with_no_intact_checkpoint_is_refused(capsys, job, tmp_path):
    run = tmp_path / "run"
    code, _, err = train(capsys, job("schedule: {epochs: 1}"), "-o", run)
    assert code == 0, err
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "tuneplex_complete.json").unlink()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    code, out, err = train(capsys, job("schedule: {epochs: 1}"), "-o", run, "--resume")
    assert code == 2 and out == ""
    assert err == (
        "--resume: no intact checkpoint: checkpoints/step_4 is damaged: no "
        "tuneplex_complete.json (never finished) (and 1 older, also damaged)\n"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_a_refused_new_run_leaves_no_run_directory(capsys, job, tmp_path):
    run = tmp_path / "r"
    code, _, err = train(capsys, job(f"model: {tmp_path / 'nope'}"), "-o", run)
    assert code == 2 and len(err.splitlines()) == 1
    assert not run.exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    code, _, _ = train(capsys, job(f"model: {tmp_path / 'nope'}"), "-o", existing)
    assert code == 2 and existing.is_dir() and not any(existing.iterdir())


def _cli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "tuneplex", "train", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        **kw,
    )


def test_a_routine_run_shows_only_tuneplex_lines(job, tmp_path):
    """Third-party warnings (bitsandbytes' CPU kernel notice, torch's pytree deprecation, ...)
    go to train.log; the terminal shows tuneplex's own lines."""
    run = tmp_path / "run"
    proc = _cli(job("schedule: {epochs: 1}"), "-o", run)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert err == ""
    prefixes = ("automodel: ", "data: ", "run directory: ", "[val] ", "[train] ", "final: ")
    assert all(line.startswith(prefixes) for line in out.splitlines()), out
    log = (run / "train.log").read_text()
    assert log.startswith("==== ") and " train " in log.splitlines()[0]


def test_a_second_train_is_refused_while_a_real_one_runs(job, tmp_path):
    run = tmp_path / "run"
    path = job("schedule: {epochs: 200}\noutput: {checkpoint_steps: 1000}")
    first = _cli(path, "-o", run)
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").is_file() or not read_metrics(run):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.2)
        for flags in ((), ("--resume",), ("--overwrite",)):
            second = _cli(path, "-o", run, *flags)
            out, err = second.communicate(timeout=300)
            assert second.returncode == 2 and out == "", err
            assert err == (
                f"{run}: in use by another tuneplex train (pid {first.pid} on host "
                f"{os.uname().nodename})\n"
            )
        assert first.poll() is None  # undisturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    json.loads((run / ".tuneplex" / "run.json").read_text())
