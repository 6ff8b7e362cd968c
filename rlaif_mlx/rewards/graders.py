"""Offline graders: code extraction, static checks and unit tests in the sandbox.

The grading is tiered, cheapest first: ``extract_code`` -> ``static_check`` ->
``run_unit_tests``. A completion that has no code or does not parse never
reaches the sandbox. Every grade carries the same components (``has_code``,
``parses``, ``tests``) so the reward combiner and the logs see a stable shape.

Unit tests give a dense reward: the task's test code is split into top-level
statements; each statement that asserts is one test and runs on its own, the
others (imports, helpers, constants) are setup. A HumanEval-style
``def check(candidate)`` is unrolled the same way with ``candidate`` bound to
the entry point, and pytest-style ``def test_*()`` functions each count once.

Results come back on the sandbox's dedicated result pipe, one JSON line per
event, each stamped with a nonce the harness reads from stdin before the
candidate runs. Output on stdout is never trusted, and a run that dies midway
keeps credit only for the tests that had already reported.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import secrets
import sys
import textwrap
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rlaif_mlx.rewards.sandbox import SandboxLimits, SandboxResult, run_sandboxed

_log = logging.getLogger(__name__)

COMPONENTS = ("has_code", "parses", "tests")
"""Names of the reward components every grade carries."""

_LANGUAGE_ALIASES = {
    "py": "python",
    "python3": "python",
    "py3": "python",
    "python2": "python",
    "js": "javascript",
    "node": "javascript",
    "jsx": "javascript",
    "ts": "typescript",
    "tsx": "typescript",
    "c++": "cpp",
    "cxx": "cpp",
    "cc": "cpp",
    "rs": "rust",
    "golang": "go",
    "sh": "bash",
    "shell": "bash",
    "zsh": "bash",
    "c#": "csharp",
    "cs": "csharp",
    "kt": "kotlin",
    "rb": "ruby",
}
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_MAX_FAILURES = 5


def normalize_language(name: str | None) -> str:
    """Canonical lower-case language name ("py" -> "python", "c++" -> "cpp").

    Args:
        name: a language name or fence info word; None or "" gives "".

    Returns:
        The canonical name.
    """
    word = (name or "").strip().lower().lstrip("{.").rstrip("}")
    return _LANGUAGE_ALIASES.get(word, word)


def extract_code(completion: str, *, language: str = "python") -> str | None:
    """The code in a model completion.

    Picks the first fenced block whose info string names ``language``, else
    the first block without an info string, else the first block. A fence
    that is never closed (the completion hit max tokens) runs to the end.
    Without any fence the whole completion is taken as code.

    Args:
        completion: the model's text.
        language: the language the task asks for.

    Returns:
        The code, dedented and stripped, or None when there is none.
    """
    want = normalize_language(language)
    blocks: list[tuple[str, list[str]]] = []
    open_fence: tuple[str, int] | None = None
    for line in (completion or "").splitlines():
        if open_fence is None:
            match = _FENCE.match(line)
            if match and not (match.group(1)[0] == "`" and "`" in match.group(2)):
                info = match.group(2).strip().split()
                blocks.append((normalize_language(info[0]) if info else "", []))
                open_fence = (match.group(1)[0], len(match.group(1)))
            continue
        match = _FENCE.match(line)
        char, size = open_fence
        if match and match.group(1)[0] == char and len(match.group(1)) >= size and not match.group(2).strip():
            open_fence = None
            continue
        blocks[-1][1].append(line)
    if not blocks:
        text = completion or ""
    else:
        chosen = (
            next((b for b in blocks if b[0] == want), None) or next((b for b in blocks if not b[0]), None) or blocks[0]
        )
        text = "\n".join(chosen[1])
    code = textwrap.dedent(text).strip()
    return code or None


@dataclass(frozen=True)
class StaticCheck:
    """Cheap checks on extracted code. ``reason`` says why ``ok`` is False."""

    ok: bool
    reason: str | None
    has_code: float
    parses: float


def static_check(code: str | None, *, language: str) -> StaticCheck:
    """Whether there is code at all and whether it parses.

    Python is compiled (which also catches ``return`` outside a function);
    other languages are not checked here: ``parses`` is 1 and only empty
    code fails.

    Args:
        code: output of ``extract_code``.
        language: the task's language.

    Returns:
        A ``StaticCheck``.
    """
    if not code or not code.strip():
        return StaticCheck(ok=False, reason="empty", has_code=0.0, parses=0.0)
    if normalize_language(language) != "python":
        return StaticCheck(ok=True, reason=None, has_code=1.0, parses=1.0)
    try:
        compile(code, "<solution>", "exec", dont_inherit=True)
    except SyntaxError as exc:
        where = f" (line {exc.lineno})" if exc.lineno else ""
        return StaticCheck(ok=False, reason=f"syntax error: {exc.msg}{where}", has_code=1.0, parses=0.0)
    except (ValueError, RecursionError, MemoryError, OverflowError) as exc:
        return StaticCheck(ok=False, reason=f"syntax error: {type(exc).__name__}: {exc}", has_code=1.0, parses=0.0)
    return StaticCheck(ok=True, reason=None, has_code=1.0, parses=1.0)


@dataclass(frozen=True)
class TestOutcome:
    """Result of running a task's unit tests against one solution.

    ``total`` is counted by the grader from the test code, never by the
    sandboxed process. ``failures`` holds the first few failure messages.
    """

    __test__ = False  # not a pytest class

    passed: int
    total: int
    fraction: float
    error: str | None
    timed_out: bool
    failures: tuple[str, ...] = ()


@dataclass(frozen=True)
class _TestPlan:
    pieces: tuple[tuple[str, str], ...]  # (kind "setup" | "test", source)
    total: int


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


def build_test_plan(tests: str, *, entry_point: str | None) -> _TestPlan:
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
    module = ast.parse(tests)
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
    return _TestPlan(pieces=tuple(pieces), total=sum(kind == "test" for kind, _ in pieces))


# Runs inside the sandbox as main.py. Everything lives in function locals so
# the candidate (exec'd in its own module namespace) cannot reach it by name.
_HARNESS = (Path(__file__).parent / "harness.py").read_text()


def run_unit_tests(
    code: str,
    tests: str,
    *,
    entry_point: str | None = None,
    timeout_s: float = 10.0,
    limits: SandboxLimits | None = None,
    per_test_timeout_s: float | None = None,
    python: str = sys.executable,
) -> TestOutcome:
    """Run Python unit tests against a solution in the sandbox.

    Args:
        code: the solution's source.
        tests: the task's test code (see ``build_test_plan``).
        entry_point: the solution function that ``check(candidate)`` receives.
        timeout_s: wall-clock limit for the whole run.
        limits: sandbox resource limits.
        per_test_timeout_s: limit for loading the solution and for each test;
            defaults to half of ``timeout_s`` so one hung test leaves time for
            the others.
        python: interpreter for the sandbox.

    Returns:
        A ``TestOutcome``: ``fraction = passed / total``. A run that dies or
        times out keeps only the tests that reported before; its ``error``
        says what happened.
    """
    if entry_point is not None and not entry_point.isidentifier():
        return TestOutcome(0, 0, 0.0, f"the task's entry point {entry_point!r} is not a name", False)
    try:
        plan = build_test_plan(tests, entry_point=entry_point)
    except SyntaxError as exc:
        return TestOutcome(0, 0, 0.0, f"the task's tests do not parse: {exc.msg}", False)
    if plan.total == 0:
        return TestOutcome(0, 0, 0.0, "the task's tests contain no assert", False)
    nonce = secrets.token_hex(16)
    payload = {
        "solution": code,
        "pieces": plan.pieces,
        "per_test_timeout_s": per_test_timeout_s or max(timeout_s / 2, 0.1),
    }
    result = run_sandboxed(
        _HARNESS,
        stdin=nonce + "\n",
        timeout_s=timeout_s,
        limits=limits,
        python=python,
        extra_files={"payload.json": json.dumps(payload)},
    )
    return _outcome(result, nonce=nonce, total=plan.total)


def _outcome(result: SandboxResult, *, nonce: str, total: int) -> TestOutcome:
    """Turn the channel's nonce-stamped events into a TestOutcome."""
    events = []
    for line in result.channel.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("nonce") == nonce:
            events.append(event)
    kinds = {e.get("event") for e in events}
    results: dict[int, dict] = {}
    for e in events:
        index = e.get("index")
        if e.get("event") == "test" and isinstance(index, int) and 0 <= index < total:
            results.setdefault(index, e)  # first report wins
    passed = sum(1 for e in results.values() if e.get("ok") is True)
    failures = tuple(str(e.get("error")) for e in results.values() if not e.get("ok"))
    timed_out = result.timed_out or any(e.get("timeout") for e in events)
    error = None
    if "solution_error" in kinds:
        err = next(e for e in events if e.get("event") == "solution_error")
        error = f"solution failed to load: {err.get('error')}"
    elif "done" not in kinds:
        if "loaded" not in kinds:
            what = "exited before tests ran"
        else:
            what = f"stopped after {len(results)} of {total} tests"
        why = result.killed_reason or f"exit code {result.returncode}"
        error = f"{what} ({why})"
        if result.stderr.strip():
            error += ": " + result.stderr.strip().splitlines()[-1][:200]
    elif passed < total:
        setup = [e.get("error") for e in events if e.get("event") == "setup_error"]
        error = f"{total - passed} of {total} tests failed"
        if setup:
            error += f" (test setup failed: {setup[0]})"
    return TestOutcome(
        passed=passed,
        total=total,
        fraction=passed / total,
        error=error,
        timed_out=bool(timed_out),
        failures=failures[:_MAX_FAILURES],
    )


