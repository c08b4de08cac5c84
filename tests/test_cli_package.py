"""The command line is a package of thin command modules (DESIGN.md section 2): short modules, no
model code, no private names of the layers below, no import cycle (lazy imports count); and the
engine's results table that ``eval`` prints."""

import ast
from pathlib import Path

import transmatcher_fast
from transmatcher_fast.engine.evaluate import results_table

PACKAGE = Path(transmatcher_fast.__file__).parent
CLI = PACKAGE / "cli"


def _modules():
    return sorted(CLI.glob("*.py"))


def _imports(path: Path):
    """(level, module, names) of every import in ``path``, inside functions too."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name, []


def test_one_short_module_per_command():
    names = {p.stem for p in _modules()}
    assert {"train", "pretrain", "eval", "extract", "visualize", "cfs", "demo", "synth", "op_demo"} <= names
    for path in _modules():
        assert len(path.read_text().splitlines()) < 800, path.name


def test_no_model_code_and_no_private_names_from_below():
    for path in _modules():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b) for b in node.bases]
                assert not any("Module" in b for b in bases), f"{path.name}: class {node.name}({bases})"
        for level, module, names in _imports(path):
            if level >= 2:  # another layer of the package
                private = [n for n in names if n.startswith("_") and n != "__version__"]
                assert not private, f"{path.name}: from {'.' * level}{module} import {private}"


def test_the_cli_modules_import_no_cycle():
    """Edges between the cli modules (the package's __init__ may import its modules; no module
    imports the package or one that imports it back)."""
    graph = {p.stem: set() for p in _modules()}
    for path in _modules():
        for level, module, names in _imports(path):
            if level == 1:
                targets = [module] if module else names
                graph[path.stem].update(t for t in targets if t in graph and t != path.stem)
    assert not any("__init__" in edges for name, edges in graph.items() if name != "__init__")
    seen, done = set(), set()

    def visit(name, trail):
        assert name not in seen or name in done, f"import cycle: {' -> '.join(trail + [name])}"
        if name in done:
            return
        seen.add(name)
        for other in graph[name]:
            visit(other, trail + [name])
        done.add(name)

    for name in graph:
        visit(name, [])


def test_results_table_of_chosen_ranks_and_topk():
    m = {"cmc": [0.5, 0.6, 0.7], "rank1": 0.5, "rank5": None, "mAP": 0.25, "mINP": 0.125, "topk": 3}
    table = results_table({"x": m}, ranks=[1, 3, 5])
    assert table.splitlines()[0] == "| model | Rank-1 | Rank-3 | Rank-5 | mAP (AP@3) | mINP |"
    assert table.splitlines()[2] == "| x | 50.0 | 70.0 | n/a | 25.0 | 12.5 |"
    # Rows of different modes: the plain heading, each row its own values.
    both = results_table({"x": m, "y": {**m, "topk": None}})
    assert "| mAP |" in both.splitlines()[0] and both.count("\n") == 3
