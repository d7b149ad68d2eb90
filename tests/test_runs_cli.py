"""`tuneplex runs list | show | plot` on real runs of the tiny model, and every way a run
directory can be missing, foreign, damaged or unfinished."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from tuneplex.runs import MARKER

pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers import chat_rows, write_rows
from tuneplex.cli import main
from tuneplex.runs import read_metrics
from tuneplex.runs.listing import read_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MARKER_MISSING = "not a run directory (no .tuneplex/run.json)"

JOB = """\
model: {model}
dataset: {{training: {train}{validation}}}
training: {{finetuning_type: {ft}, max_seq_length: 96}}
schedule: {{epochs: 2, seed: 7}}
batch: {{global_batch_size: 4, micro_batch_size: 2}}
optimizer: {{learning_rate: {lr}, warmup_steps: 1}}
output: {{checkpoint_steps: 2}}
"""
"""8 rows of 4: 2 steps an epoch, 4 in all, validated before training and at the end."""


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """Two real runs under one folder: `lora` (LoRA, with validation) and `full` (all
    weights, no validation set, another learning rate)."""
    root = tmp_path_factory.mktemp("runs-cli")
    write_rows(root / "train.jsonl", chat_rows(8))
    write_rows(root / "val.jsonl", chat_rows(4, seed=1))
    made = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEPLEX_CACHE", str(root / "cache"))
        for name, ft, lr, val in (
            ("lora", "lora", "1.0e-2", f", validation: {root / 'val.jsonl'}"),
            ("full", "all_weights", "5.0e-3", ""),
        ):
            job = root / f"{name}.yaml"
            job.write_text(
                JOB.format(
                    model=tiny_model, train=root / "train.jsonl", validation=val, ft=ft, lr=lr
                )
            )
            made[name] = root / "runs" / name
            assert main(["train", str(job), "-o", str(made[name])]) == 0
    made["root"] = root / "runs"
    return made


@pytest.fixture
def tp(capsys):
    """tp(*args) -> (exit code, stdout, stderr) of `tuneplex runs ARGS`, through cli.main."""
    from tuneplex import cli

    assert any(g.name == "runs" for g in cli.app.registered_groups)

    def run(*args):
        code = cli.main(["runs", *map(str, args)])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def _copy(run, dest):
    shutil.copytree(run, dest)
    return dest


def _summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def _fake_run(path, events, summary=None):
    """A run directory written by hand: the marker, job.json, metrics.jsonl."""
    (path / ".tuneplex").mkdir(parents=True)
    (path / ".tuneplex" / "run.json").write_text(json.dumps({"format": 1, "run_id": "x"}))
    (path / "job.json").write_text("{}")
    (path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


# -- list ----------------------------------------------------------------------------------


def test_list_table_shows_both_runs(tp, runs):
    code, out, err = tp("list", runs["root"])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["run", "backend", "status", "steps"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    best = _summary(runs["lora"])["best_val_loss"]
    assert rows["lora"][1:6] == ["automodel", "completed", "4/4", f"{best:.4f}", f"{best:.4f}"]
    assert rows["full"][1:6] == ["automodel", "completed", "4/4", "-", "-"]


def test_list_json_statuses_steps_and_best_validation(tp, runs):
    code, out, err = tp("list", runs["root"], "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == {"lora", "full"}
    lora = rows["lora"]
    val = [e["loss"] for e in read_metrics(runs["lora"]) if e["split"] == "val"]
    assert len(val) == 2 and val[1] < val[0]  # before training, at the end
    assert lora["status"] == "completed" and (lora["steps"], lora["total_steps"]) == (4, 4)
    assert lora["best_val_loss"] == pytest.approx(min(val))
    assert lora["val_loss"] == pytest.approx(val[-1])
    assert lora["backend"] == "automodel" and lora["tokens_per_s"] > 0 and lora["started"]
    assert rows["full"]["best_val_loss"] is None and rows["full"]["steps"] == 4


def test_list_running_and_incomplete_runs_come_from_metrics(tp, runs, tmp_path):
    root = tmp_path / "runs"
    running = _copy(runs["lora"], root / "a" / "running")
    crashed = _copy(runs["lora"], root / "b" / "crashed")
    for run in (running, crashed):
        (run / "summary.json").unlink()
    # a run inside a run's own folders is not another run
    (crashed / "checkpoints" / ".tuneplex").mkdir()
    (crashed / "checkpoints" / ".tuneplex" / "run.json").write_text("{}")
    fd = os.open(running / ".tuneplex" / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, out, err = tp("list", root, "--json")
    finally:
        os.close(fd)
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == {"a/running", "b/crashed"}
    assert rows["a/running"]["status"] == "running"
    assert rows["b/crashed"]["status"] == "incomplete"
    val = [e["loss"] for e in read_metrics(crashed) if e["split"] == "val"]
    for row in rows.values():
        assert (row["steps"], row["total_steps"]) == (4, None)
        assert row["best_val_loss"] == pytest.approx(min(val))
    # the lock was only tested: once released, the run is free again
    assert read_run(running).status == "incomplete"
    code, out, _ = tp("list", root)
    assert "4/?" in out and "incomplete" in out


def test_list_of_a_run_directory_itself(tp, runs):
    code, out, err = tp("list", runs["lora"], "--json")
    assert code == 0, err
    assert [(r["name"], r["status"]) for r in json.loads(out)] == [("lora", "completed")]


def test_list_empty_and_missing_directories(tp, tmp_path):
    (tmp_path / "empty").mkdir()
    assert tp("list", tmp_path / "empty") == (0, f"no runs under {tmp_path / 'empty'}\n", "")
    assert tp("list", tmp_path / "empty", "--json") == (0, "[]\n", "")
    missing = tmp_path / "nowhere"
    assert tp("list", missing) == (2, "", f"{missing}: no such directory\n")
    (tmp_path / "file").write_text("x")
    assert tp("list", tmp_path / "file") == (2, "", f"{tmp_path / 'file'}: not a directory\n")


def test_list_defaults_to_runs_in_the_current_directory(tp, runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tp("list") == (2, "", "runs: no such directory\n")
    _copy(runs["full"], tmp_path / "runs" / "x")
    code, out, _ = tp("list")
    assert code == 0 and out.splitlines()[1].split()[:3] == ["x", "automodel", "completed"]


def test_list_names_an_unreadable_run_and_lists_the_rest(tp, runs, tmp_path):
    good = _copy(runs["full"], tmp_path / "good")
    bad = _copy(runs["full"], tmp_path / "bad")
    (bad / "summary.json").write_text('{"status": "completed",\n  oops}\n')
    code, out, err = tp("list", tmp_path, "--json")
    assert code == 0
    why = "invalid JSON (Expecting property name enclosed in double quotes)"
    assert err == f"{bad / 'summary.json'}:2: {why}\n"
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["bad"]["status"] == "unreadable" and rows["good"]["status"] == "completed"
    assert good.is_dir()


# -- show ----------------------------------------------------------------------------------


def test_show_lora_run_text(tp, runs):
    run = runs["lora"]
    code, out, err = tp("show", run)
    assert code == 0, err
    final = (run / "final").resolve()
    best = _summary(run)["best_val_loss"]
    lines = out.splitlines()
    assert lines[0] == f"run        {run.resolve()}"
    assert lines[1] == "status     completed, automodel, 4/4 steps, 2 epochs"
    assert "  training     sft, lora (rank 16, alpha 32)" in out
    assert "  lr           0.01" in out
    assert "  batch        global_batch_size 4, micro_batch_size 2" in out
    assert "8 rows, 8 examples" in out and "0 truncated" in out
    assert f"final      {final}  (LoRA adapter on " in out
    load = f"AutoPeftModelForCausalLM.from_pretrained({str(final)!r})"
    assert f"  load     from peft import AutoPeftModelForCausalLM; model = {load}" in lines
    step4 = (run / "checkpoints" / "step_4").resolve()
    assert f"best       validation {best:.4f} at step 4: {step4}" in lines


def test_show_json_full_model(tp, runs):
    run = runs["full"]
    code, out, err = tp("show", run, "--json")
    assert code == 0, err
    report = json.loads(out)
    final = str((run / "final").resolve())
    assert report["status"] == "completed" and report["steps"] == 4
    assert report["final"]["kind"] == "full_model" and report["final"]["path"] == final
    assert report["final"]["load"].endswith(f"AutoModelForCausalLM.from_pretrained({final!r})")
    assert report["settings"]["finetuning_type"] == "all_weights"
    assert report["settings"]["learning_rate"] == 5e-3
    assert report["settings"]["lora_rank"] is None
    assert report["settings"]["validation_data"] is None
    assert report["best_checkpoint"] is None and report["best_val_loss"] is None
    assert report["data"]["train"]["rows"] == 8
    assert report["summary"] == _summary(run)
    assert report["last_checkpoint"].endswith("step_4")


def test_show_json_lora_load_hint_matches_final(tp, runs):
    report = json.loads(tp("show", runs["lora"], "--json")[1])
    assert report["final"]["kind"] == "lora_adapter"
    assert "AutoPeftModelForCausalLM" in report["final"]["load"]
    assert (runs["lora"] / "final" / "adapter_config.json").is_file()
    assert report["settings"]["lora_rank"] == 16
    assert report["best_checkpoint"]["step"] == 4


def test_show_merged_lora_loads_as_a_model(tp, tmp_path):
    run = _fake_run(tmp_path / "merged", [{"step": 1, "split": "train", "loss": 2.0}])
    (run / "final" / "adapter").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    (run / "final" / "adapter" / "adapter_config.json").write_text("{}")
    final = json.loads(tp("show", run, "--json")[1])["final"]
    assert final["kind"] == "merged_model" and "AutoModelForCausalLM" in final["load"]


def test_show_incomplete_run_with_a_line_being_written(tp, runs, tmp_path):
    run = _copy(runs["lora"], tmp_path / "crashed")
    (run / "summary.json").unlink()
    shutil.rmtree(run / "final")
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 5, "split": "tra')  # cut by the crash: no newline
    code, out, err = tp("show", run)
    assert code == 0, err
    assert "status     incomplete, automodel, 4/? steps" in out  # run.json names the backend
    assert "final      none (the run did not complete)" in out
    assert "  training     sft, lora (rank 16, alpha 32)" in out
    report = json.loads(tp("show", run, "--json")[1])
    assert report["status"] == "incomplete" and report["final"] is None
    assert report["last_checkpoint"] == str(run / "checkpoints" / "step_4")
    assert report["settings"]["lora_rank"] == 16 and "settings_unavailable" not in report
    # a run made before run.json named its backend: the one installed schema its job fits
    marker = json.loads((run / MARKER).read_text())
    del marker["backend"]
    (run / MARKER).write_text(json.dumps(marker))
    report = json.loads(tp("show", run, "--json")[1])
    assert report["backend"] is None and report["settings"]["lora_rank"] == 16


def _without_job_block(lines: list[str]) -> list[str]:
    """`runs show` lines less the job's: the `job` line or block (its lines are indented)."""
    start = next(i for i, line in enumerate(lines) if line.startswith("job"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("  "))
    return lines[:start] + lines[end:]


def test_show_without_the_runs_backend_installed_says_so_in_one_line(
    tp, runs, tmp_path, monkeypatch
):
    from tuneplex import plugins
    from tuneplex.testing import fake_entry_point

    run = runs["lora"]
    code, out, err = tp("show", run)
    assert code == 0, err
    report = json.loads(tp("show", run, "--json")[1])
    only_fake = plugins.load_registry([fake_entry_point()])
    monkeypatch.setattr(plugins, "registry", lambda: only_fake)
    code, bare, err = tp("show", run)
    assert code == 0 and err == ""
    why = "the automodel backend is not installed (pip install 'tuneplex[automodel]')"
    assert f"job        settings not shown: {why}" in bare.splitlines()
    assert _without_job_block(bare.splitlines()) == _without_job_block(out.splitlines())
    code, text, _ = tp("show", run, "--json")
    bare_report = json.loads(text)
    assert bare_report.pop("settings") is None
    assert bare_report.pop("settings_unavailable") == why
    assert bare_report == {k: v for k, v in report.items() if k != "settings"}


def test_show_a_saved_job_that_is_no_longer_valid(tp, runs, tmp_path):
    run = _copy(runs["full"], tmp_path / "old")
    job = json.loads((run / "job.json").read_text())
    job["training"]["finetuning_type"] = "qlora"  # say, from a version that had it
    (run / "job.json").write_text(json.dumps(job))
    code, out, err = tp("show", run)
    assert code == 0, err
    (line,) = [x for x in out.splitlines() if x.startswith("job")]
    assert line.startswith(
        "job        settings not shown: job.json is no longer a valid automodel job: "
        "training.finetuning_type: "
    )
    assert "final      " in out and "  model" not in out
    report = json.loads(tp("show", run, "--json")[1])
    assert report["settings"] is None
    assert report["settings_unavailable"] == line.removeprefix("job        settings not shown: ")


def test_show_asks_the_unsloth_backend_for_an_unsloth_run(tp, tmp_path):
    events = [{"step": 1, "split": "train", "loss": 2.0}]
    run = _fake_run(tmp_path / "u", events, {"status": "completed", "backend": "unsloth"})
    job = {
        "model": {"name": "org/base", "max_seq_length": 512},
        "dataset": {"path": "train.jsonl", "validation_path": "val.jsonl"},
        "training": {"lora": {"rank": 8}},
        "batch": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4},
    }
    (run / "job.json").write_text(json.dumps(job))
    code, out, err = tp("show", run)
    assert code == 0, err
    lines = out.splitlines()
    i = lines.index("job")
    assert lines[i + 1 : i + 8] == [
        "  model        org/base",
        "  data         train.jsonl, validation val.jsonl",
        "  training     sft, lora (rank 8, alpha 16)",
        "  max length   512",
        "  lr           0.0002",
        "  batch        per_device_train_batch_size 2, gradient_accumulation_steps 4",
        "  schedule     1 epochs, seed 3407",
    ]
    settings = json.loads(tp("show", run, "--json")[1])["settings"]
    assert settings["batch"] == job["batch"] and settings["max_seq_length"] == 512