@dataclass(frozen=True)
class GradeResult:
    """One completion's grade.

    ``components`` always has ``has_code``, ``parses`` and ``tests`` (fraction
    of tests passed; 0.0 when skipped). ``tests_skipped`` gives the reason
    when the tests did not run (static check failed, task has no tests,
    language not executable), so a combiner can tell "skipped" from "failed".
    """

    components: dict[str, float]
    error: str | None = None
    tests_skipped: str | None = None
    outcome: TestOutcome | None = None
    uid: str | None = None


@dataclass(frozen=True)
class GradeRequest:
    """A completion to grade, identified by ``uid`` (results are keyed by it)."""

    uid: str
    completion: str
    task_tests: str | None = None
    entry_point: str | None = None
    language: str = "python"


def grade_completion(
    *,
    completion: str,
    task_tests: str | None,
    entry_point: str | None,
    language: str,
    timeout_s: float = 10.0,
    limits: SandboxLimits | None = None,
    uid: str | None = None,
) -> GradeResult:
    """Grade one completion: extract, static check, then (Python) unit tests.

    Args:
        completion: the model's text.
        task_tests: the task's test code, or None.
        entry_point: solution function name for ``check(candidate)`` tests.
        language: the task's language.
        timeout_s: sandbox wall-clock limit.
        limits: sandbox resource limits.
        uid: copied into the result.

    Returns:
        A ``GradeResult``. Tests run only when the static check passes.
    """
    code = extract_code(completion, language=language)
    check = static_check(code, language=language)
    components = {"has_code": check.has_code, "parses": check.parses, "tests": 0.0}
    if not check.ok:
        return GradeResult(
            components, error=check.reason, uid=uid, tests_skipped=f"static check failed: {check.reason}"
        )
    if not task_tests or not task_tests.strip():
        return GradeResult(components, tests_skipped="task has no tests", uid=uid)
    if normalize_language(language) != "python":
        return GradeResult(components, uid=uid, tests_skipped=f"tests are only run for Python, not {language!r}")
    outcome = run_unit_tests(code, task_tests, entry_point=entry_point, timeout_s=timeout_s, limits=limits)
    components["tests"] = outcome.fraction
    return GradeResult(components, error=outcome.error, outcome=outcome, uid=uid)


