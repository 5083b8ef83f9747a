"""The package's layers, read from its source: every import (at the top or inside a function) goes to the same layer
or a lower one, and no modules import each other in a circle. The layers are the ones docs/ARCHITECTURE.md draws."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import REPO

# Top to bottom; a tuple holds peers, which may not import each other.
LAYERS = [
    ("cli",),
    ("runs",),
    ("training", "exporting"),
    ("evaluation",),
    ("model",),
    ("records",),
    ("recipe",),
    ("data",),
    ("base",),
]
# `python -m finetune.<command>` and `python -m finetune` (the documented command forms) sit at the package root.
COMMAND_ALIASES = {"__main__", "train", "evaluate", "export", "predict", "validate"}


def module_files(root: Path) -> dict[str, Path]:
    """{dotted module name: file} for a package folder."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(path: Path, package: str, modules: dict[str, str]) -> set[str]:
    """The package's modules that a file imports, anywhere in it. `from a.b import c` counts as a.b.c when c is a
    module, else as a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (use the absolute name, so layers stay visible)"
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]  # fmt: skip
        else:
            continue
        found.update(n for n in names if n == package or n.startswith(package + "."))
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "base"  # the package's own __init__
    if len(parts) == 2 and parts[1] in COMMAND_ALIASES:
        return "cli"
    return parts[1]


def rank(layer: str, layers=LAYERS) -> int:
    return next(i for i, peers in enumerate(layers) if layer in peers)


def layer_violations(root: Path, layers=LAYERS) -> tuple[list[str], dict[str, set[str]]]:
    """(every import that goes up or sideways between peers, the import graph)."""
    package = root.name
    files = module_files(root)
    known = {layer for peers in layers for layer in peers}
    problems, graph = [], {}
    for module, path in files.items():
        source = layer_of(module)
        if source not in known:
            problems.append(f"{module}: in no layer (put it in one of {sorted(known)})")
            continue
        graph[module] = imports_of(path, package, files)
        for target in sorted(graph[module]):
            wanted = layer_of(target)
            if wanted not in known:
                continue  # reported as its own module
            if rank(wanted, layers) < rank(source, layers):
                problems.append(f"{module} imports {target}: {source} may not import the higher layer {wanted}")
            elif rank(wanted, layers) == rank(source, layers) and wanted != source:
                problems.append(f"{module} imports {target}: the peers {source} and {wanted} stay apart")
    return problems, graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module, and modules that import themselves (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_import_goes_to_the_same_or_a_lower_layer():
    problems, _ = layer_violations(REPO / "finetune")
    assert not problems, "\n".join(problems)


def test_no_modules_import_each_other_in_a_circle():
    _, graph = layer_violations(REPO / "finetune")
    assert not cycles(graph), cycles(graph)


def test_the_check_catches_an_upward_import_a_peer_import_and_a_cycle_inside_functions(tmp_path):
    """The same checks on a small package with each fault once (imports inside functions, as real code hides them)."""
    root = tmp_path / "pkg"
    for folder in ("cli", "training", "exporting", "model", "base"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "model" / "load.py").write_text("def f():\n    from pkg.cli.main import run\n")
    (root / "cli" / "main.py").write_text("import pkg.model.load\n")
    (root / "training" / "loop.py").write_text("def g():\n    from pkg.exporting import merge\n")
    (root / "exporting" / "merge.py").write_text("")
    (root / "base" / "a.py").write_text("def h():\n    import pkg.base.b\n")
    (root / "base" / "b.py").write_text("from pkg.base import a\n")
    (root / "stray.py").write_text("")
    layers = [("cli",), ("training", "exporting"), ("model",), ("base",)]
    problems, graph = layer_violations(root, layers)
    assert any("pkg.model.load imports pkg.cli.main: model may not import the higher layer cli" in p for p in problems)
    assert any("peers training and exporting" in p for p in problems)
    assert any(p.startswith("pkg.stray: in no layer") for p in problems)
    assert sorted(cycles(graph)) == [["pkg.base.a", "pkg.base.b"], ["pkg.cli.main", "pkg.model.load"]]


def test_the_architecture_page_draws_these_layers():
    """docs/ARCHITECTURE.md is the module map: its layer line names the same layers in the same order."""
    page = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    line = re.search(r"^`(cli > .*)`$", page, re.M)
    assert line, "docs/ARCHITECTURE.md lost its layer line (`cli > runs > ...`)"
    drawn = [tuple(p.strip() for p in layer.split("|")) for layer in line.group(1).split(">")]
    assert drawn == LAYERS, drawn
    for peers in LAYERS:
        for layer in peers:
            assert (REPO / "finetune" / layer).is_dir() and f"finetune/{layer}/" in page, layer
