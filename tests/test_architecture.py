"""The package's shape: every module has a layer (`LAYERS`, bottom first) and imports
only from lower layers or from inside its own entry (never up, never sideways), there is
no cycle, every module imports alone, and the front door (`embstore.store`) is imported
by nothing in the library. ARCHITECTURE.md describes the same table."""

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


# Bottom first. A module belongs to the longest entry that is its name or a dotted prefix
# of it ("embstore" is the package's __init__ only). An import may point to a lower layer
# or inside its own entry; another entry of the same layer is sideways, a higher layer is
# up: both fail.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaves", ("embstore.errors", "embstore.paths", "embstore.progress", "embstore.vectors",
                "embstore.processes", "embstore.outcome")),
    ("api", ("embstore.api",)),  # option checking and the Report base: above errors only
    ("audio", ("embstore.audio",)),
    ("clustering algorithms", ("embstore.clustering",)),  # kmeans, ahc, labels, corpus (not .stored)
    ("arrays", ("embstore.arrays",)),
    ("manifest", ("embstore.manifest",)),
    ("models", ("embstore.models",)),
    ("segments", ("embstore.segments",)),
    ("diarization algorithms", ("embstore.diarize",)),
    ("interop", ("embstore.interop",)),  # Lhotse manifests, HF/Parquet datasets: below scan and export
    ("scan", ("embstore.scan",)),
    ("extract", ("embstore.extract",)),
    ("extract on Ray", ("embstore.extract.ray",)),
    ("search", ("embstore.search",)),  # the ANN index, knn/range, overlap, duplicates: under the queries that use it
    ("reading", ("embstore.query", "embstore.verify", "embstore.export")),
    ("analyses", ("embstore.eval", "embstore.clustering.stored", "embstore.diarize.stored")),
    ("front door", ("embstore.store",)),
    ("package", ("embstore",)),
    ("cli", ("embstore.cli",)),
    ("test data", ("embstore.synthetic",)),
    ("entry points", ("embstore.demo", "embstore.__main__")),
]


def entry_of(module: str) -> tuple[int, str] | None:
    """(layer index, entry) of a module: the longest matching entry."""
    best: tuple[int, str] | None = None
    for level, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            matches = module == entry if entry == "embstore" else module == entry or module.startswith(entry + ".")
            if matches and (best is None or len(entry) > len(best[1])):
                best = (level, entry)
    return best


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for src, deps in sorted(graph.items()):
        a = entry_of(src)
        for dst in sorted(deps):
            b = entry_of(dst)
            if a is None or b is None or a[1] == b[1] or b[0] < a[0]:
                continue
            way = "sideways" if a[0] == b[0] else "up"
            out.append(f"{src} -> {dst} ({way}: {LAYERS[a[0]][0]} -> {LAYERS[b[0]][0]})")
    return out


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if entry_of(m) is None)
    assert not unplaced, f"modules in no layer of LAYERS (place them): {unplaced}"


def test_imports_point_down_or_within_their_own_entry():
    violations = layer_violations(import_graph())
    assert not violations, "imports that point up or sideways:\n" + "\n".join(violations)


def test_the_layer_check_sees_up_and_sideways_imports():
    graph = {
        "embstore.audio.io": {"embstore.manifest.tasks"},  # up
        "embstore.query": {"embstore.export.files", "embstore.manifest.tasks"},  # sideways, down
        "embstore.segments.vad": {"embstore.segments.windows"},  # within its entry
    }
    assert layer_violations(graph) == [
        "embstore.audio.io -> embstore.manifest.tasks (up: audio -> manifest)",
        "embstore.query -> embstore.export.files (sideways: reading -> reading)",
    ]


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
