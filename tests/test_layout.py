"""The package's layering (DESIGN.md, "Layout"), read from the source with ``ast``: no
import cycle anywhere in ``fastft`` + ``kernels/`` (installed as ``fastft.kernels``), and
imports point down the layers, never back up:

    recipes -> finetuning -> train -> data / models / peft -> nn -> ops -> kernels

Every import statement counts, at module level or inside a function: an import moved into
a function to dodge a cycle is still a cycle in the design, only one that does not crash
at import time. ``import fastft`` followed by ``fastft.pretrain(...)`` counts as an import
of the module behind the lazy attribute (``fastft.__init__._LAZY``). Importing
``fastft.train.loop`` from outside ``fastft.train`` also imports ``fastft.train`` (Python
runs the package's ``__init__`` first), so that counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = {"fastft": ROOT / "fastft", "fastft.kernels": ROOT / "kernels"}  # kernels/ installs as fastft.kernels
COMPILED = {"fastft._cuda"}  # the CUDA extension (csrc/): imports nothing of the package


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in SOURCE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


MODULES = _modules()


def _lazy_attributes() -> dict[str, str]:
    """``fastft.__init__``'s ``_LAZY``: attribute -> the module that provides it."""
    tree = ast.parse(MODULES["fastft"].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            return {key: module for key, (module, _) in ast.literal_eval(node.value).items()}
    return {}


LAZY = _lazy_attributes()


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _known(name: str) -> str | None:
    """``name`` or its longest prefix that is a module of the package; None outside it
    and for the compiled extension (a leaf: it imports nothing of ours)."""
    while name and name not in MODULES and name not in COMPILED:
        name = name.rpartition(".")[0]
    return name if name and name not in COMPILED else None


def imports_of(module: str) -> set[str]:
    """The package's modules that ``module``'s source imports, anywhere in it."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found: set[str | None] = set()
    binds_fastft = False  # `import fastft` (or `import fastft.x`): `fastft.<lazy attribute>` reaches _LAZY
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(_known(alias.name))
                binds_fastft |= alias.name.split(".")[0] == "fastft" and alias.asname is None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y: relative to this module's package
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # `from package import submodule` imports the submodule
                if base == "fastft" and alias.name in LAZY:
                    found.add(LAZY[alias.name])
                elif f"{base}.{alias.name}" in MODULES or f"{base}.{alias.name}" in COMPILED:
                    found.add(_known(f"{base}.{alias.name}"))
                else:
                    found.add(_known(base))
    if binds_fastft:
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "fastft"
                    and node.attr in LAZY):
                found.add(LAZY[node.attr])
    found.discard(None)
    for target in list(found):  # the packages above each imported module run their __init__ first
        parts = target.split(".")
        found.update(parent for parent in (".".join(parts[:i]) for i in range(2, len(parts)))
                     if parent in MODULES and not _inside(module, parent))
    found.discard(module)
    return found  # type: ignore[return-value]


GRAPH = {module: imports_of(module) for module in MODULES}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a
    closed path through it (``a -> b -> ... -> a``) for the message."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def connect(module):  # recursion depth is bounded by the package's size (~100 modules)
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            connect(module)
    return [_closed_path(graph, component) for component in components]


def _closed_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside it)."""
    start, members = component[0], set(component)
    previous = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for target in sorted(graph[module] & members):
                if target == start:
                    path = [module]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if target not in previous:
                    previous[target] = module
                    following.append(target)
        frontier = following
    return component  # unreachable for a strongly connected component


def test_the_import_graph_sees_the_package():
    """The graph reads what the tests below rely on (so an empty graph cannot pass them)."""
    assert {"fastft.train.loop", "fastft.finetuning.tasks.base", "fastft.recipes.finetune", "fastft.kernels.attention",
            "fastft.cli"} <= set(MODULES)
    assert "fastft.train.loop" in GRAPH["fastft.recipes.finetune"]
    assert "fastft.finetuning.tasks" in GRAPH["fastft.finetuning.evaluation"]  # `from package import name`
    assert "fastft.kernels._common" in GRAPH["fastft.kernels.attention"]
    assert "fastft" not in GRAPH["fastft._extension"]  # `from fastft import _cuda` is the extension, not the package
    assert "fastft.data" in GRAPH["fastft.train.loop"]  # fastft.data.batching's package runs first
    assert "fastft.train" not in GRAPH["fastft.train.loop"]  # ... but a module's own package is no import of it
    assert "fastft.peft" in GRAPH["fastft.finetuning.strategies"]  # an import inside a function counts
    assert LAZY["pretrain"] == "fastft.recipes.pretrain"
    assert "fastft.recipes.pretrain" in GRAPH["fastft.recipes.demo"]  # `import fastft` ... `fastft.pretrain(...)`


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e", "d"}}
    assert import_cycles(graph) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles():
    cycles = import_cycles(GRAPH)
    assert not cycles, "modules importing each other: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


# (importer package, packages it must not import): the layers of DESIGN.md, top to bottom.
FORBIDDEN = [
    ("fastft.train", ("fastft.finetuning", "fastft.recipes")),  # the engine knows no task and no recipe
    ("fastft.finetuning", ("fastft.recipes", "fastft.active", "fastft.audit")),
    ("fastft.alignment", ("fastft.finetuning", "fastft.recipes")),  # a domain beside fine-tuning, not above it
    ("fastft.active", ("fastft.recipes",)),
    ("fastft.audit", ("fastft.recipes",)),
    ("fastft.data", ("fastft.train", "fastft.finetuning", "fastft.recipes")),
    ("fastft.nn", ("fastft.train", "fastft.finetuning", "fastft.recipes")),
    ("fastft.ops", ("fastft.train", "fastft.finetuning", "fastft.recipes")),
]


@pytest.mark.parametrize("importer,forbidden", FORBIDDEN, ids=[importer for importer, _ in FORBIDDEN])
def test_imports_point_down_the_layers(importer, forbidden):
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items() if _inside(module, importer)
        for target in targets if any(_inside(target, package) for package in forbidden)
    )
    assert not upward, f"{importer} must not import {list(forbidden)}: " + "; ".join(upward)


OPS = ("attention", "linear_cross_entropy", "lora_linear")


def test_no_op_imports_another_op():
    """fastft/ops/<op>.py and <op>_cuda.py import nothing of another op."""
    for op in OPS:
        for module in (f"fastft.ops.{op}", f"fastft.ops.{op}_cuda"):
            others = {m for m in GRAPH[module] for other in OPS if other != op
                      and m in (f"fastft.ops.{other}", f"fastft.ops.{other}_cuda", f"fastft.kernels.{other}")}
            assert not others, f"{module} imports {sorted(others)}"


def test_kernels_never_import_the_ops():
    for module, targets in GRAPH.items():
        if _inside(module, "fastft.kernels"):
            upward = sorted(t for t in targets if _inside(t, "fastft.ops"))
            assert not upward, f"{module} imports {upward}"
