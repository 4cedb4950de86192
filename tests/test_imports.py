"""The package's import graph has no circles: module-level and function-level imports alike.

A circle hidden inside a function still ties two modules into one unit (neither can change or be
tested alone) and breaks as soon as one import moves to the top; the layers are
runtime <- export <- pipeline, with arch and tasks below them all."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "edgepipe"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                # a package's own __init__ is imported by every submodule; an edge to it says nothing
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_circles() -> None:
    assert cycles(import_graph()) == []


def test_the_layers_point_one_way() -> None:
    graph = import_graph()
    below = {"edgepipe.runtime": ("edgepipe.export", "edgepipe.pipeline"), "edgepipe.export": ("edgepipe.pipeline",)}
    below["edgepipe.arch"] = ("edgepipe.runtime", "edgepipe.export", "edgepipe.pipeline", "edgepipe.benchmarks")
    wrong = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        for layer, above in below.items()
        if module.startswith(layer)
        for target in targets
        if target.startswith(above)
    ]
    assert wrong == []


def test_the_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    assert "edgepipe.arch.ops" in graph["edgepipe.pipeline.students"]  # imported inside build_student
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
