"""The `tuneplex` command line: every command, through CliRunner, main() and the console script."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from tuneplex.cli import app, main
from tuneplex.testing import imported_heavy_modules
from typer.testing import CliRunner

runner = CliRunner()

AUTOMODEL_JOB = """\
model: org/base
dataset:
  training: train.jsonl
batch:
  global_batch_size: 16
  micro_batch_size: 2
parallelism:
  num_gpus_per_node: 8
  tensor_parallel_size: 2
"""

FAKE_JOB = "model: m\ndataset:\n  path: d.jsonl\nschedule:\n  steps: 3\n"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def run_main(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------ backends
def test_backends_lists_name_version_description_status():
    result = invoke("backends")
    assert result.exit_code == 0
    assert "automodel  (tuneplex-automodel 0.1.0)" in result.output
    assert "unsloth  (tuneplex-unsloth 0.1.0)" in result.output
    assert (
        "ready: no CUDA GPU: trains on CPU" in result.output
        or "CUDA GPU(s) visible" in result.output
    )


def test_backends_json():
    rows = {r["name"]: r for r in json.loads(invoke("backends", "--json").output)["backends"]}
    assert rows["automodel"]["ready"] is True
    assert rows["unsloth"]["description"].startswith("Memory-constrained single-GPU")


def test_backends_shows_unsloth_needs_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    rows = {r["name"]: r for r in json.loads(invoke("backends", "--json").output)["backends"]}
    assert rows["unsloth"]["ready"] is False
    assert rows["unsloth"]["environment"].startswith("needs a CUDA GPU")
    assert "--backend automodel" in rows["unsloth"]["environment"]


# ------------------------------------------------------------------ schema
@pytest.mark.parametrize(
    "backend,title", [("automodel", "AutomodelJobInput"), ("unsloth", "UnslothJobInput")]
)
def test_schema_json(backend, title):
    result = invoke("schema", backend)
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["title"] == title
    assert schema["additionalProperties"] is False
    assert all(
        d["additionalProperties"] is False
        for d in schema["$defs"].values()
        if d.get("type") == "object"
    )


def test_schema_yaml_template_has_every_default():
    result = invoke("schema", "automodel", "--format", "yaml")
    assert result.exit_code == 0
    data = yaml.safe_load(result.output)
    assert data["optimizer"]["learning_rate"] == 5e-6
    assert data["training"]["lora"] == {
        "rank": 16,
        "alpha": 32,
        "merge": False,
        "target_modules": None,
        "dropout": 0.0,
        "use_dora": False,
    }
    assert data["parallelism"]["expert_parallel_size"] is None
    assert "# REQUIRED. Base model to fine-tune" in result.output
    assert "#   project: null" in result.output  # integrations shown, commented out


def test_schema_unknown_backend(capsys):
    code, out, err = run_main(capsys, "schema", "nemo")
    assert code == 2 and out == ""
    assert err == "schema BACKEND: unknown backend 'nemo'; installed: automodel, unsloth\n"


def test_schema_bad_format_is_one_line(capsys):
    code, _, err = run_main(capsys, "schema", "automodel", "--format", "toml")
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith(
        "tuneplex schema: Invalid value for '--format' / '-f': 'toml' is not one of"
    )


# ------------------------------------------------------------------ validate
def test_validate_prints_resolved_job_and_derived(write):
    path = write("job.yaml", AUTOMODEL_JOB)
    result = invoke("validate", path)
    assert result.exit_code == 0, result.output
    body = yaml.safe_load(result.output)
    assert body["training"]["lora"]["rank"] == 16  # defaults resolved
    assert body["derived"]["total_gpus"] == 8
    assert body["derived"]["data_parallel_size"] == 4
    assert body["derived"]["gradient_accumulation_steps"] == 2


def test_validate_json_with_overrides(write):
    path = write("job.yaml", AUTOMODEL_JOB)
    result = invoke(
        "validate",
        path,
        "--json",
        "--set",
        "batch.global_batch_size=64",
        "--set",
        "training.lora.rank=4",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["job"]["training"]["lora"]["rank"] == 4
    assert out["derived"]["gradient_accumulation_steps"] == 8


def test_validate_unsloth(write):
    path = write("u.yaml", "model:\n  name: org/base\ndataset:\n  path: d.jsonl\n")
    result = invoke("validate", path, "--backend", "unsloth", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["derived"]["total_gpus"] == 1


def test_validate_reports_every_problem_one_line_each(capsys, write):
    path = write(
        "job.yaml", AUTOMODEL_JOB + "training:\n  lora:\n    rnak: 8\nschedule:\n  epochs: 0\n"
    )
    code, out, err = run_main(capsys, "validate", path, "--set", "batch.micro_batch_size=3")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "training.lora.rnak: unknown key; did you mean 'rank'? (allowed: rank, alpha, merge, "
        "target_modules, dropout, use_dora)",
        "schedule.epochs: must be >= 1 (got 0)",
    ]


def test_validate_cross_field_rule(capsys, write):
    path = write("job.yaml", AUTOMODEL_JOB)
    code, _, err = run_main(capsys, "validate", path, "--set", "parallelism.tensor_parallel_size=3")
    assert code == 2
    assert err == (
        "parallelism.tensor_parallel_size: total GPUs (num_nodes × num_gpus_per_node = 1 × 8 = "
        "8) must be divisible by tensor × pipeline × context parallel size (3 × 1 × 1 = 3)\n"
    )


def test_backend_fields_do_not_cross(capsys, write):
    path = write("job.yaml", AUTOMODEL_JOB)
    code, _, err = run_main(capsys, "validate", path, "--backend", "unsloth")
    assert code == 2
    assert "batch.global_batch_size: unknown key" in err
    assert "parallelism: unknown key" in err


@pytest.mark.parametrize(
    "args,first_line",
    [
        (["validate", "missing.yaml"], "missing.yaml: no such file"),
        (["validate", "JOB", "--bogus"], "tuneplex validate: No such option: --bogus"),
        (["validate"], "tuneplex validate: missing argument 'job'."),
        (["frobnicate"], "tuneplex: No such command 'frobnicate'."),
        (
            ["validate", "JOB", "--backend", "unslot"],
            "--backend: unknown backend 'unslot'; did you mean 'unsloth'?",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, write, args, first_line):
    path = write("job.yaml", AUTOMODEL_JOB)
    code, _, err = run_main(capsys, *[str(path) if a == "JOB" else a for a in args])
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.lower().startswith(first_line.lower())


def test_help_and_version(capsys):
    assert run_main(capsys, "--help")[0] == 0
    code, out, _ = run_main(capsys, "--version")
    assert code == 0 and out == "tuneplex 0.1.0\n"


# ------------------------------------------------------------------ train
def test_train_hands_job_to_backend_and_writes_run_dir(fake_registry, tmp_path, write):
    path = write("fake.yaml", FAKE_JOB)
    out = tmp_path / "run"
    result = invoke(
        "train", path, "--backend", "fake", "--output", out, "--set", "schedule.steps=4"
    )
    assert result.exit_code == 0, result.output
    job = json.loads((out / "job.json").read_text())
    assert job["schedule"]["steps"] == 4 and job["model"] == "m"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_train_resume_with_a_changed_job_is_refused(fake_registry, tmp_path, write, capsys):
    path = write("fake.yaml", FAKE_JOB)
    out = tmp_path / "run"
    assert main(["train", str(path), "-b", "fake", "-o", str(out)]) == 0
    capsys.readouterr()
    code, _, err = run_main(
        capsys, "train", path, "-b", "fake", "-o", out, "--resume", "--set", "model=other"
    )
    assert code == 2
    assert err.splitlines() == [
        "model: was 'm' in the run being resumed, now 'other'",
        "--resume: the job differs from the run it resumes; start a new run",
    ]


def test_train_output_from_job_file(fake_registry, tmp_path, write, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write("fake.yaml", FAKE_JOB + "output:\n  dir: from-job\n")
    assert main(["train", str(path), "-b", "fake"]) == 0
    assert (tmp_path / "from-job" / "summary.json").is_file()


def test_train_default_output_dir(fake_registry, tmp_path, write, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write("fake.yaml", FAKE_JOB)
    assert main(["train", str(path), "-b", "fake"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("fake-") and (run / "job.json").is_file()


def test_train_refuses_when_environment_not_ready(fake_registry, tmp_path, write, capsys):
    fake_registry.backends["fake"].backend.ready = False
    try:
        path = write("fake.yaml", FAKE_JOB)
        code, _, err = run_main(capsys, "train", path, "-b", "fake", "-o", tmp_path / "r")
    finally:
        fake_registry.backends["fake"].backend.ready = True
    assert code == 2 and err == "fake: switched off for a test\n"
    assert not (tmp_path / "r").exists()


def test_train_unsloth_without_gpu_stops_before_loading(tmp_path, write, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    path = write("u.yaml", "model:\n  name: org/base\ndataset:\n  path: d.jsonl\n")
    code, _, err = run_main(capsys, "train", path, "-b", "unsloth", "-o", tmp_path / "r")
    assert code == 2
    assert err == (
        "unsloth: needs a CUDA GPU (unsloth's kernels run on CUDA only; none visible here); "
        "use --backend automodel to train on CPU\n"
    )
    assert not (tmp_path / "r").exists()


def test_train_resume_and_overwrite_together(fake_registry, tmp_path, write, capsys):
    path = write("fake.yaml", FAKE_JOB)
    code, _, err = run_main(
        capsys, "train", path, "-b", "fake", "-o", tmp_path / "r", "--resume", "--overwrite"
    )
    assert code == 2 and err.startswith("--resume, --overwrite: choose one")


# ------------------------------------------------------------------ launch options
LAUNCH_FLAGS = ("--node-rank", "0", "--master-addr", "head", "--master-port", "29501")


def test_train_hands_launch_options_to_the_backend_not_the_environment(
    fake_registry, tmp_path, write
):
    from tuneplex.backend import LaunchOptions

    fake = fake_registry.backends["fake"].backend
    fake.launches.clear()
    before = dict(os.environ)
    path = write("fake.yaml", FAKE_JOB)
    args = (*LAUNCH_FLAGS, "--rdzv-endpoint", "head:29400")
    result = invoke("train", path, "-b", "fake", "-o", tmp_path / "run", *args)
    assert result.exit_code == 0, result.output
    assert fake.launches == [
        LaunchOptions(
            node_rank=0, master_addr="head", master_port=29501, rdzv_endpoint="head:29400"
        )
    ]
    assert dict(os.environ) == before
    assert not [k for k in os.environ if k.startswith("TUNEPLEX_") and k != "TUNEPLEX_CACHE"]
    assert (tmp_path / "run" / "summary.json").is_file()


def test_train_without_launch_flags_hands_empty_options(fake_registry, tmp_path, write):
    from tuneplex.backend import NO_LAUNCH_OPTIONS

    fake = fake_registry.backends["fake"].backend
    fake.launches.clear()
    path = write("fake.yaml", FAKE_JOB)
    assert main(["train", str(path), "-b", "fake", "-o", str(tmp_path / "r")]) == 0
    assert fake.launches == [NO_LAUNCH_OPTIONS] and not NO_LAUNCH_OPTIONS.given()


def test_another_node_trains_without_opening_the_run(fake_registry, tmp_path, write):
    """--node-rank 1: node 0 writes the run (on a shared filesystem); this node only trains."""
    from tuneplex.backend import LaunchOptions

    fake = fake_registry.backends["fake"].backend
    fake.launches.clear()
    out = tmp_path / "shared-run"
    out.mkdir()  # made by node 0
    path = write("fake.yaml", FAKE_JOB)
    assert main(["train", str(path), "-b", "fake", "-o", str(out), "--node-rank", "1"]) == 0
    assert fake.launches == [LaunchOptions(node_rank=1)]
    assert not (out / "job.json").exists()  # this node did not open the run


@pytest.mark.parametrize(
    ("node_rank", "slurm_node", "rank", "writes"),
    [
        (None, None, None, True),
        (0, "1", None, True),  # the flag wins over Slurm's node id
        (1, "0", None, False),
        (None, "1", None, False),
        (0, None, "1", False),  # a worker of the user's torchrun
    ],
)
def test_which_process_writes_the_run(monkeypatch, node_rank, slurm_node, rank, writes):
    from tuneplex.backend import LaunchOptions
    from tuneplex.cli.train import _writes_the_run_dir

    for name, value in (("SLURM_NODEID", slurm_node), ("RANK", rank)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("TUNEPLEX_NODE_RANK", "1")  # no longer means anything
    assert _writes_the_run_dir(LaunchOptions(node_rank=node_rank)) is writes


UNSLOTH_JOB = "model:\n  name: org/base\ndataset:\n  path: d.jsonl\n"
UNSLOTH_REFUSAL = (
    "the unsloth backend trains on one GPU in one process; launch options (--node-rank, "
    "--master-addr, --master-port, --rdzv-endpoint) apply to automodel only"
)


@pytest.mark.parametrize(
    ("flags", "where"),
    [
        (("--node-rank", "0"), "--node-rank"),  # node 0: opens a new run, then discards it
        (("--node-rank", "1"), "--node-rank"),  # another node: trains without opening the run
        (("--master-addr", "h", "--master-port", "29500"), "--master-addr, --master-port"),
        (("--rdzv-endpoint", "h:29400"), "--rdzv-endpoint"),
    ],
)
def test_unsloth_refuses_launch_options(monkeypatch, tmp_path, write, capsys, flags, where):
    from tuneplex.backend import EnvironmentStatus
    from tuneplex.plugins import registry

    backend = registry().get("unsloth").backend
    monkeypatch.setattr(
        type(backend), "check_environment", lambda self: EnvironmentStatus(True, "t")
    )
    path = write("u.yaml", UNSLOTH_JOB)
    code, _, err = run_main(capsys, "train", path, "-b", "unsloth", "-o", tmp_path / "r", *flags)
    assert code == 2
    assert err.splitlines() == [f"{where}: {UNSLOTH_REFUSAL}"]
    assert not (tmp_path / "r").exists()


def test_unsloth_refusing_launch_options_keeps_the_run_it_would_overwrite(
    fake_registry, monkeypatch, tmp_path, write, capsys
):
    from tuneplex.backend import EnvironmentStatus

    backend = fake_registry.get("unsloth").backend
    monkeypatch.setattr(
        type(backend), "check_environment", lambda self: EnvironmentStatus(True, "t")
    )
    run = tmp_path / "r"
    fake = write("f.yaml", FAKE_JOB)
    assert run_main(capsys, "train", fake, "-b", "fake", "-o", run)[0] == 0
    before = sorted(p.name for p in run.iterdir())
    path = write("u.yaml", UNSLOTH_JOB)
    args = ("train", path, "-b", "unsloth", "-o", run, "--overwrite", "--node-rank", "0")
    code, _, err = run_main(capsys, *args)
    assert code == 2
    assert err.splitlines() == [f"--node-rank: {UNSLOTH_REFUSAL}"]
    assert sorted(p.name for p in run.iterdir()) == before  # nothing cleared


def test_unsloth_refuses_launch_options_before_anything_loads(tmp_path, write):
    path = write("u.yaml", UNSLOTH_JOB)
    heavy = imported_heavy_modules(
        f"""
        import contextlib, io
        from tuneplex.backend import EnvironmentStatus
        from tuneplex.cli import main
        from tuneplex.plugins import registry
        backend = registry().get("unsloth").backend
        type(backend).check_environment = lambda self: EnvironmentStatus(True, "test")
        out = {str(tmp_path / "r")!r}
        with contextlib.redirect_stderr(io.StringIO()) as err:
            code = main(["train", {str(path)!r}, "-b", "unsloth", "-o", out, "--node-rank", "0"])
        assert code == 2 and err.getvalue().startswith("--node-rank: the unsloth"), err.getvalue()
        """
    )
    assert heavy == []
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ fast path
def test_fast_commands_import_no_heavy_library(tmp_path, write):
    path = write("job.yaml", AUTOMODEL_JOB)
    upath = write("u.yaml", "model:\n  name: org/base\ndataset:\n  path: d.jsonl\n")
    heavy = imported_heavy_modules(
        f"""
        import contextlib, io
        import tuneplex
        from tuneplex.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["backends"]) == 0
            assert main(["schema", "automodel"]) == 0
            assert main(["schema", "unsloth", "--format", "yaml"]) == 0
            assert main(["validate", {str(path)!r}]) == 0
            assert main(["validate", {str(upath)!r}, "--backend", "unsloth"]) == 0
        """
    )
    assert heavy == []


# ------------------------------------------------------------------ export
def test_export_help_says_formats_dtypes_defaults_and_overwrite():
    """The command's behaviour is tested in tests/test_export_hf.py; its help is checked here."""
    assert "export" in invoke("--help").output
    result = invoke("export", "--help")
    assert result.exit_code == 0
    text = "".join(result.output.split())  # click wraps lines at spaces and hyphens
    for said in (
        "--format",
        "hf: bf16, f16 or f32",
        "gguf: f32, f16, bf16, q8_0 or q4_0",
        "NAME-hf/",
        "NAME-DTYPE.gguf",
        "NAME-DTYPE.Modelfile",
        "--checkpoint",
        "Replace an earlier export at the output (never anything else)",
    ):
        assert "".join(said.split()) in text, said


