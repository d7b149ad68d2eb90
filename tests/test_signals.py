"""Stopping a run with a real signal (issue 14): SIGTERM and SIGINT mid-run, a second signal
during the stop, a stop during the final export, a launcher killed outright — real processes,
real `os.kill`, tiny local models on CPU. Every resumed run must reproduce the uninterrupted
run's losses bit for bit (CPU, fp32, same process layout)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers import chat_rows, cli, layout, merge_yaml, train, write_rows  # noqa: E402
from tuneplex.runs import latest_checkpoint, read_metrics  # noqa: E402
from tuneplex.testing import child_pids, is_running  # noqa: E402

TOTAL_STEPS = 128
JOB = """\
model: {model}
dataset: {{training: {root}/train.jsonl, validation: {root}/val.jsonl}}
training: {{max_seq_length: 64, precision: fp32}}
schedule: {{epochs: 8, seed: 7, val_check_interval: 0.5}}
batch: {{global_batch_size: 4, micro_batch_size: 2}}
optimizer: {{learning_rate: 1.0e-2, warmup_steps: 2}}
output: {{checkpoint_steps: 1000}}
"""
"""64 rows, 16 steps an epoch, 128 steps of ~15 ms on CPU: long enough to be signalled mid-run.
Checkpoints only at the end, so one in the middle is the stop's own."""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("signals")
    write_rows(root / "train.jsonl", chat_rows(64))
    write_rows(root / "val.jsonl", chat_rows(6, seed=1))
    (root / "job.yaml").write_text(JOB.format(model=tiny_model, root=root))
    return root


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    """uninterrupted(procs) -> the run of the job on `procs` processes, made once."""
    runs = {}

    def _run(procs: int):
        if procs not in runs:
            runs[procs] = workdir / f"whole-{procs}"
            cli(workdir / "job.yaml", "-o", runs[procs], *layout(procs), env=_env(workdir))
        return runs[procs]

    return _run


def _env(root) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "TUNEPLEX_CACHE": str(root / "cache")}


def start(argv: list, run, env) -> subprocess.Popen:
    """A command in a subprocess, output in files next to `run` (workers inherit them: a pipe
    would keep its reader waiting for them too)."""
    out = (run.parent / f"{run.name}.out").open("w")
    err = (run.parent / f"{run.name}.err").open("w")
    return subprocess.Popen(
        [str(a) for a in argv], stdout=out, stderr=err, env={**os.environ, **env}
    )


def stderr_of(run) -> str:
    return (run.parent / f"{run.name}.err").read_text()


def wait_for_steps(run, proc, n: int = 3, timeout: float = 300) -> None:
    """Until metrics.jsonl shows `n` training steps, the run still going."""
    path = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before the signal: {stderr_of(run)[-2000:]}"
        if path.is_file():
            steps = sum('"split": "train"' in line for line in path.read_text().splitlines())
            if steps >= n:
                return
        time.sleep(0.01)
    raise AssertionError(f"no {n} steps in {timeout} s")


def assert_bit_equal(a, b, keys=("step", "split", "loss", "grad_norm", "lr", "tokens")) -> None:
    """Every event of run `b` equals run `a`'s: same steps, losses, gradient norms, tokens."""
    ea = [tuple(e.get(k) for k in keys) for e in read_metrics(a)]
    eb = [tuple(e.get(k) for k in keys) for e in read_metrics(b)]
    assert ea == eb


