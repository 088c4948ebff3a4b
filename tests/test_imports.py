"""The import graph of the project's packages: no cycles, and dependencies point one way.

    pipeline -> downstream -> pretext        clustering stands alone (imports no project package)

Every import counts: module level, inside functions, ``from x import y`` and relative forms, as read
with ``ast`` (nothing is imported here, so the test is cheap and needs no Ray). A package's
``__init__.py`` is the module ``pkg``; ``from pkg import mod`` is the module ``pkg.mod`` when
``pkg/mod.py`` (or ``pkg/mod/__init__.py``) exists, else the package ``pkg``. Imports under
``if TYPE_CHECKING:`` never run, so they are left out of the cycle check, but they still count for the
direction rules (a type-only import of a higher layer is coupling all the same).
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "pretext", "downstream", "clustering")

# package -> project packages it must never import
FORBIDDEN = {
    "pretext": ("downstream", "pipeline"),
    "downstream": ("pipeline",),
    "clustering": ("pretext", "downstream", "pipeline"),
}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported project module
    path: str  # file of the import, relative to the scanned root
    line: int
    type_checking: bool  # under `if TYPE_CHECKING:` (never executed)

    def where(self) -> str:
        return f"{self.path}:{self.line}"


# ---------------------------------------------------------------------------------------------- scanning


def project_modules(root: Path, packages) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is_package) for every .py file under the given top-level packages."""
    modules: dict[str, tuple[Path, bool]] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join(parts)] = (path, is_package)
    return modules


def _resolve(name: str, modules) -> str | None:
    """The project module that an absolute dotted name lands in (its longest known prefix), if any."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """(node, under TYPE_CHECKING) for every Import / ImportFrom anywhere in the tree (functions included)."""
    stack = [(tree, False)]
    while stack:
        node, guarded = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, guarded
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack += [(child, True) for child in node.body]
            stack += [(child, guarded) for child in node.orelse]
            continue
        stack += [(child, guarded) for child in ast.iter_child_nodes(node)]


def import_edges(root: Path, packages=PACKAGES) -> tuple[dict[str, tuple[Path, bool]], list[Edge]]:
    """All project modules under ``root`` and every import among them."""
    modules = project_modules(root, packages)
    edges: set[Edge] = set()
    for module, (path, is_package) in modules.items():
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, guarded in _import_nodes(tree):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_resolve(alias.name, modules) for alias in node.names]
            else:
                if node.level:
                    # The package a relative import starts from: the module itself for an __init__.
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    if node.level - 1 > len(base) - 1:
                        raise AssertionError(f"{rel}:{node.lineno}: relative import beyond the top-level package")
                    base = base[: len(base) - (node.level - 1)]
                    full = ".".join(base + ([node.module] if node.module else []))
                else:
                    full = node.module or ""
                for alias in node.names:
                    sub = f"{full}.{alias.name}"
                    targets.append(sub if alias.name != "*" and sub in modules else _resolve(full, modules))
            for target in targets:
                if target is not None and target != module:
                    edges.add(Edge(module, target, rel, node.lineno, guarded))
    return modules, sorted(edges, key=lambda e: (e.source, e.target, e.line))


# ---------------------------------------------------------------------------------------------- checks


def _strongly_connected(nodes, succ) -> list[list[str]]:
    """Tarjan's SCCs (iterative), each sorted; only those with a cycle (size > 1) are returned."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(succ.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(succ.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def _shortest_cycle(start: str, members: set[str], succ) -> list[str]:
    """start -> ... -> start, fewest hops, staying inside the component."""
    parent: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        for child in sorted(succ.get(node, ())):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if child in members and child not in seen:
                seen.add(child)
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is in a cycle but none was found")  # pragma: no cover


def find_cycles(edges: list[Edge]) -> list[str]:
    """One line per group of mutually importing modules: a concrete cycle with the import lines, and
    the whole group when it is larger than that cycle. Empty when the graph is acyclic."""
    runtime = [e for e in edges if not e.type_checking]
    succ: dict[str, set[str]] = {}
    where: dict[tuple[str, str], list[str]] = {}
    for e in runtime:
        succ.setdefault(e.source, set()).add(e.target)
        where.setdefault((e.source, e.target), []).append(e.where())
    nodes = {e.source for e in runtime} | {e.target for e in runtime}
    reports = []
    for component in _strongly_connected(nodes, succ):
        cycle = _shortest_cycle(component[0], set(component), succ)
        lines = [" -> ".join(cycle)]
        lines += [f"    {', '.join(where[(a, b)])}: {a} imports {b}" for a, b in zip(cycle, cycle[1:])]
        if len(component) > len(cycle) - 1:
            lines.append(f"    (the {len(component)} modules that import each other here: {', '.join(component)})")
        reports.append("\n".join(lines))
    return reports


