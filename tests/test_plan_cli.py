"""`tuneplex plan` end to end through the real CLI, on config-only model directories (no
weights, no torch): the report, --json, GPUs by name, by size and as nvidia-smi shows them,
suggestions that fit once pasted, validate's line and train's warning."""

import json
import os
import shlex
import stat

import pytest
from test_plan_spec_table import CONFIGS
from tuneplex.cli import main
from tuneplex.testing import imported_heavy_modules

LLAMA_1B = CONFIGS["1B"]  # the public configs, as the spec-table test writes them
LLAMA_8B = CONFIGS["8B"]


@pytest.fixture
def model(tmp_path):
    """model(config) -> a config-only model directory."""

    def _model(config: dict, name: str = "m") -> str:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        return str(folder)

    return _model


@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    """No nvidia-smi on PATH: no GPU visible, wherever the tests run."""
    empty = tmp_path / "no-nvidia-smi"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def fake_nvidia_smi(folder, rows: str) -> str:
    """A PATH whose nvidia-smi is a stand-in printing `rows` for the query the CLI makes (and
    failing for any other, so the query is checked too)."""
    folder.mkdir(exist_ok=True)
    exe = folder / "nvidia-smi"
    query = "--query-gpu=index,uuid,name,memory.total,memory.free --format=csv,noheader,nounits"
    exe.write_text(
        f'#!/bin/sh\n[ "$*" = {shlex.quote(query)} ] || exit 9\ncat <<"EOF"\n{rows}EOF\n'
    )
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return os.pathsep.join([str(folder), os.environ["PATH"]])