def assert_stopped_at_a_checkpoint(run, sig, lines: list[str] | None = None) -> None:
    """summary.json says interrupted at step N < total, checkpoints/step_N is complete, and
    stderr (or `lines`) is one line saying how to resume."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    step = summary["steps"]
    assert 3 <= step < TOTAL_STEPS
    assert latest_checkpoint(run) == (step, run / "checkpoints" / f"step_{step}")
    assert (stderr_of(run).splitlines() if lines is None else lines) == [
        f"interrupted at step {step} by {sig.name}; `tuneplex train ... --backend automodel "
        f"--resume` continues from {run}/checkpoints/step_{step}"
    ]


@pytest.mark.parametrize(
    ("procs", "sig", "code"),
    [
        pytest.param(1, signal.SIGTERM, 143, id="sigterm"),
        pytest.param(1, signal.SIGINT, 130, id="sigint", marks=pytest.mark.slow),  # as sigterm
        pytest.param(2, signal.SIGTERM, 143, id="sigterm-dp2", marks=pytest.mark.slow),
    ],
)
def test_a_signal_stops_at_a_step_with_a_checkpoint_and_resume_gives_the_same_losses(
    workdir, uninterrupted, procs, sig, code
):
    whole = uninterrupted(procs)
    run = workdir / f"{sig.name.lower()}-{procs}"
    argv = [sys.executable, "-m", "tuneplex", "train", workdir / "job.yaml", "-o", run]
    proc = start(argv + layout(procs), run, _env(workdir))
    wait_for_steps(run, proc)
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=120) == code, stderr_of(run)[-3000:]
    assert_stopped_at_a_checkpoint(run, sig)
    cli(workdir / "job.yaml", "-o", run, "--resume", *layout(procs), env=_env(workdir))
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert_bit_equal(whole, run)


@pytest.mark.parametrize("procs", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["one", "dp2"])
def test_sigterm_with_async_checkpoints_stops_at_a_complete_one_and_resumes_bit_equal(
    workdir, uninterrupted, procs
):
    """Saves in flight while steps go on: the stop finishes the one in flight, saves its own
    step, and leaves no temporary directory; the resumed run is the uninterrupted one."""
    whole = uninterrupted(procs)
    run = workdir / f"async-sigterm-{procs}"
    asynchronous = ["--set", "output.async_checkpoints=true", "--set", "output.checkpoint_steps=2"]
    sets = [*layout(procs), *asynchronous]
    argv = [sys.executable, "-m", "tuneplex", "train", workdir / "job.yaml", "-o", run, *sets]
    proc = start(argv, run, _env(workdir))
    wait_for_steps(run, proc, n=5)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, stderr_of(run)[-3000:]
    assert_stopped_at_a_checkpoint(run, signal.SIGTERM)
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []
    cli(workdir / "job.yaml", "-o", run, "--resume", *sets, env=_env(workdir))
    assert_bit_equal(whole, run)


@pytest.mark.parametrize(
    ("procs", "asynchronous"),
    [
        pytest.param(2, False, id="dp2", marks=pytest.mark.slow),
        pytest.param(1, True, id="one-async", marks=pytest.mark.slow),
    ],
)
def test_kill_9_of_every_process_resumes_from_the_last_complete_checkpoint_bit_equal(
    workdir, uninterrupted, procs, asynchronous
):
    """SIGKILL to the launcher and every worker at once (what the OOM killer or a lost node
    does): no stop, no checkpoint of its own, saves maybe half written. `--resume` takes the
    newest complete checkpoint, drops what the dead run left, and gives the uninterrupted run's
    events bit for bit."""
    whole = uninterrupted(procs)
    run = workdir / f"kill9-{procs}-{'async' if asynchronous else 'sync'}"
    sets = [*layout(procs), "--set", "output.checkpoint_steps=4"]
    if asynchronous:
        sets += ["--set", "output.async_checkpoints=true"]
    argv = [sys.executable, "-m", "tuneplex", "train", workdir / "job.yaml", "-o", run, *sets]
    proc = start(argv, run, _env(workdir))
    deadline = time.monotonic() + 300
    while (latest_checkpoint(run) or (0,))[0] < 12:
        assert proc.poll() is None, stderr_of(run)[-2000:]
        assert time.monotonic() < deadline, "no checkpoint at step 12 in 300 s"
        time.sleep(0.01)
    wait_for_steps(run, proc, n=14)
    workers = child_pids(proc.pid)  # each in a session of its own: killed one by one
    assert len(workers) == (procs if procs > 1 else 0)
    for pid in [proc.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert _wait_gone(workers, timeout=15) == []
    assert not (run / "summary.json").exists()  # nothing got to write an ending
    kept = latest_checkpoint(run)[0]
    assert 12 <= kept < TOTAL_STEPS
    cli(workdir / "job.yaml", "-o", run, "--resume", *sets, env=_env(workdir))
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert_bit_equal(whole, run)


def test_a_second_signal_during_the_stop_is_one_note_never_a_traceback(workdir):
    run = workdir / "twice"
    argv = [sys.executable, "-m", "tuneplex", "train", workdir / "job.yaml", "-o", run]
    proc = start(argv, run, _env(workdir))
    wait_for_steps(run, proc)
    for pause in [0.002] * 20 + [0.05] * 50:  # Ctrl-C, again and again, through stop and exit
        try:
            os.kill(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            break
        time.sleep(pause)
    assert proc.wait(timeout=120) == 130
    note, *rest = stderr_of(run).splitlines()
    assert note == (
        "tuneplex: already stopping (SIGINT); finishing the step and writing its checkpoint"
    )
    assert_stopped_at_a_checkpoint(run, signal.SIGINT, rest)


def test_a_signal_during_the_final_export_leaves_the_run_resumable(
    capsys, workdir, tiny_model, tmp_path, monkeypatch
):
    """In-process, so that SIGTERM arrives at a known moment of the export: after the weights
    are written into final/'s temporary directory, as the tokenizer is being saved."""
    from transformers import AutoTokenizer

    path = tmp_path / "job.yaml"
    path.write_text(merge_yaml(JOB.format(model=tiny_model, root=workdir), "schedule: {epochs: 1}"))
    run = tmp_path / "run"
    tokenizer_class = type(AutoTokenizer.from_pretrained(tiny_model))
    save = tokenizer_class.save_pretrained

    def signalled_while_saving(self, directory, *args, **kw):
        assert "adapter_model.safetensors" in os.listdir(directory)  # the weights are written
        os.kill(os.getpid(), signal.SIGTERM)
        return save(self, directory, *args, **kw)

    monkeypatch.setattr(tokenizer_class, "save_pretrained", signalled_while_saving)
    code, _, err = train(capsys, path, "-o", run)
    assert code == 143, err
    assert err.strip().splitlines() == [
        "interrupted at step 16 by SIGTERM while writing final/; `tuneplex train ... --backend "
        f"automodel --resume` continues from {run}/checkpoints/step_16"
    ]
    assert not (run / "final").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".final")]
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    before = read_metrics(run)
    monkeypatch.setattr(tokenizer_class, "save_pretrained", save)
    code, _, err = train(capsys, path, "-o", run, "--resume")
    assert code == 0, err
    assert (run / "final" / "adapter_model.safetensors").stat().st_size > 1000
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert read_metrics(run) == before


