"""The shape of the code: no import circles in the core or the plugins, the core knows no
backend, and the torch-only package (`tuneplex.nn`) is reached only by backends and tests.

Every import counts, those inside functions too (a lazy import still ties two modules);
only imports under `if TYPE_CHECKING:` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "tuneplex": ROOT / "core" / "tuneplex",
    "tuneplex_automodel": ROOT / "plugins" / "automodel" / "tuneplex_automodel",
    "tuneplex_unsloth": ROOT / "plugins" / "unsloth" / "tuneplex_unsloth",
}


def _modules() -> dict[str, Path]:
    found = {}
    for top, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([top, *parts])] = path
    return found


def _runtime_imports(tree: ast.AST):
    """Import nodes that run: everything except the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                assert node.level == 0, f"{path}: relative import"
                base = node.module or ""
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_lazy_imports():
    """The checker itself: a function-level import is an edge, a TYPE_CHECKING one is not."""
    graph = import_graph()
    assert "tuneplex.cli.jobs" in graph["tuneplex.cli.app"]
    assert "tuneplex.plugins" in graph["tuneplex.cli.common"]  # imported inside a function
    assert "tuneplex.schema.base" not in graph["tuneplex.backend"]  # TYPE_CHECKING only
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert _cycles(import_graph()) == []


def test_the_core_knows_no_backend():
    graph = import_graph()
    core = [m for m in graph if m == "tuneplex" or m.startswith("tuneplex.")]
    offending = {
        m: sorted(t for t in graph[m] if not (t == "tuneplex" or t.startswith("tuneplex.")))
        for m in core
    }
    assert {m: t for m, t in offending.items() if t} == {}


def test_the_torch_package_is_for_backends_only():
    """Within the core only `nn` itself, inference (which runs models as training did) and test
    support import `tuneplex.nn`."""
    graph = import_graph()
    users = {
        m
        for m, targets in graph.items()
        if m.startswith("tuneplex.") and any(t.startswith("tuneplex.nn") for t in targets)
    }
    allowed = ("tuneplex.nn", "tuneplex.inference", "tuneplex.testing")
    assert {m for m in users if not m.startswith(allowed)} == set()
