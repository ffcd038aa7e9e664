"""No import cycles among mlmtool's modules.

Every module's ``import``/``from ... import`` statements are read with ``ast`` (those under
``if TYPE_CHECKING:`` excluded: they never run); importing ``a.b.c`` also runs
``a/__init__`` and ``a/b/__init__``, so those edges count.  Two checks:

* the module-level imports form no cycle (a cycle there is an ImportError or a half-built
  module, depending on who is imported first);
* nor would the function-local ones, were they hoisted: a local import only keeps a heavy
  or optional dependency off a light path (jax off ``--help``, transformers, fsspec, ...),
  never holds a cycle together.  The one exception is a package importing its own submodule
  lazily (``mlmtool.models.load_model`` -> ``mlmtool.models.loaded``, which imports jax).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "mlmtool"


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """{dotted module name: file} for every .py under ``root/package``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _all_imports(tree: ast.Module):
    """Every import node, function-local ones included, except those under TYPE_CHECKING."""
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
               for child in node.body for n in ast.walk(child)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skipped:
            yield node


def _top_level_imports(tree: ast.Module):
    """Import nodes that run when the module is imported: top level, and inside top-level
    ``if``/``try``/``with`` blocks (not functions or classes' methods, not TYPE_CHECKING)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                stack.extend(node.body)
            stack.extend(node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend([*node.body, *node.orelse, *node.finalbody])
            for handler in node.handlers:
                stack.extend(handler.body)
        elif isinstance(node, (ast.With, ast.ClassDef)):  # a class body runs at import
            stack.extend(node.body)


def _with_parents(name: str, modules: dict) -> set[str]:
    """``name`` and the packages above it that are mlmtool modules (their __init__ runs first)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules}


def import_graph(modules: dict[str, Path], *, local: bool = False) -> dict[str, set[str]]:
    """{module: the mlmtool modules its import runs}; ``local``: also those its functions
    import (except a package's own submodules)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        top = list(_top_level_imports(tree))
        nodes = top + [n for n in _all_imports(tree) if n not in top] if local else top
        for node in nodes:
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:  # relative: from the module's package
                    base = name.split(".")
                    base = base[:len(base) - node.level + (1 if is_package else 0)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # "from pkg import mod" imports pkg.mod when it is a module
                targets = [source] + [f"{source}.{alias.name}" for alias in node.names
                                      if f"{source}.{alias.name}" in modules]
            for target in targets:
                found = _with_parents(target, modules)
                if local and node not in top and is_package:  # a package's lazy submodule import
                    found = {t for t in found if not t.startswith(name + ".")}
                edges |= found
        edges.discard(name)
        graph[name] = edges - _with_parents(name, modules)  # a package's own parents are already running
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module, each as one cycle path
    through it (Tarjan's algorithm, then a path inside the component)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (~70)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(component, graph) for component in components]


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component  # unreachable for a strongly connected component


def test_no_import_cycle():
    cycles = find_cycles(import_graph(module_files()))
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_local_import_holds_a_cycle_together():
    cycles = find_cycles(import_graph(module_files(), local=True))
    assert not cycles, ("cycles through function-local imports (move what they import lower down instead):\n"
                        + "\n".join(" -> ".join(c) for c in cycles))


# -- the detector itself -----------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return module_files(root, "pkg")


@pytest.mark.parametrize("files, cycle", [
    ({"pkg/__init__.py": "", "pkg/a.py": "from pkg import b\n", "pkg/b.py": "import pkg.a\n"},
     ["pkg.a", "pkg.b", "pkg.a"]),
    ({"pkg/__init__.py": "", "pkg/a.py": "from .b import x\n", "pkg/b.py": "try:\n    from pkg.a import y\n"
      "except ImportError:\n    pass\n"}, ["pkg.a", "pkg.b", "pkg.a"]),
    # importing pkg.sub.m runs pkg/sub/__init__, which imports pkg.a
    ({"pkg/__init__.py": "", "pkg/a.py": "from pkg.sub.m import z\n", "pkg/sub/__init__.py": "from pkg import a\n",
      "pkg/sub/m.py": ""}, ["pkg.a", "pkg.sub", "pkg.a"]),
])
def test_detector_finds_a_cycle(tmp_path, files, cycle):
    assert find_cycles(import_graph(_write(tmp_path, files))) == [cycle]


def test_detector_ignores_local_and_type_checking_imports(tmp_path):
    modules = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
                    "def f():\n    from pkg import a\n    return a\n",
    })
    graph = import_graph(modules)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == set()
    assert find_cycles(graph) == []
    assert find_cycles(import_graph(modules, local=True)) == [["pkg.a", "pkg.b", "pkg.a"]]  # f's import counts


@pytest.mark.parametrize("init, cycle", [
    ("def load():\n    from pkg.models.loaded import x\n    return x\n", []),  # lazy: exempt
    ("from pkg.models.loaded import x\n", [["pkg.models", "pkg.models.loaded", "pkg.weights", "pkg.models"]]),
])
def test_detector_exempts_only_a_packages_lazy_import_of_its_own_submodule(tmp_path, init, cycle):
    """As mlmtool.models.load_model imports mlmtool.models.loaded, which imports hf_weights,
    which imports mlmtool.models.base (and so mlmtool.models)."""
    modules = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/models/__init__.py": init,
        "pkg/models/base.py": "",
        "pkg/models/loaded.py": "from pkg import weights\nx = 1\n",
        "pkg/weights.py": "from pkg.models.base import *\n",
    })
    assert find_cycles(import_graph(modules, local=True)) == cycle