def test_a_signal_while_setting_up_stops_at_once_with_one_line(
    capsys, workdir, tmp_path, monkeypatch
):
    """In-process: SIGTERM as the data is being prepared, before any step."""
    import tuneplex_automodel.trainer as trainer

    prepare = trainer.prepare

    def signalled_while_preparing(spec, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return prepare(spec, **kw)

    monkeypatch.setattr(trainer, "prepare", signalled_while_preparing)
    run = tmp_path / "run"
    code, _, err = train(capsys, workdir / "job.yaml", "-o", run)
    assert code == 143, err
    assert err.strip().splitlines() == [
        "interrupted by SIGTERM; `tuneplex train ... --backend automodel --resume` continues "
        "from the start (no checkpoint yet)"
    ]
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(is_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if is_running(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sigterm", ["default", "ignored"])
def test_a_child_tied_to_its_parent_ends_when_the_parent_is_killed(tmp_path, sigterm):
    """tie_to_parent alone: a parent killed with SIGKILL takes its child along — also when the
    child inherited SIGTERM ignored (as from a process that had stopped, or a job manager)."""
    pid_file = tmp_path / "child.pid"
    child = (
        "import os, sys, time; from tuneplex.signals import tie_to_parent; "
        "tie_to_parent(int(sys.argv[1])); open(sys.argv[2], 'w').write(str(os.getpid())); "
        "time.sleep(600)"
    )
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN); " if sigterm == "ignored" else ""
    spawn = f"subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid()), sys.argv[1]]); "
    parent = "import os, signal, subprocess, sys, time; " + ignore + spawn + "time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", parent, str(pid_file)])
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    kid = int(pid_file.read_text())
    time.sleep(1.0)
    assert is_running(kid)  # the tie does not stop a child whose parent lives
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _wait_gone([kid], timeout=5) == []


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_never_outlive_a_launcher_killed_with_sigkill(workdir, uninterrupted):
    whole = uninterrupted(2)
    run = workdir / "orphans"
    argv = [sys.executable, "-m", "tuneplex", "train", workdir / "job.yaml", "-o", run]
    proc = start(argv + layout(2), run, _env(workdir))
    wait_for_steps(run, proc)
    workers = child_pids(proc.pid)
    assert len(workers) == 2 and all(is_running(p) for p in workers)
    os.kill(proc.pid, signal.SIGKILL)  # as the OOM killer would
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert _wait_gone(workers, timeout=15) == []
    # they stopped the way SIGTERM stops them: a checkpoint at their last step, one line
    assert_stopped_at_a_checkpoint(run, signal.SIGTERM)
    cli(workdir / "job.yaml", "-o", run, "--resume", *layout(2), env=_env(workdir))
    assert_bit_equal(whole, run)