def test_export_refuses_flags_before_importing_torch(capsys):
    heavy = imported_heavy_modules(
        """
        import contextlib, io
        from tuneplex.cli import main
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            assert main(["export", "--help"]) == 0
            assert main(["export", "run", "--format", "hf", "--ollama"]) == 2
        assert err.getvalue().strip() == "--ollama: an Ollama Modelfile goes with --format gguf"
        """
    )
    assert heavy == []


# ------------------------------------------------------------------ installed console script
def test_console_script(tmp_path, write):
    exe = shutil.which("tuneplex", path=str(Path(sys.executable).parent)) or shutil.which(
        "tuneplex"
    )
    assert exe, "the tuneplex console script is not installed"
    path = write("job.yaml", AUTOMODEL_JOB)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    ok = subprocess.run(
        [exe, "validate", str(path), "--json"], capture_output=True, text=True, env=env, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["derived"]["data_parallel_size"] == 4
    bad = subprocess.run(
        [exe, "validate", str(path), "--set", "training.lora.rank=0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr == "training.lora.rank: must be >= 1 (got 0)\n"
    schema = subprocess.run([exe, "schema", "unsloth"], capture_output=True, text=True, timeout=60)
    jsonschema.Draft202012Validator.check_schema(json.loads(schema.stdout))


@pytest.mark.parametrize("backend", ["automodel", "unsloth"])
def test_docs_match_live_schema(backend):
    """docs/<backend>-job.md is the committed output of `schema --format markdown`."""
    result = invoke("schema", backend, "--format", "markdown")
    assert result.exit_code == 0
    doc = Path(__file__).parents[1] / "docs" / f"{backend}-job.md"
    assert doc.read_text() == result.output, (
        f"regenerate: tuneplex schema {backend} --format markdown > {doc}"
    )
