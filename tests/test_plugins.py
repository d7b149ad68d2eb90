"""Plugin discovery through real entry points (a dist-info directory on sys.path)."""

import json
import subprocess
import sys
import textwrap

import pytest
from tuneplex.errors import UsageError
from tuneplex.plugins import load_registry, registry, unknown_backend_message
from tuneplex.testing import fake_entry_point


def make_dist(root, dist, *, entry_points: dict[str, str], modules: dict[str, str]):
    """Install a minimal distribution by hand: a dist-info with entry points, plus modules."""
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    eps = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[tuneplex]\n{eps}")
    for name, code in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(code))


PLUGIN = """
    from tuneplex import hookimpl
    from tuneplex.testing import FakeBackend

    class {cls}(FakeBackend):
        name = "{name}"
        description = "{name} backend"

    @hookimpl
    def register_backends(register):
        register({cls}())
"""


def run_cli(site, *args):
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from tuneplex.cli import main; "
        "sys.exit(main(sys.argv[2:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(site), *args], capture_output=True, text=True, timeout=120
    )


def test_third_party_plugin_discovered(tmp_path):
    make_dist(
        tmp_path,
        "tuneplex-hello",
        entry_points={"hello": "hello_plugin"},
        modules={"hello_plugin": PLUGIN.format(cls="Hello", name="hello")},
    )
    out = run_cli(tmp_path, "backends", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)["backends"]}
    assert rows["hello"]["distribution"] == "tuneplex-hello"
    assert rows["hello"]["version"] == "1.2.3"
    assert {"automodel", "unsloth"} <= set(rows)


def test_broken_plugin_warns_in_one_line_and_others_work(tmp_path):
    make_dist(
        tmp_path,
        "tuneplex-broken",
        entry_points={"broken": "broken_plugin"},
        modules={"broken_plugin": "import no_such_module_xyz\n"},
    )
    out = run_cli(tmp_path, "backends")
    assert out.returncode == 0
    assert out.stderr.strip() == (
        "tuneplex: warning: plugin 'broken' (tuneplex-broken) failed to load: "
        "ModuleNotFoundError: No module named 'no_such_module_xyz'"
    )
    assert "automodel  (tuneplex-automodel" in out.stdout


def test_two_plugins_same_backend_name_is_an_error(tmp_path):
    make_dist(
        tmp_path,
        "tuneplex-one",
        entry_points={"one": "one_plugin"},
        modules={"one_plugin": PLUGIN.format(cls="One", name="twin")},
    )
    make_dist(
        tmp_path,
        "tuneplex-two",
        entry_points={"two": "two_plugin"},
        modules={"two_plugin": PLUGIN.format(cls="Two", name="twin")},
    )
    out = run_cli(tmp_path, "backends")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "backend 'twin' is registered by two plugins: 'one' (tuneplex-one) and 'two' "
        "(tuneplex-two); uninstall one of them"
    )


def test_plugin_registering_a_non_backend_is_skipped():
    warnings = []
    from importlib import metadata

    ep = metadata.EntryPoint(name="odd", value="json", group="tuneplex")  # no hook at all
    reg = load_registry([ep, fake_entry_point()], warn=warnings.append)
    assert set(reg.backends) == {"fake"} and warnings == []


def test_registry_loads_once_per_process():
    assert registry() is registry()


def test_unknown_backend_names_installed_ones_and_extra():
    reg = load_registry([fake_entry_point()])
    with pytest.raises(UsageError) as info:
        reg.get("unsloth")
    assert info.value.lines() == [
        "--backend: unknown backend 'unsloth'; installed: fake; install it with: "
        "pip install 'tuneplex[unsloth]'"
    ]
    assert unknown_backend_message("fak", ["fake"]) == (
        "--backend: unknown backend 'fak'; did you mean 'fake'?; installed: fake"
    )


def test_core_never_imports_a_plugin_by_name():
    from pathlib import Path

    import tuneplex

    core = Path(tuneplex.__file__).parent
    for path in core.rglob("*.py"):
        text = path.read_text()
        assert "tuneplex_automodel" not in text and "tuneplex_unsloth" not in text, path


# ------------------------------------------------------------------ which backend runs a job
def installed(*names):
    """A registry of the named real backends, loaded through their own entry points."""
    from importlib import metadata

    from tuneplex.plugins import ENTRY_POINT_GROUP

    eps = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return load_registry([eps[n] for n in names], warn=pytest.fail)


def registry_of(*backends):
    """A registry holding exactly these backend objects."""
    from tuneplex.plugins import InstalledBackend, Registry

    return Registry(
        backends={b.name: InstalledBackend(b, b.name, f"tuneplex-{b.name}", "0") for b in backends},
        failures=[],
    )


def example(name: str) -> dict:
    from pathlib import Path

    from tuneplex.schema.loading import load_job_file

    return load_job_file(Path(__file__).parents[1] / "examples" / name)


FAKE_JOB = {"model": "m", "dataset": {"path": "d.jsonl"}}


@pytest.fixture
def only(monkeypatch):
    """only("unsloth"): the CLI sees just these real backends installed."""
    from tuneplex import plugins

    def _only(*names):
        reg = installed(*names)
        monkeypatch.setattr(plugins, "registry", lambda: reg)
        return reg

    return _only


