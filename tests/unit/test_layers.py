"""The house keeps its shape: ``registry`` is the ground floor, ``server`` and ``trainer`` are peers
that never import each other, ``cli`` wires them at the edge, and no modules import each other in
a cycle. Every import counts: at the top, inside a function (deferred) or under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("registry", "server", "trainer", "cli")  # each folder is loraflow.<folder>
# Which layers each may import besides itself.
ALLOWED = {
    "registry": set(),
    "server": {"registry"},
    "trainer": {"registry"},
    "cli": {"registry", "server", "trainer"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["loraflow", *parts])


def _sources() -> dict[str, Path]:
    return {
        _module_name(path): path
        for layer in LAYERS
        for path in sorted((ROOT / layer).rglob("*.py"))
        if "migrations" not in path.parts
    }


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {loraflow module it imports: first line}}, a ``from M import N`` counted as an
    import of ``M.N`` when that is a module."""
    sources = _sources()
    graph: dict[str, dict[str, int]] = {}
    for name, path in sources.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                targets = [
                    f"{module}.{alias.name}" if f"{module}.{alias.name}" in sources else module
                    for alias in node.names
                ]
            for target in targets:
                if target.startswith("loraflow.") and target != name:
                    while target not in sources and "." in target:  # loraflow.x.y.attr -> loraflow.x.y
                        target = target.rpartition(".")[0]
                    if target in sources and target != name:
                        edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def _layer(module: str) -> str:
    return module.split(".")[1]


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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


def test_each_layer_imports_only_the_layers_below_it() -> None:
    graph = import_graph()
    assert len(graph) > 80  # the walk found the package
    wrong = [
        f"{_sources()[module].relative_to(ROOT)}:{line} imports {target}"
        for module, edges in graph.items()
        for target, line in edges.items()
        if _layer(target) != _layer(module) and _layer(target) not in ALLOWED[_layer(module)]
    ]
    assert not wrong, "\n".join(wrong)


def test_no_modules_import_each_other_in_a_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "\n".join(" <-> ".join(component) for component in found)


def test_the_checks_see_a_deferred_import_and_a_cycle() -> None:
    graph = {"loraflow.a.x": {"loraflow.a.y": 3}, "loraflow.a.y": {"loraflow.a.x": 9}, "loraflow.a.z": {}}
    assert cycles(graph) == [["loraflow.a.x", "loraflow.a.y"]]
    assert "loraflow.server.app" in import_graph()["loraflow.cli.endpoint"]  # imported inside a function


def test_a_version_is_spelled_in_one_place() -> None:
    """``NAME@vN`` is written by ``registry/refs.py`` alone, in the package, its tests and its
    benchmarks (migrations, frozen history, aside)."""
    spelled = "@v" + "{"  # so this test does not find itself
    files = [*_sources().values(), *(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in files
        if path.name != "refs.py" and "versions" not in path.parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if spelled in line
    ]
    assert not found, found