UNSLOTH_SEAM = """\
import sys
import tuneplex_unsloth.trainer as trainer
from tuneplex.backend import EnvironmentStatus
from tuneplex.cli import main
from tuneplex.plugins import registry
from tuneplex_unsloth.model import PeftLoader

trainer.LOADER = PeftLoader  # transformers + peft for unsloth's loader, on CPU
backend = type(registry().backends["unsloth"].backend)
backend.check_environment = lambda self: EnvironmentStatus(True, "CPU seam")
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_unsloth_stops_on_sigterm_with_a_checkpoint_and_resumes_the_same_losses(
    tmp_path, tiny_model
):
    pytest.importorskip("trl")
    pytest.importorskip("bitsandbytes")
    write_rows(tmp_path / "train.jsonl", chat_rows(32))
    write_rows(tmp_path / "val.jsonl", chat_rows(6, seed=1))
    job = tmp_path / "job.yaml"
    job.write_text(
        f"model: {{name: {tiny_model}, max_seq_length: 64, load_in_4bit: false}}\n"
        f"dataset: {{path: {tmp_path}/train.jsonl, validation_path: {tmp_path}/val.jsonl, "
        "apply_chat_template: true}\n"
        "training: {use_gradient_checkpointing: false}\n"
        "schedule: {epochs: 3, seed: 1, eval_steps: 8, logging_steps: 1}\n"
        "batch: {per_device_train_batch_size: 2, gradient_accumulation_steps: 2}\n"
        "optimizer: {learning_rate: 1.0e-2}\n"
    )
    seam = tmp_path / "seam.py"
    seam.write_text(UNSLOTH_SEAM)
    argv = [sys.executable, seam, "train", job, "--backend", "unsloth", "-o"]
    env = _env(tmp_path)
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert start([*argv, whole], whole, env).wait(timeout=600) == 0, stderr_of(whole)
    proc = start([*argv, run], run, env)
    wait_for_steps(run, proc)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, stderr_of(run)[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    step = summary["steps"]
    assert summary["status"] == "interrupted" and 3 <= step < 24
    assert latest_checkpoint(run) == (step, run / "checkpoints" / f"step_{step}")
    assert stderr_of(run).splitlines() == [
        f"interrupted at step {step} by SIGTERM; `tuneplex train ... --backend unsloth "
        f"--resume` continues from {run}/checkpoints/step_{step}"
    ]
    resumed = start([*argv, run, "--resume"], run, env)
    assert resumed.wait(timeout=600) == 0, stderr_of(run)
    # not `tokens`: counted as batches are collated, and accelerate fetches one batch ahead
    assert_bit_equal(whole, run, keys=("step", "split", "loss", "grad_norm", "lr"))
