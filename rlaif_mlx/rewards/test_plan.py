"""A task's tests, planned and checked by the trusted side before any candidate runs.

The test code is split into top-level statements: each statement that asserts
is one test and runs on its own, the others (imports, helpers, constants) are
setup. A HumanEval-style ``def check(candidate)`` is unrolled the same way with
``candidate`` bound to the entry point (loops and helper calls stay inside the
statement they belong to), and pytest-style ``def test_*()`` functions count
once each. The plan also lists the names the tests take from the solution.

The plan runs in the trusted test driver (``driver.py``), never in the
candidate's process, so every shape of test is graded the same unforgeable way;
``check_tests`` refuses, at task load, only tests that cannot mean anything:
code that does not parse, no assert at all, or ``check(candidate)`` without an
entry point to pass it.
"""

from __future__ import annotations

import ast
import builtins
import functools
from dataclasses import dataclass

from .code import quiet_parse


@dataclass(frozen=True)
class TestPlan:
    """Setup pieces and individually counted tests, in order.

    Attributes:
        pieces: ``(kind, source)`` with kind ``"setup"`` or ``"test"``.
        total: the number of tests.
        names: the names the tests take from the solution (the entry point, its classes ...).
    """

    __test__ = False  # not a pytest class

    pieces: tuple[tuple[str, str], ...]
    total: int
    names: tuple[str, ...]


def _asserts(node: ast.AST) -> bool:
    """Whether ``node`` asserts, not counting asserts inside nested defs."""
    if isinstance(node, ast.Assert):
        return True
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
        return False
    return any(_asserts(child) for child in ast.iter_child_nodes(node))


def _body_asserts(fn: ast.AST) -> bool:
    return any(_asserts(stmt) for stmt in fn.body)


def _called_names(body: list[ast.stmt]) -> set[str]:
    return {
        node.func.id
        for stmt in body
        for node in ast.walk(stmt)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }


def _unrollable(fn: ast.FunctionDef) -> bool:
    """Whether ``fn``'s body means the same when run statement by statement at top level."""
    if len(fn.args.args) != 1 or fn.args.vararg or fn.args.kwarg or fn.args.kwonlyargs:
        return False
    todo = list(fn.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Return, ast.Yield, ast.YieldFrom, ast.Await, ast.Nonlocal)):
            return False
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return True


def _free_names(module: ast.Module) -> set[str]:
    """Names the code reads but never binds anywhere (nor are built-ins): the solution's."""
    bound: set[str] = set()
    read: set[str] = set()
    for node in ast.walk(module):
        if isinstance(node, ast.Name):
            (bound if isinstance(node.ctx, (ast.Store, ast.Del)) else read).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound |= set(node.names)
    return read - bound - set(dir(builtins))


@functools.lru_cache(maxsize=1024)  # G completions a prompt, step after step: the same tests each time
def build_test_plan(tests: str, *, entry_point: str | None) -> TestPlan:
    """Split test code into setup pieces and individually counted tests.

    Args:
        tests: Python test code (top-level asserts, ``def check(candidate)``,
            ``def test_*()`` functions, any mix).
        entry_point: name of the solution's function, for ``check``.

    Returns:
        The plan; ``total`` is the number of tests.

    Raises:
        SyntaxError: the test code itself does not parse.
    """
    module = quiet_parse(tests)
    defs = [n for n in module.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    asserting = {node.name for node in defs if _body_asserts(node)}
    called = _called_names(module.body)
    pieces: list[tuple[str, str]] = []
    for stmt in module.body:
        is_test = _asserts(stmt) or (
            isinstance(stmt, ast.Expr)
            and isinstance(stmt.value, ast.Call)
            and isinstance(stmt.value.func, ast.Name)
            and stmt.value.func.id in asserting
        )
        pieces.append(("test" if is_test else "setup", ast.unparse(stmt)))
    for stmt in module.body:
        if not isinstance(stmt, ast.FunctionDef) or stmt.name in called:
            continue
        if stmt.name == "check" and entry_point:
            if _unrollable(stmt):
                arg = stmt.args.args[0].arg
                pieces.append(("setup", f"{arg} = {entry_point}"))
                pieces += [("test" if _asserts(s) else "setup", ast.unparse(s)) for s in stmt.body]
            else:
                pieces.append(("test", f"check({entry_point})"))
        elif stmt.name.startswith("test") and stmt.name in asserting and not stmt.args.args:
            pieces.append(("test", f"{stmt.name}()"))
    names = _free_names(module) | ({entry_point} if entry_point else set())
    return TestPlan(pieces=tuple(pieces), total=sum(kind == "test" for kind, _ in pieces), names=tuple(sorted(names)))


def check_tests(tests: str | None, *, entry_point: str | None) -> str | None:
    """Why a task's tests cannot grade anything, or None when they can (or there are none).

    Args:
        tests: the task's test code.
        entry_point: the solution's function name.

    Returns:
        A one-line reason: the tests do not parse, hold no assert, call ``check``
        without an entry point, or name an entry point that is not an identifier.
    """
    if not tests or not tests.strip():
        return None
    if entry_point is not None and not entry_point.isidentifier():
        return f"entry_point {entry_point!r} is not a Python name"
    try:
        plan = build_test_plan(tests, entry_point=entry_point)
    except SyntaxError as exc:
        return f"tests do not parse: {exc.msg} (line {exc.lineno} of the tests)"
    except (ValueError, RecursionError) as exc:
        return f"tests do not parse: {type(exc).__name__}"
    if plan.total == 0:
        module = quiet_parse(tests)
        if any(isinstance(s, ast.FunctionDef) and s.name == "check" for s in module.body) and not entry_point:
            return "tests define check(candidate) but the task has no entry_point to pass it"
        return "tests contain no assert (nothing to pass or fail)"
    return None
