"""A package that is not installed: one line naming the extra that installs it, exit 2, never a
traceback — through the real command line, in processes where the package cannot be imported.
And the install metadata itself: every package the code imports is declared by a distribution."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import chat_rows, write_rows
from tuneplex.cli import main
from tuneplex.errors import (
    EXIT_USAGE,
    OPTIONAL_PACKAGES,
    EnvironmentNotReady,
    InternalError,
    missing_package,
    needs_package,
)

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).parents[1]
CORE_DEPENDENCIES = {"pluggy", "pydantic", "yaml", "typer", "rich"}
# import name -> the distribution that brings it, where the two differ
DISTRIBUTION = {"mlflow": "mlflow-skinny", "yaml": "pyyaml", "unsloth_zoo": "unsloth"}
HIDE = """\
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # as if not installed: import fails, find_spec says None
from tuneplex.cli import main
sys.exit(main(sys.argv[2:]))
"""


def without(packages: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """`tuneplex ARGS` in a process where the comma-separated `packages` are not installed."""
    return subprocess.run(
        [sys.executable, "-c", HIDE, packages, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.fixture(scope="module")
def tiny_job(tiny_model, tmp_path_factory):
    """A two-step automodel job on the tiny model, and a finished run of it."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("missing")
    write_rows(root / "train.jsonl", chat_rows(8))
    job = root / "job.yaml"
    job.write_text(
        f"model: {tiny_model}\ndataset: {{training: {root / 'train.jsonl'}}}\n"
        "training: {max_seq_length: 96, precision: fp32}\nschedule: {max_steps: 2}\n"
        "batch: {global_batch_size: 4, micro_batch_size: 4}\n"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEPLEX_CACHE", str(root / "cache"))
        assert main(["train", str(job), "-o", str(root / "run")]) == 0
    return job, root / "run"


# ------------------------------------------------------------------ through the command line
@pytest.mark.slow  # a subprocess per case that loads the data stack (~5 s each)
@pytest.mark.parametrize(
    ("hidden", "command", "line"),
    [
        (
            "datasets",
            ["data", "inspect", "{job}"],
            "reading data needs the package 'datasets': pip install 'tuneplex[data]'",
        ),
        (
            "transformers",
            ["data", "inspect", "{job}"],
            "tokenizing needs the package 'transformers': pip install 'tuneplex[data]'",
        ),
        (
            "datasets",
            ["train", "{job}", "--output", "{out}"],
            "reading data needs the package 'datasets': pip install 'tuneplex[data]'",
        ),
        (
            "pyarrow",
            ["train", "{job}", "--output", "{out}"],
            "reading data needs the package 'pyarrow': pip install 'tuneplex[data]'",
        ),
    ],
)
def test_missing_data_package_is_one_line_naming_the_extra(
    tiny_job, tmp_path, hidden, command, line
):
    job, _ = tiny_job
    out = tmp_path / "run"
    proc = without(hidden, *(a.format(job=job, out=out) for a in command))
    assert (proc.returncode, proc.stderr) == (EXIT_USAGE, line + "\n")
    assert not out.exists()  # refused before training: no run left behind


def test_missing_torch_is_refused_before_a_run_is_opened(tiny_job, tmp_path):
    job, _ = tiny_job
    proc = without("torch", "train", job, "--output", tmp_path / "run")
    assert (proc.returncode, proc.stderr) == (
        EXIT_USAGE,
        "automodel: missing packages: torch (pip install 'tuneplex[automodel]')\n",
    )
    assert not (tmp_path / "run").exists()


def test_plot_without_matplotlib(tiny_job, tmp_path):
    _, run = tiny_job
    proc = without("matplotlib", "runs", "plot", run, "-o", tmp_path / "c.png")
    assert (proc.returncode, proc.stderr) == (
        EXIT_USAGE,
        "drawing curves needs the package 'matplotlib': pip install 'tuneplex[plots]'\n",
    )
    assert not (tmp_path / "c.png").exists()


def test_a_tracker_without_its_package_is_refused_by_validate(tiny_job):
    job, _ = tiny_job
    proc = without("wandb", "validate", job, "--set", "integrations.wandb.project=p")
    assert (proc.returncode, proc.stderr) == (
        EXIT_USAGE,
        'integrations.wandb: the wandb package is not installed (pip install "tuneplex[wandb]")\n',
    )


# ------------------------------------------------------------------ the wrappers
def test_every_optional_package_has_one_line_naming_a_declared_extra():
    extras = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    for package, (_, names) in OPTIONAL_PACKAGES.items():
        assert set(names) <= extras, package
        (line,) = needs_package(package).lines()
        assert f"needs the package '{package}': pip install 'tuneplex[{names[0]}]'" in line


def test_missing_package_found_in_the_chain_of_a_library_error():
    def raised(exc_type, name):
        try:
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        except ModuleNotFoundError as exc:
            try:
                raise exc_type("a library's own words") from exc
            except exc_type as outer:
                return outer

    assert missing_package(ModuleNotFoundError(name="tensorboard")).lines() == [
        "the TensorBoard tracker needs the package 'tensorboard': "
        "pip install 'tuneplex[tensorboard]'"
    ]
    assert "'trl'" in str(missing_package(raised(RuntimeError, "trl")))
    assert "or 'tuneplex[unsloth]'" in str(missing_package(raised(ImportError, "torch")))
    # not a missing extra: a module of tuneplex, of an installed package, or no import at all
    assert missing_package(ModuleNotFoundError(name="tuneplex.nope")) is None
    assert missing_package(ModuleNotFoundError(name="transformers.models.nope")) is None
    assert missing_package(ModuleNotFoundError(name="sentencepiece")) is None
    assert missing_package(ValueError("datasets")) is None


def test_defects_as_one_line_tells_a_missing_extra_from_a_defect():
    from tuneplex import console

    with pytest.raises(EnvironmentNotReady) as info, console.defects_as_one_line():
        raise ModuleNotFoundError("No module named 'peft'", name="peft")
    assert info.value.exit_code == EXIT_USAGE
    assert info.value.lines() == [
        "training needs the package 'peft': pip install 'tuneplex[automodel]' or "
        "'tuneplex[unsloth]'"
    ]
    with pytest.raises(InternalError), console.defects_as_one_line():
        raise ModuleNotFoundError("No module named 'tuneplex.nope'", name="tuneplex.nope")


def test_main_reports_a_missing_package_raised_outside_a_command(monkeypatch, capsys):
    import typer

    class Broken:
        def main(self, **kwargs):
            raise ModuleNotFoundError("No module named 'mlflow'", name="mlflow")

    monkeypatch.setattr(typer.main, "get_command", lambda app: Broken())
    assert main(["backends"]) == EXIT_USAGE
    assert capsys.readouterr().err == (
        "the MLflow tracker needs the package 'mlflow': pip install 'tuneplex[mlflow]'\n"
    )


# ------------------------------------------------------------------ the install metadata
def project(path: Path) -> dict:
    return tomllib.loads(path.read_text())["project"]


def requirement_name(requirement: str) -> str:
    name = requirement.split("@")[0].split(";")[0]
    for stop in "[<>=!~ ":
        name = name.split(stop)[0]
    return name.strip().lower().replace("_", "-")


def imported_packages(root: Path) -> set[str]:
    """Top-level names of the third-party modules imported by the code under `root`."""
    names = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    own = {"tuneplex", "tuneplex_automodel", "tuneplex_unsloth", "__future__"}
    return {n for n in names - own if n not in sys.stdlib_module_names}


def test_every_imported_package_is_declared_where_its_importer_is_installed():
    """The core imports only its own dependencies, plus optional packages its extras name;
    each plugin declares what it imports (itself, or through tuneplex[data]), and brings the
    export extra (`tuneplex export --format gguf` works on every backend install)."""
    core = project(ROOT / "pyproject.toml")
    core_deps = {requirement_name(r) for r in core["dependencies"]}
    assert {DISTRIBUTION.get(m, m) for m in CORE_DEPENDENCIES} == core_deps
    assert "torch" not in core_deps  # `pip install .` stays light
    assert imported_packages(ROOT / "core" / "tuneplex") <= CORE_DEPENDENCIES | set(
        OPTIONAL_PACKAGES
    )
    extras = core["optional-dependencies"]
    data = {requirement_name(r) for r in extras["data"] + extras["export"]}
    for plugin in ("automodel", "unsloth"):
        meta = project(ROOT / "plugins" / plugin / "pyproject.toml")
        assert "tuneplex[data,export] @ {root:parent:parent:uri}" in meta["dependencies"]
        declared = {requirement_name(r) for r in meta["dependencies"]} | data | core_deps
        needed = imported_packages(ROOT / "plugins" / plugin)
        assert {DISTRIBUTION.get(m, m) for m in needed} <= declared, plugin
