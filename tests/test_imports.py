"""Import directions (DESIGN.md), read from the source with ``ast``: no import cycles, no
module of fastft/ops/ importing another op's module, kernels/ never importing fastft.ops.

Imports inside functions count: a lazy import that closes a cycle is still a cycle in
the design, only one that happens not to crash at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = {"fastft": ROOT / "fastft", "fastft.kernels": ROOT / "kernels"}  # kernels/ installs as fastft.kernels
COMPILED = {"fastft._cuda"}  # the CUDA extension: imports nothing of the package
OPS = ("attention", "linear_cross_entropy", "lora_linear")
# The modules whose cycles are checked for now; widen to ("fastft",) once the rest of the
# package has none.
CHECKED = ("fastft.ops", "fastft.kernels", "fastft._dispatch", "fastft._extension", "fastft.info", "fastft.bench")


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in SOURCE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


MODULES = _modules()


def _known(name: str) -> str | None:
    """``name`` or its longest prefix that is a module of the package; None outside it."""
    while name and name not in MODULES and name not in COMPILED:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_known(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y: relative to this module's package
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # `from package import submodule` imports the submodule
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in MODULES or submodule in COMPILED else _known(base))
    found.discard(None)
    found.discard(module)
    return found - COMPILED


GRAPH = {module: imports_of(module) for module in MODULES}


def _reachable(start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for target in GRAPH[stack.pop()]:
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def import_cycles() -> list[list[str]]:
    """Each group of modules that import one another, directly or through others."""
    reach = {module: _reachable(module) for module in GRAPH}
    cycles, placed = [], set()
    for module in sorted(GRAPH):
        if module in placed or module not in reach[module]:
            continue
        group = sorted(other for other in reach[module] if module in reach[other])
        placed.update(group)
        cycles.append(group)
    return cycles


def _in_checked_area(module: str) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in CHECKED)


def test_the_import_graph_sees_the_package():
    assert "fastft.ops.attention" in MODULES and "fastft.kernels.lora_linear" in MODULES
    assert "fastft.ops.attention_cuda" in GRAPH["fastft.ops.attention"]
    assert "fastft._extension" in GRAPH["fastft.ops.attention_cuda"]


def test_no_import_cycles():
    cycles = [group for group in import_cycles() if any(_in_checked_area(m) for m in group)]
    assert not cycles, "modules importing each other: " + "; ".join(" <-> ".join(group) for group in cycles)


def test_no_op_imports_another_op():
    """fastft/ops/<op>.py and <op>_cuda.py import nothing of another op."""
    for op in OPS:
        for module in (f"fastft.ops.{op}", f"fastft.ops.{op}_cuda"):
            others = {m for m in GRAPH[module] for other in OPS if other != op
                      and m in (f"fastft.ops.{other}", f"fastft.ops.{other}_cuda", f"fastft.kernels.{other}")}
            assert not others, f"{module} imports {sorted(others)}"


def test_kernels_never_import_the_ops():
    for module, targets in GRAPH.items():
        if module.startswith("fastft.kernels"):
            assert not {t for t in targets if t.startswith("fastft.ops")}, f"{module} imports {sorted(targets)}"