def job_file(write, model: str, extra: str = "", name: str = "job.yaml"):
    return write(name, f"model: {model}\ndataset:\n  training: train.jsonl\n{extra}")


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def plan_json(capsys, *args) -> dict:
    code, out, err = cli(capsys, "plan", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_text_report_breakdown_notes_and_verdict(capsys, write, model, no_gpu):
    folder = model(LLAMA_8B)
    job = job_file(write, folder)
    code, out, err = cli(capsys, "plan", job, "--gpu", "H100-80GB")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"{job}: automodel job, {folder} (8.03B parameters), on 1 GPU"
    total = float(lines[1].removeprefix("estimated peak memory per GPU: ").removesuffix(" GiB"))
    rows = [line for line in lines if line.startswith("  ") and line.endswith(" GiB")]
    names = [row.split("  ")[1].strip() for row in rows]
    assert names[:2] == ["weights", "lora weights"] and "activations" in names
    assert len({row.rindex("GiB") for row in rows}) == 1  # aligned
    assert sum(float(row.split()[-2]) for row in rows) == pytest.approx(total, abs=0.05)
    assert any(line.startswith("  note: activation checkpointing") for line in lines)
    assert lines[-1].startswith("GPU: H100 80GB (79.65 GiB): fits, ")
    # the same job on a 16 GiB card does not fit, and says by how much
    code, out, _ = cli(capsys, "plan", job, "--gpu-memory", "16")
    verdict = next(line for line in out.splitlines() if line.startswith("GPU: "))
    over = float(verdict.split("does not fit, ")[1].split()[0])
    assert verdict.startswith("GPU: 16.00 GiB (--gpu-memory): does not fit")
    assert over == pytest.approx(total - 16, abs=0.02)
    # just enough room: it fits, and says it is tight
    _, out, _ = cli(capsys, "plan", job, "--gpu-memory", f"{total + 0.5:.2f}")
    spare = out.splitlines()[-1].split(": fits, ")[1]
    assert spare.startswith(("0.49 ", "0.50 ", "0.51 ")) and spare.endswith(
        " GiB to spare (tight: under 10% left)"
    )


def test_json_keys_and_types(capsys, write, model, no_gpu):
    job = job_file(write, model(LLAMA_1B))
    out = plan_json(capsys, job, "--gpu", "l4")
    assert {"per_gpu_gib", "gpu_gib", "fits", "breakdown", "suggestions"} <= set(out)
    assert out["gpu_name"] == "L4" and out["gpu_gib"] == 22.49 and out["gpus"] == 1
    assert out["model"].endswith("/m") and 1.2e9 < out["parameters"] < 1.3e9
    assert isinstance(out["per_gpu_gib"], float) and out["fits"] is True
    assert sum(out["breakdown"].values()) == pytest.approx(out["per_gpu_gib"], abs=0.05)
    assert out["suggestions"] == [] and isinstance(out["notes"], list)
    out = plan_json(capsys, job, "--gpu-memory", "23.5")
    assert (out["gpu_name"], out["gpu_gib"], out["fits"]) == (None, 23.5, True)
    # no --gpu and no GPU visible: the job's GPU count, no size, no verdict
    out = plan_json(capsys, job, "--set", "parallelism.num_gpus_per_node=4")
    assert (out["gpu_gib"], out["fits"], out["gpu_name"], out["gpus"]) == (None, None, None, 4)
    code, text, _ = cli(capsys, "plan", job)
    assert code == 0 and "GPU: none visible; give --gpu NAME or --gpu-memory GIB" in text


@pytest.mark.parametrize(
    ("name", "card", "gib"),
    [
        ("h100", "H100 80GB", 79.65),
        ("H100-80GB", "H100 80GB", 79.65),
        ("NVIDIA H100 80GB HBM3", "H100 80GB", 79.65),
        ("h100 nvl", "H100 NVL", 93.58),
        ("H200", "H200", 140.4),
        ("a100-40gb", "A100 40GB", 40.0),
        ("A100_80G", "A100 80GB", 80.0),
        ("l40s", "L40S", 44.99),
        ("a10g", "A10G", 22.49),
        ("rtx4090", "RTX 4090", 23.99),
        ("Tesla T4", "T4", 15.0),
    ],
)
def test_gpu_names_looked_up_leniently(capsys, write, model, name, card, gib, no_gpu):
    out = plan_json(capsys, job_file(write, model(LLAMA_1B)), "--gpu", name)
    assert (out["gpu_name"], out["gpu_gib"]) == (card, gib)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--gpu", "h1000"], "--gpu h1000: unknown GPU; did you mean 'H100 80GB'? (known: B200,"),
        (["--gpu", "a100"], "--gpu a100: ambiguous: A100 40GB or A100 80GB"),
        (["--gpu", "v100"], "--gpu v100: ambiguous: V100 16GB or V100 32GB"),
        (["--gpu-memory", "0"], "--gpu-memory: expected GiB > 0 (got 0)"),
        (["--gpu-memory", "-3"], "--gpu-memory: expected GiB > 0 (got -3)"),
        (["--gpu", "l4", "--gpu-memory", "24"], "--gpu, --gpu-memory: give one of them, not both"),
        (["--gpu-memory", "lots"], "tuneplex plan: Invalid value for '--gpu-memory'"),
    ],
)
def test_bad_gpu_flags_are_one_line_exit_2(capsys, write, model, args, line, no_gpu):
    code, out, err = cli(capsys, "plan", job_file(write, model(LLAMA_1B)), *args)
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and err.startswith(line), err


def test_suggestions_fit_once_pasted(capsys, write, model, no_gpu):
    """Full weights of an 8B model on one 80 GB card: each suggestion, pasted as its --set
    flags, gives a job that fits, with the estimate the suggestion said."""
    job = job_file(write, model(LLAMA_8B), "training:\n  finetuning_type: all_weights\n")
    out = plan_json(capsys, job, "--gpu", "h100")
    assert out["fits"] is False and out["per_gpu_gib"] > 79.65
    assert 1 <= len(out["suggestions"]) <= 5
    assert out["suggestions"][0] == "--set training.finetuning_type=lora"
    for flags, change in zip(out["suggestions"], out["suggested_changes"], strict=True):
        again = plan_json(capsys, job, "--gpu", "h100", *shlex.split(flags))
        assert again["fits"] is True, flags
        assert again["per_gpu_gib"] == change["per_gpu_gib"] and again["gpus"] == change["gpus"]
    _, text, _ = cli(capsys, "plan", job, "--gpu", "h100")
    assert "changes that fit, fewest first:" in text
    assert "     --set training.finetuning_type=lora" in text.splitlines()


