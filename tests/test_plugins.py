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