def direction_violations(edges: list[Edge], forbidden=FORBIDDEN) -> list[str]:
    out = []
    for e in edges:
        source_pkg, target_pkg = e.source.split(".")[0], e.target.split(".")[0]
        if target_pkg in forbidden.get(source_pkg, ()):
            kind = " (under TYPE_CHECKING)" if e.type_checking else ""
            out.append(f"{e.where()}: {e.source} imports {e.target}{kind}: {source_pkg} must not import {target_pkg}")
    return out


# ---------------------------------------------------------------------------------------------- tests


def test_scan_sees_every_package_and_function_level_imports():
    modules, edges = import_edges(ROOT)
    assert {m.split(".")[0] for m in modules} == set(PACKAGES)
    assert all(m in modules for m in PACKAGES), "each package's __init__ is the module 'pkg'"
    assert edges, "no imports found among project modules: the scan is broken"
    # pipeline/methods.py imports pretext inside a function; the scan must see it.
    assert any(e.source == "pipeline.methods" and e.target.split(".")[0] == "pretext" for e in edges)


def test_no_import_cycles_among_project_modules():
    _, edges = import_edges(ROOT)
    cycles = find_cycles(edges)
    assert not cycles, (
        "import cycles among project modules (function-level imports count: they still tie the modules "
        "together and fail at import time when the order changes). Break each by moving the shared code "
        "into a module both can import:\n" + "\n".join(cycles)
    )


def test_package_dependencies_point_one_way():
    _, edges = import_edges(ROOT)
    bad = direction_violations(edges)
    assert not bad, (
        "dependencies must point pipeline -> downstream -> pretext, and clustering imports no project "
        "package:\n  " + "\n  ".join(bad)
    )


# -- the checker on small synthetic packages (so that the checks above can fail) ----------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_a_cycle_through_function_level_and_relative_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from . import b\n    return b\n",
        "pkg/b.py": "from pkg import c\n",
        "pkg/c.py": "import os\n\n\ndef g():\n    from .a import f\n    return f\n",
        "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.e import X\n",
        "pkg/e.py": "from pkg.d import TYPE_CHECKING\n",
        "pkg/sub/__init__.py": "from .. import a\nfrom .x import y\n",
        "pkg/sub/x.py": "y = 1\n",
    })
    modules, edges = import_edges(tmp_path, ("pkg",))
    assert {"pkg", "pkg.a", "pkg.sub", "pkg.sub.x"} <= set(modules)
    pairs = {(e.source, e.target) for e in edges}
    assert {("pkg.a", "pkg.b"), ("pkg.b", "pkg.c"), ("pkg.c", "pkg.a"), ("pkg.sub", "pkg.a"),
            ("pkg.sub", "pkg.sub.x")} <= pairs
    cycles = find_cycles(edges)
    # d <-> e is joined only by a TYPE_CHECKING import, which never runs: not a cycle.
    assert len(cycles) == 1, cycles
    assert cycles[0].splitlines() == [
        "pkg.a -> pkg.b -> pkg.c -> pkg.a",
        "    pkg/a.py:2: pkg.a imports pkg.b",
        "    pkg/b.py:1: pkg.b imports pkg.c",
        "    pkg/c.py:5: pkg.c imports pkg.a",
    ], cycles


def test_checker_finds_a_package_importing_a_higher_layer(tmp_path):
    _write(tmp_path, {
        "low/__init__.py": "",
        "low/m.py": "def f():\n    import high.n\n",
        "high/__init__.py": "",
        "high/n.py": "from low import m\n",
    })
    _, edges = import_edges(tmp_path, ("low", "high"))
    assert direction_violations(edges, {"low": ("high",)}) == [
        "low/m.py:2: low.m imports high.n: low must not import high"]
    assert direction_violations(edges, {"high": ("other",)}) == []