def test_combined_changes_when_no_single_one_fits(capsys, write, model, no_gpu):
    """A 1B LoRA job at 16k tokens a row on a 16 GiB card: no one change is enough, so the
    suggestions combine two (every one fitting once pasted), none with a key twice."""
    job = job_file(write, model(LLAMA_1B), "training:\n  max_seq_length: 16384\n")
    out = plan_json(capsys, job, "--gpu-memory", "16", "--set", "batch.micro_batch_size=4")
    assert out["fits"] is False
    assert out["suggestions"], out
    for change in out["suggested_changes"]:
        assert len(change["overrides"]) >= 2
    for flags in out["suggestions"]:
        again = plan_json(
            capsys,
            job,
            "--gpu-memory",
            "16",
            "--set",
            "batch.micro_batch_size=4",
            *shlex.split(flags),
        )
        assert again["fits"] is True, flags


def test_nothing_fits_says_so(capsys, write, model, no_gpu):
    job = job_file(write, model(LLAMA_8B), "training:\n  finetuning_type: all_weights\n")
    code, out, _ = cli(capsys, "plan", job, "--gpu-memory", "1")
    assert code == 0 and out.splitlines()[-1].startswith("no change tuneplex knows of fits")
    assert plan_json(capsys, job, "--gpu-memory", "1")["suggestions"] == []


def test_unsloth_plans_a_4bit_base(capsys, write, model, no_gpu):
    folder = model(LLAMA_8B)
    job = write("u.yaml", f"model:\n  name: {folder}\ndataset:\n  path: train.jsonl\n")
    four = plan_json(capsys, job, "--backend", "unsloth", "--gpu", "t4")
    sixteen = plan_json(
        capsys, job, "--backend", "unsloth", "--gpu", "t4", "--set", "model.load_in_4bit=false"
    )
    assert four["breakdown"]["weights"] < 0.4 * sixteen["breakdown"]["weights"]
    assert four["fits"] is True and sixteen["fits"] is False
    assert "--set model.load_in_4bit=true --set model.load_in_8bit=false" in sixteen["suggestions"]


def test_bad_model_and_backend_are_one_line_exit_2(capsys, write, tmp_path, fake_registry, no_gpu):
    (tmp_path / "weights-only").mkdir()
    cases = [
        (job_file(write, str(tmp_path / "weights-only")), "model: ", "no config.json"),
        (job_file(write, "./missing", name="j2.yaml"), "model: ./missing", "no such local"),
        (job_file(write, "org/not-cached", name="j3.yaml"), "model: org/not-cached", "offline"),
    ]
    for job, start, part in cases:
        code, out, err = cli(capsys, "plan", job, "--gpu", "h100")
        assert (code, out) == (2, "") and len(err.splitlines()) == 1, err
        assert err.startswith(start) and part in err
    fake = write("f.yaml", "model: m\ndataset:\n  path: d.jsonl\n")
    code, _, err = cli(capsys, "plan", fake, "--backend", "fake")
    assert (code, err) == (2, "backend fake cannot estimate memory\n")
    code, _, err = cli(capsys, "plan", tmp_path / "none.yaml")
    assert code == 2 and err.startswith(f"{tmp_path / 'none.yaml'}: no such file")


def test_relative_model_path_is_read_from_the_working_directory(
    capsys, write, model, monkeypatch, tmp_path, no_gpu
):
    model(LLAMA_1B, name="local")
    job = job_file(write, "./local")
    monkeypatch.chdir(tmp_path)
    assert plan_json(capsys, job.name, "--gpu", "l4")["model"] == "./local"