def grade_many(
    requests: Iterable[GradeRequest],
    *,
    max_workers: int = 4,
    timeout_s: float = 10.0,
    limits: SandboxLimits | None = None,
) -> dict[str, GradeResult]:
    """Grade many completions concurrently.

    Args:
        requests: the completions; ``uid`` values must be unique.
        max_workers: sandboxes running at once.
        timeout_s: sandbox wall-clock limit per completion.
        limits: sandbox resource limits.

    Returns:
        Results keyed by request ``uid`` (never by completion order). A
        grader crash becomes a result with ``error`` set, not an exception.

    Raises:
        ValueError: two requests share a uid.
    """
    requests = list(requests)
    uids = [r.uid for r in requests]
    if len(set(uids)) != len(uids):
        raise ValueError("grade_many: request uids must be unique")

    def grade(request: GradeRequest) -> GradeResult:
        try:
            return grade_completion(
                completion=request.completion,
                task_tests=request.task_tests,
                entry_point=request.entry_point,
                language=request.language,
                timeout_s=timeout_s,
                limits=limits,
                uid=request.uid,
            )
        except Exception as exc:  # an event with a message, not a lost batch
            _log.exception("grader failed for %s", request.uid)
            return GradeResult(
                dict.fromkeys(COMPONENTS, 0.0),
                uid=request.uid,
                error=f"grader failed: {type(exc).__name__}: {exc}",
                tests_skipped="grader failed",
            )

    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        futures = {r.uid: pool.submit(grade, r) for r in requests}
        return {uid: future.result() for uid, future in futures.items()}
