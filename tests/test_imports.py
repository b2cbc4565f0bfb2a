"""The package's layers point one way: no import cycle, and the layering rules hold.

The graph is read from the source with :mod:`ast`, not by importing: an edge is a module-level
import (also inside top-level ``try``/``if``/``with`` blocks and class bodies, which run on
import), never one inside a function or an ``if TYPE_CHECKING:`` block. Relative imports are
resolved, and ``from X import name`` is an edge to ``X.name`` when that is a module of the
package, else to ``X``. Importing ``a.b`` also runs ``a/__init__.py``; that implicit edge to the
parent package is left out (every submodule would otherwise be in a cycle with its package).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "saliaudit"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE  # this checkout's package, not the installed one


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(
    body: list[ast.stmt], *, in_functions: bool = False
) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported (with ``in_functions``, also
    the deferred ones inside functions and methods)."""

    def walk(block: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
        return _module_level_imports(block, in_functions=in_functions)

    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if in_functions:  # else: runs when called, not on import
                yield from walk(node.body)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from walk(node.body)
            yield from walk(node.orelse)
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            for block in (node.body, node.orelse, node.finalbody):  # type: ignore[attr-defined]
                yield from walk(block)
            for handler in node.handlers:  # type: ignore[attr-defined]
                yield from walk(handler.body)
        elif isinstance(node, (ast.With, ast.AsyncWith, ast.For, ast.AsyncFor, ast.While, ast.ClassDef)):
            yield from walk(node.body)
            yield from walk(getattr(node, "orelse", []))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def build_graph(*, in_functions: bool = False) -> dict[str, set[str]]:
    """``{module: modules of the package it imports at module level}`` (with
    ``in_functions``, also inside functions)."""
    files = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in _module_level_imports(tree.body, in_functions=in_functions):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                source = _resolve(module, is_package, node)
                targets = [
                    f"{source}.{a.name}" if f"{source}.{a.name}" in files else source for a in node.names
                ]
            graph[module].update(t for t in targets if t in files and t != module)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component with a cycle (Tarjan), as the list
    of modules ``[a, b, ..., a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles = []
    for comp in components:
        start = min(comp)
        # breadth-first from start back to start, inside the component
        parent: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & comp):
                    if w == start:
                        found = v
                        break
                    if w not in parent:
                        parent[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [start]
        v = found
        while v is not None and v != start:
            path.append(v)
            v = parent[v]
        cycles.append([start] + path[1:][::-1] + [start])
    return sorted(cycles)


GRAPH = build_graph()


def _edges(prefixes: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    """Edges from a module under one of ``prefixes`` to a module under one of ``forbidden``."""

    def under(m: str, ps: tuple[str, ...]) -> bool:
        return any(m == p or m.startswith(p + ".") for p in ps)

    return sorted(
        f"{a} -> {b}"
        for a, targets in GRAPH.items()
        if under(a, prefixes)
        for b in targets
        if under(b, forbidden)
    )


def test_graph_sees_the_package() -> None:
    # a sanity check of the parser itself, on edges that are known to exist
    assert "saliaudit.report.output" in GRAPH["saliaudit.report.render"]
    assert "saliaudit.report.context" in GRAPH["saliaudit.report.html"]
    assert "saliaudit.report.plots" in GRAPH["saliaudit.report.figures"]  # from . import plots
    assert "saliaudit.cli" in GRAPH["saliaudit.__main__"]
    assert "saliaudit.errors" in GRAPH["saliaudit.data"]  # an absolute import


def test_parser_rules(tmp_path) -> None:
    src = (
        "from typing import TYPE_CHECKING\n"
        "from . import a\n"
        "from .b import thing\n"
        "try:\n    from .c import x\nexcept ImportError:\n    from .d import y\n"
        "if TYPE_CHECKING:\n    from .e import T\nelse:\n    from .f import U\n"
        "def fn():\n    from .g import z\n"
        "class K:\n    from .h import w\n"
    )
    tree = ast.parse(src)
    got = [(n.module, n.level) for n in _module_level_imports(tree.body) if isinstance(n, ast.ImportFrom)]
    assert got == [("typing", 0), (None, 1), ("b", 1), ("c", 1), ("d", 1), ("f", 1), ("h", 1)]
    node = ast.parse("from ..x import y").body[0]
    assert _resolve("p.q.r", False, node) == "p.x"  # type: ignore[arg-type]
    assert _resolve("p.q", True, node) == "p.x"  # type: ignore[arg-type]


def test_find_cycles_reports_the_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles among saliaudit modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_report_has_no_cycle_even_through_deferred_imports() -> None:
    """Inside ``report/`` not even an import deferred into a function closes a cycle: the
    output folder is a leaf that the renderers write through."""
    full = build_graph(in_functions=True)
    report = {
        m: {t for t in targets if t.startswith("saliaudit.report.")}
        for m, targets in full.items()
        if m.startswith("saliaudit.report.")
    }
    cycles = find_cycles(report)
    assert not cycles, "import cycles inside saliaudit/report/:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_maps_is_neutral() -> None:
    bad = _edges(("saliaudit.maps",), ("saliaudit.methods", "saliaudit.checks", "saliaudit.report"))
    assert not bad, "saliaudit/maps.py imports a layer above it:\n" + "\n".join(bad)


def test_methods_do_not_import_checks_or_report() -> None:
    bad = _edges(("saliaudit.methods",), ("saliaudit.checks", "saliaudit.report"))
    assert not bad, "saliaudit/methods/ imports checks or report:\n" + "\n".join(bad)


def test_report_does_not_import_the_audit() -> None:
    bad = _edges(("saliaudit.report",), ("saliaudit.audit", "saliaudit.methods", "saliaudit.checks"))
    assert not bad, "saliaudit/report/ imports the audit layers:\n" + "\n".join(bad)


def _package_imports(name: str) -> list[str]:
    """The package modules ``saliaudit.report.<name>`` imports anywhere (also in functions)."""
    path = ROOT / "report" / f"{name}.py"
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            imported.add(_resolve(f"saliaudit.report.{name}", False, node))
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    return sorted(m for m in imported if m.startswith(PACKAGE))


def test_output_folder_is_a_leaf() -> None:
    """``report/output.py`` owns the output folder and atomic writes; the renderers use it,
    never the other way round (not even from inside a function). Its lock and ledger are leaves
    too."""
    inside = _package_imports("output")
    leaves = ["saliaudit.errors", "saliaudit.report.folder_lock", "saliaudit.report.ledger"]
    assert inside == leaves, f"report/output.py imports {inside}"
    inside = _package_imports("folder_lock")
    assert inside == ["saliaudit.errors"], f"report/folder_lock.py imports {inside}"
    assert _package_imports("ledger") == [], "report/ledger.py imports from the package"


def test_main_module_is_guarded() -> None:
    """``import saliaudit.__main__`` (pkgutil, docs tools) must not run the CLI."""
    path = ROOT / "__main__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    calls = [n for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)]
    assert not calls, "saliaudit/__main__.py calls main() on import; guard it with if __name__ == '__main__'"