def test_show_json_of_a_diverged_run_is_strict_json(tp, tmp_path):
    events = [{"step": 1, "split": "train", "loss": float("nan")}]
    summary = {"status": "diverged", "backend": "automodel", "steps": 1, "total_steps": 8}
    run = _fake_run(tmp_path / "nan", events, {**summary, "train_loss": float("nan")})
    code, out, err = tp("show", run, "--json")
    assert code == 0, err
    report = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert report["summary"]["train_loss"] is None and report["status"] == "diverged"
    code, out, _ = tp("show", run)
    assert "status     diverged, automodel, 1/8 steps" in out
    assert "loss       train nan, validation -, best validation -" in out


# -- plot ----------------------------------------------------------------------------------


def _has_color(png, rgb, *, at_least=200) -> bool:
    """Whether the picture has at least `at_least` pixels of color `rgb` (0-255)."""
    from matplotlib.image import imread

    pixels = imread(png)[..., :3] * 255
    close = (abs(pixels - rgb) < 12).all(axis=-1)
    return int(close.sum()) >= at_least


BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # the first two of matplotlib's tab10


def test_plot_one_run_redraws_its_curves_png(tp, runs, tmp_path):
    pytest.importorskip("matplotlib")
    from tuneplex.runs.plots import plot_run

    run = _copy(runs["lora"], tmp_path / "lora")
    (run / "curves.png").unlink(missing_ok=True)
    code, out, err = tp("plot", run)
    assert (code, out, err) == (0, f"{run / 'curves.png'}\n", "")
    assert (run / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert _has_color(run / "curves.png", BLUE) and not _has_color(run / "curves.png", ORANGE)
    (run / "curves.png").unlink()
    assert plot_run(run) == run / "curves.png"  # what a run draws when it ends
    assert (run / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_two_runs_overlaid_png_default_in_the_current_directory(
    tp, runs, tmp_path, monkeypatch
):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    code, out, err = tp("plot", runs["lora"], runs["full"])
    assert (code, out, err) == (0, "curves.png\n", "")
    picture = tmp_path / "curves.png"
    assert picture.read_bytes()[:8] == PNG_MAGIC
    assert _has_color(picture, BLUE) and _has_color(picture, ORANGE)


def test_plot_svg(tp, runs, tmp_path):
    pytest.importorskip("matplotlib")
    out_file = tmp_path / "both.SVG"
    assert tp("plot", runs["lora"], runs["full"], "-o", out_file) == (0, f"{out_file}\n", "")
    root = ET.parse(out_file).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"


def test_plot_refuses_other_extensions(tp, runs, tmp_path):
    for name in ("curves.jpg", "curves"):
        target = tmp_path / name
        got = "." + name.split(".")[1] if "." in name else "no extension"
        code, out, err = tp("plot", runs["lora"], "-o", target)
        assert (code, out) == (2, "")
        assert err == f"{target}: a picture must end in .png or .svg (got {got})\n"
        assert not target.exists()


def test_plot_never_replaces_a_file_it_did_not_draw(tp, runs, tmp_path):
    pytest.importorskip("matplotlib")
    for name in ("mine.png", "mine.svg"):
        target = tmp_path / name
        target.write_text("the user's own file")
        code, out, err = tp("plot", runs["lora"], "-o", target)
        assert (code, out) == (2, "")
        assert err == (
            f"{target}: exists and is not a picture tuneplex drew; it is kept: choose another "
            "-o (or remove it)\n"
        )
        assert target.read_text() == "the user's own file"
    drawn = tmp_path / "drawn.png"
    for _ in range(2):  # a picture it drew is redrawn in place
        code, out, err = tp("plot", runs["lora"], "-o", drawn)
        assert code == 0, err
        assert out == f"{drawn}\n"


def test_plot_run_writes_curves_png_for_hard_metrics(tmp_path):
    """NaN and inf losses, a run without grad norm, throughput or validation, one step."""
    pytest.importorskip("matplotlib")
    from tuneplex.runs.plots import plot_run, plot_runs

    nan, inf = float("nan"), float("inf")
    events = [
        {"step": s, "epoch": s / 10, "split": "train", "loss": loss, "lr": 1e-3}
        for s, loss in enumerate([3.0, 2.5, nan, 2.0, inf, 1.8], start=1)
    ]
    diverged = _fake_run(tmp_path / "diverged", events, {"status": "diverged", "steps": 6})
    assert plot_run(diverged) == diverged / "curves.png"
    assert (diverged / "curves.png").read_bytes()[:8] == PNG_MAGIC
    one = _fake_run(tmp_path / "one", [{"step": 1, "split": "train", "loss": 2.0}])
    assert plot_run(one).read_bytes()[:8] == PNG_MAGIC
    both = plot_runs([diverged, one], tmp_path / "both.png", labels=["a", "b"])
    assert both.read_bytes()[:8] == PNG_MAGIC


def test_plot_of_a_reinforcement_learning_run_has_a_reward_panel(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from tuneplex.runs import plots
    from tuneplex.runs.listing import read_run

    events = [
        {"step": s, "split": "train", "loss": 0.1, "lr": 1e-3, "reward": 0.1 * s}
        for s in range(1, 6)
    ] + [{"step": 5, "split": "val", "loss": -0.4, "reward": 0.4}]
    run = _fake_run(tmp_path / "grpo", events, {"status": "completed", "steps": 5})
    drawn, real = [], plots._small_panel
    monkeypatch.setattr(
        plots, "_small_panel", lambda ax, key, *a: (drawn.append(key), real(ax, key, *a))
    )
    assert plots.plot_run(run).read_bytes()[:8] == PNG_MAGIC
    assert drawn == ["lr", "grad_norm", "tokens_per_s", "reward"]
    curves = plots._Curves.of(read_run(run), "grpo")
    assert curves.panels["val_reward"] == ([5.0], [0.4])


def test_plot_of_a_run_without_metrics_yet(tp, tmp_path):
    run = _fake_run(tmp_path / "new", [])
    code, out, err = tp("plot", run)
    assert (code, out) == (2, "")
    assert err == f"{run / 'metrics.jsonl'}: no finite metrics recorded yet; nothing to plot\n"


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["show", "plot"])
def test_not_a_run_and_missing_paths(tp, tmp_path, command):
    (tmp_path / "mine").mkdir()
    assert tp(command, tmp_path / "mine") == (2, "", f"{tmp_path / 'mine'}: {MARKER_MISSING}\n")
    missing = tmp_path / "gone"
    assert tp(command, missing) == (2, "", f"{missing}: no such file or directory\n")


@pytest.mark.parametrize("command", ["show", "plot"])
def test_corrupt_metrics_names_the_line(tp, runs, tmp_path, command):
    run = _copy(runs["lora"], tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = tp(command, run)
    assert (code, out) == (2, "")
    assert err.startswith(f"{run / 'metrics.jsonl'}:3: invalid JSON (")
    assert err.count("\n") == 1 and "Traceback" not in err
    lines[2] = "[1, 2]"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert tp(command, run)[2] == f"{run / 'metrics.jsonl'}:3: not a metrics event (no step)\n"


@pytest.mark.parametrize("command", ["show", "plot"])
def test_corrupt_summary_names_the_line(tp, runs, tmp_path, command):
    run = _copy(runs["full"], tmp_path / "run")
    (run / "summary.json").write_text('{\n  "status": "completed",\n  "steps": 4 4\n}\n')
    code, out, err = tp(command, run)
    assert (code, out) == (2, "")
    assert err == f"{run / 'summary.json'}:3: invalid JSON (Expecting ',' delimiter)\n"
    (run / "summary.json").write_text("[]")
    assert tp(command, run)[2] == f"{run / 'summary.json'}: not a JSON object\n"


def test_unreadable_metrics(tp, runs, tmp_path):
    run = _copy(runs["full"], tmp_path / "run")
    (run / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": "\xff"}\n')
    code, _, err = tp("show", run)
    assert code == 2 and err.startswith(f"{run / 'metrics.jsonl'}: cannot read it (")


def test_missing_arguments(tp):
    assert tp("show") == (2, "", "tuneplex runs show: Missing argument 'run'. (see --help)\n")
    code, _, err = tp("plot")
    assert code == 2 and err.startswith("tuneplex runs plot: Missing argument")


def test_importing_the_commands_stays_light():
    heavy = "('matplotlib', 'torch', 'tuneplex.runs.plots')"
    code = f"import sys, tuneplex.cli.runs; print(sorted(m for m in {heavy} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout == "[]\n"