def test_the_only_backend_installed_is_the_default(only, capsys):
    from tuneplex.cli import main

    assert only("unsloth").choose(None, example("unsloth-qlora.yaml")).backend.name == "unsloth"
    assert main(["validate", "examples/unsloth-qlora.yaml"]) == 0
    assert capsys.readouterr().out.startswith("# examples/unsloth-qlora.yaml: valid unsloth job")


def test_a_job_foreign_to_the_only_backend_names_the_one_to_install(only, capsys):
    """An automodel job where only unsloth is installed: one line, not unsloth's nine."""
    from tuneplex.cli import main

    only("unsloth")
    assert main(["validate", "examples/automodel-lora.yaml"]) == 2
    assert capsys.readouterr().err == (
        "job: fits no installed backend; most of its keys are not unsloth's (--backend unsloth "
        "lists them): a job for automodel? installed: unsloth; install it with: "
        "pip install 'tuneplex[automodel]'\n"
    )
    only("automodel")
    assert main(["validate", "examples/unsloth-dpo.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith(
        "install it with: pip install 'tuneplex[unsloth]'\n"
    )


def test_a_typo_in_a_job_for_the_only_backend_is_reported_as_such(only, capsys, write):
    """A few wrong keys are the installed backend's problems, each on its line."""
    from tuneplex.cli import main

    only("unsloth")
    job = write("u.yaml", "model: {name: m}\ndataset: {pth: d.jsonl}\n")
    assert main(["validate", str(job)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "dataset.path: required key is missing",
        "dataset.pth: unknown key; did you mean 'path'? (allowed: path, text_field, "
        "apply_chat_template, validation_path, packing, format, column_mapping, "
        "skip_invalid_rows)",
    ]


def test_with_both_installed_the_job_picks_the_schema_it_fits():
    reg = installed("automodel", "unsloth")
    for name, backend in [
        ("automodel-lora.yaml", "automodel"),
        ("automodel-dpo.yaml", "automodel"),
        ("unsloth-qlora.yaml", "unsloth"),
        ("unsloth-dpo.yaml", "unsloth"),
    ]:
        assert reg.choose(None, example(name)).backend.name == backend, name
    # fitting neither, a job is the default's to report on, not refused as foreign
    assert reg.choose(None, {"model": "m"}).backend.name == "automodel"


def test_backend_flag_overrides_the_choice(only, capsys):
    from tuneplex.cli import main

    reg = installed("automodel", "unsloth")
    assert reg.choose("unsloth", example("automodel-lora.yaml")).backend.name == "unsloth"
    only("unsloth")
    assert main(["validate", "examples/automodel-lora.yaml", "--backend", "unsloth"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 9 and "dataset.training: unknown key" in lines[2]
    with pytest.raises(UsageError, match="unknown backend 'automodel'; installed: unsloth"):
        installed("unsloth").choose("automodel", example("automodel-lora.yaml"))


def test_a_job_fitting_several_goes_to_the_default_else_the_first_by_name():
    from tuneplex.testing import FakeBackend

    class Named(FakeBackend):
        def __init__(self, name):
            super().__init__()
            self.name = name

    reg = registry_of(Named("zeta"), Named("automodel"))
    assert reg.choose(None, FAKE_JOB).backend.name == "automodel"
    reg = registry_of(Named("zeta"), Named("beta"))
    assert reg.choose(None, FAKE_JOB).backend.name == "beta"
    assert reg.choose("zeta", FAKE_JOB).backend.name == "zeta"


def test_no_backend_installed_is_one_line(monkeypatch, capsys):
    from tuneplex import plugins
    from tuneplex.cli import main

    monkeypatch.setattr(plugins, "registry", lambda: registry_of())
    assert main(["validate", "examples/automodel-lora.yaml"]) == 2
    assert capsys.readouterr().err == (
        "no backends installed; pip install 'tuneplex[automodel]' or 'tuneplex[unsloth]'\n"
    )


def test_refused_keys_tell_a_foreign_job_from_a_wrong_one():
    from tuneplex.plugins import FOREIGN_MIN, FOREIGN_SHARE, refused_keys
    from tuneplex_automodel.schema import AutomodelJobInput
    from tuneplex_unsloth.schema import UnslothJobInput

    def foreign(schema, job):
        refused, total = refused_keys(schema, job)
        return refused >= FOREIGN_MIN and refused >= FOREIGN_SHARE * total

    assert refused_keys(UnslothJobInput, example("unsloth-qlora.yaml")) is None
    for name in ("automodel-lora.yaml", "automodel-dpo.yaml", "automodel-multinode.yaml"):
        assert foreign(UnslothJobInput, example(name)), name
    for name in ("unsloth-qlora.yaml", "unsloth-dpo.yaml"):
        assert foreign(AutomodelJobInput, example(name)), name
    # automodel-lora: 8 of its 14 keys are not unsloth's, and it lacks unsloth's dataset.path
    assert refused_keys(UnslothJobInput, example("automodel-lora.yaml")) == (9, 15)
    wrong_value = example("unsloth-qlora.yaml")
    wrong_value["optimizer"]["learning_rate"] = -1
    assert refused_keys(UnslothJobInput, wrong_value) == (0, 17)
    one_typo = example("unsloth-qlora.yaml")
    one_typo["training"] = {"lora": {"rnak": 16, "alpha": 16}}
    assert refused_keys(UnslothJobInput, one_typo) == (1, 17)
    assert refused_keys(UnslothJobInput, {"model": {"name": "m"}, "dataset": {"pth": "d"}}) == (
        2,
        3,
    )
