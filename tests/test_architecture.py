"""The package's shape: imports point down (no cycles), every module imports alone, and
the front door (`embstore.store`) is imported by nothing in the library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "embstore"
ROOT = PACKAGE.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """embstore modules imported anywhere in a module (function bodies included),
    except inside `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def resolve(base: str, names: list[str]) -> None:
        for name in names:
            candidate = f"{base}.{name}" if base else name
            # `from pkg import module` depends on that module; `from module import name` on the module
            found.add(candidate if candidate in MODULES else base)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "embstore")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] == "embstore":
                resolve(base, [a.name for a in node.names])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return {m for m in found if m in MODULES}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = _imports(tree, name, path.name == "__init__.py")
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
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
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return cycles


def test_the_graph_finder_sees_cycles_and_function_level_imports():
    # the checker itself: a cycle through a function-level import is found, a
    # TYPE_CHECKING import is not an edge
    code_a = "def f():\n    from embstore.b import x\n"
    code_b = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from embstore.a import y\nfrom embstore import a\n"
    MODULES.setdefault("embstore.a", Path("a.py"))
    MODULES.setdefault("embstore.b", Path("b.py"))
    try:
        graph = {
            "embstore.a": _imports(ast.parse(code_a), "embstore.a", False),
            "embstore.b": _imports(ast.parse(code_b), "embstore.b", False),
        }
        assert graph == {"embstore.a": {"embstore.b"}, "embstore.b": {"embstore.a"}}
        assert find_cycles(graph) == [["embstore.a", "embstore.b"]]
        graph["embstore.b"] = _imports(ast.parse(code_b.replace("from embstore import a\n", "")), "embstore.b", False)
        assert find_cycles(graph) == []
    finally:
        MODULES.pop("embstore.a")
        MODULES.pop("embstore.b")


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_nothing_in_the_library_imports_the_front_door():
    graph = import_graph()
    allowed = {"embstore"}  # embstore.open() builds the Store
    users = sorted(
        name for name, deps in graph.items()
        if "embstore.store" in deps and name not in allowed and not name.startswith("embstore.cli")
    )
    assert not users, f"modules below the front door import embstore.store: {users}"


def test_leaves_import_no_embstore_module():
    graph = import_graph()
    for leaf in ("embstore.errors", "embstore.paths", "embstore.progress", "embstore.vectors"):
        assert graph[leaf] == set(), f"{leaf} imports {graph[leaf]}"


IMPORT_EACH_ALONE = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    # every embstore module forgotten: this one and what it imports load afresh, in the
    # order its own imports give (third-party libraries stay loaded: they cannot hide a
    # cycle among embstore's modules, and reloading torch a hundred times costs minutes)
    for loaded in [m for m in sys.modules if m == "embstore" or m.startswith("embstore.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failed.append((name, traceback.format_exc().strip().splitlines()[-1]))
print(failed)
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_every_module_imports_alone():
    names = [n for n in MODULES if n != "embstore.__main__"]  # __main__ runs the CLI
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, *names], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
