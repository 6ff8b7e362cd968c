"""The package's shape: no import circles, the library never imports the command line,
frameworks only under ``backends/``, and no module far over 400 lines.

Every ``import`` counts, also those inside functions and under ``TYPE_CHECKING``:
a lazy import hides a circle from the interpreter, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rlaif_mlx"
FRAMEWORKS = {"torch", "mlx", "mlx_lm", "transformers", "peft", "safetensors", "tokenizers"}
MAX_LINES = 420  # "about 400"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The package modules ``name`` imports (``from . import x`` resolved to the module x when it is one)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target in MODULES and target != name:
                found.add(target)
    return found


def external_imports(name: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def test_no_import_circles():
    # A package imports its own modules (``__init__`` re-exports), so edges into a parent package
    # are not followed: a circle through an ``__init__`` would still show up from its modules.
    def parents(name: str) -> set[str]:
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))}

    circles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(GRAPH[name] - parents(name)):
            if state.get(target) == 1:
                circles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert circles == []


def test_the_library_never_imports_the_command_line():
    offenders = {n: sorted(t for t in GRAPH[n] if t.startswith("rlaif_mlx.cli")) for n in GRAPH}
    assert {n: t for n, t in offenders.items() if t and not n.startswith("rlaif_mlx.cli")} == {}


def test_frameworks_are_imported_only_under_backends():
    offenders = {
        n: sorted(external_imports(n) & FRAMEWORKS)
        for n in MODULES
        if not n.startswith("rlaif_mlx.backends") and n != "rlaif_mlx.data.tiny_model"
    }
    # The tiny model is written with tokenizers and safetensors (no torch or mlx), imported inside its builder.
    assert {n: f for n, f in offenders.items() if f} == {}
    assert external_imports("rlaif_mlx.data.tiny_model") & FRAMEWORKS <= {"tokenizers", "transformers", "safetensors"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_readable_in_length(name):
    lines = MODULES[name].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(PACKAGE.parent)} has {lines} lines"