def test_visible_gpus_from_nvidia_smi(capsys, write, model, monkeypatch, tmp_path):
    rows = (
        "0, GPU-1111-aa, NVIDIA L4, 23034, 20000\n"
        "1, GPU-2222-bb, NVIDIA H100 80GB HBM3, 81559, 81000\n"
    )
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "bin", rows))
    job = job_file(write, model(LLAMA_1B))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = plan_json(capsys, job)  # the smallest card visible
    assert (out["gpu_name"], out["gpu_gib"], out["gpu_free_gib"]) == ("NVIDIA L4", 22.49, 19.53)
    for visible in ("1", "GPU-2222"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert plan_json(capsys, job)["gpu_name"] == "NVIDIA H100 80GB HBM3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert plan_json(capsys, job)["gpu_name"] is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert plan_json(capsys, job, "--gpu", "t4")["gpu_name"] == "T4"  # --gpu wins


# ------------------------------------------------------------------ validate and train
def test_validate_prints_the_estimate_line(capsys, write, model, no_gpu):
    job = job_file(write, model(LLAMA_8B))
    code, out, err = cli(capsys, "validate", job, "--set", "training.max_seq_length=4096")
    assert code == 0 and err == ""
    per_gpu = plan_json(capsys, job, "--set", "training.max_seq_length=4096")["per_gpu_gib"]
    hint = f"tuneplex plan {job} --set training.max_seq_length=4096"
    assert out.splitlines()[-1] == f"# memory: ~{per_gpu:.1f} GiB per GPU (details: {hint})"
    code, out, _ = cli(capsys, "validate", job, "--json")
    assert json.loads(out)["memory"]["per_gpu_gib"] == plan_json(capsys, job)["per_gpu_gib"]


def test_validate_without_an_estimate_says_why_and_succeeds(capsys, write, monkeypatch, no_gpu):
    monkeypatch.delenv("HF_HUB_OFFLINE")  # validate never fetches: a Hub id is read from cache
    job = job_file(write, "org/not-cached")
    code, out, err = cli(capsys, "validate", job)
    assert code == 0 and err == ""
    last = out.splitlines()[-1]
    assert last.startswith("# memory: not estimated (model: org/not-cached: no such local")
    assert "HF_HUB_OFFLINE" not in os.environ
    code, out, _ = cli(capsys, "validate", job, "--json")
    assert json.loads(out)["memory"]["not_estimated"].startswith("model: org/not-cached")


def test_train_warns_when_the_estimate_exceeds_free_memory(
    capsys, write, model, tmp_path, monkeypatch
):
    """On a GPU (as nvidia-smi shows it) with less free memory than the estimate: one warning
    line before anything loads, then train goes on (here to refuse an output directory that
    is not a run, so nothing trains)."""
    job = job_file(write, model(LLAMA_8B))
    taken = tmp_path / "not-a-run"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    rows = "0, GPU-1111-aa, NVIDIA L4, 23034, 1024\n"
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "bin", rows))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    code, _, err = cli(capsys, "train", job, "--output", taken, "--set", "training.lora.rank=8")
    lines = err.splitlines()
    assert code == 2 and len(lines) == 2, err
    assert lines[0].startswith("warning: estimated peak ~")
    assert "GiB per GPU is more than the 1.0 GiB free on NVIDIA L4" in lines[0]
    assert lines[0].endswith(f"`tuneplex plan {job} --set training.lora.rank=8` shows what fits")
    assert "not a tuneplex run directory" in lines[1]
    # enough free memory, or no GPU at all: nothing said
    roomy = "0, GPU-1111-aa, NVIDIA H100 80GB HBM3, 81559, 81000\n"
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "bin2", roomy))
    code, _, err = cli(capsys, "train", job, "--output", taken)
    assert code == 2 and len(err.splitlines()) == 1 and "warning" not in err
    monkeypatch.setenv("PATH", str(tmp_path / "no-such-bin"))
    code, _, err = cli(capsys, "train", job, "--output", taken)
    assert code == 2 and len(err.splitlines()) == 1 and "warning" not in err


def test_plan_imports_no_heavy_library(tmp_path, write, model):
    job = job_file(write, model(LLAMA_8B))
    heavy = imported_heavy_modules(
        f"""
        import contextlib, io
        from tuneplex.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["plan", {str(job)!r}, "--gpu", "h100"]) == 0
            long = ["--set", "training.max_seq_length=65536"]
            assert main(["plan", {str(job)!r}, "--gpu", "l4", *long]) == 0
            assert main(["validate", {str(job)!r}]) == 0
        """
    )
    assert heavy == []
