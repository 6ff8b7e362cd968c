"""Offline graders: code extraction, static checks and unit tests, cheapest first.

``grade_many`` takes a batch of completions: ``code.extract_code`` ->
``code.static_check`` -> unit tests for those that parse (``unit_tests``, many
solutions per sandbox start). Every grade carries the same components
(``has_code``, ``parses``, ``tests``) and a ``kind`` set by the trusted side:

- ``no_code`` / ``syntax_error``: the static check failed (tests not run);
- ``no_tests``: the task has no tests, or they are not Python (not applicable);
- ``passed`` / ``failed`` / ``timed_out`` / ``crashed``: what the tests found;
- ``infrastructure``: the grader could not run; the sample is left unscored.

No decision reads error text: a completion can print anything, exit with any
status, and at most fail its own tests. ``suspect`` lists the ways its code
reaches for the grading surface (``suspect.py``): shown, never scored.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

from .code import extract_code, normalize_language, static_check
from .sandbox import SandboxLimits
from .suspect import suspect_reasons
from .test_plan import build_test_plan
from .unit_tests import INFRASTRUCTURE, TestOutcome, UnitTestJob, run_sessions

COMPONENTS = ("has_code", "parses", "tests")
"""Names of the reward components every grade carries."""

NO_CODE, SYNTAX_ERROR, NO_TESTS = "no_code", "syntax_error", "no_tests"
UNSCORED_KINDS = frozenset({INFRASTRUCTURE})
"""Kinds that mean "we could not judge": the sample is left out of the update, never given a score."""


@dataclass(frozen=True)
class GradeResult:
    """One completion's grade.

    ``components`` always has ``has_code``, ``parses`` and ``tests`` (fraction of
    tests passed; 0.0 when they did not run). ``kind`` says what happened (see
    the module docstring); ``suspect`` names what the code reaches for.
    """

    components: dict[str, float]
    kind: str
    error: str | None = None
    outcome: TestOutcome | None = None
    uid: str | None = None
    suspect: tuple[str, ...] = ()


@dataclass(frozen=True)
class GradeRequest:
    """A completion to grade, identified by ``uid`` (results are keyed by it).

    ``prelude``: code the prompt gave the solution (imports, helpers), run before it.
    """

    uid: str
    completion: str
    task_tests: str | None = None
    entry_point: str | None = None
    language: str = "python"
    prelude: str = ""


def grade_completion(
    *,
    completion: str,
    task_tests: str | None,
    entry_point: str | None,
    language: str,
    timeout_s: float = 10.0,
    limits: SandboxLimits | None = None,
    uid: str | None = None,
    prelude: str = "",
) -> GradeResult:
    """Grades one completion (see ``grade_many``, which grades a batch in fewer sandbox starts)."""
    request = GradeRequest(
        uid=uid or "completion",
        completion=completion,
        task_tests=task_tests,
        entry_point=entry_point,
        language=language,
        prelude=prelude,
    )
    result = grade_many([request], timeout_s=timeout_s, limits=limits)[request.uid]
    return result if uid is not None else GradeResult(**{**result.__dict__, "uid": None})


def grade_many(
    requests: Iterable[GradeRequest],
    *,
    max_workers: int = 4,
    timeout_s: float = 10.0,
    limits: SandboxLimits | None = None,
    python: str = sys.executable,
) -> dict[str, GradeResult]:
    """Grades many completions: static checks here, unit tests in sandbox sessions.

    Args:
        requests: the completions; ``uid`` values must be unique.
        max_workers: sandbox sessions running at once.
        timeout_s: each solution's budget for loading and all its tests.
        limits: sandbox resource limits.
        python: the interpreter for the sandbox and the test driver.

    Returns:
        Results keyed by request ``uid`` (never by completion order).

    Raises:
        ValueError: two requests share a uid.
    """
    requests = list(requests)
    uids = [r.uid for r in requests]
    if len(set(uids)) != len(uids):
        raise ValueError("grade_many: request uids must be unique")
    results: dict[str, GradeResult] = {}
    jobs: list[UnitTestJob] = []
    pending: dict[str, tuple[dict[str, float], tuple[str, ...]]] = {}
    for request in requests:
        code = extract_code(request.completion, language=request.language)
        check = static_check(code, language=request.language)
        components = {"has_code": check.has_code, "parses": check.parses, "tests": 0.0}
        suspect = suspect_reasons(code) if check.ok and _is_python(request.language) else ()
        if not check.ok:
            kind = NO_CODE if not check.has_code else SYNTAX_ERROR
            results[request.uid] = GradeResult(components, kind, error=check.reason, uid=request.uid)
        elif not request.task_tests or not request.task_tests.strip():
            results[request.uid] = GradeResult(components, NO_TESTS, uid=request.uid, suspect=suspect)
        elif not _is_python(request.language):
            results[request.uid] = GradeResult(
                components,
                NO_TESTS,
                error=f"tests are only run for Python, not {request.language!r}",
                uid=request.uid,
                suspect=suspect,
            )
        else:
            try:
                plan = build_test_plan(request.task_tests, entry_point=request.entry_point)
            except SyntaxError as exc:  # tasks are checked at load; one made by hand may still be broken
                results[request.uid] = GradeResult(
                    components, INFRASTRUCTURE, error=f"the task's tests do not parse: {exc.msg}", uid=request.uid
                )
                continue
            jobs.append(UnitTestJob(uid=request.uid, solution=code, plan=plan, prelude=request.prelude))
            pending[request.uid] = (components, suspect)
    outcomes = run_sessions(jobs, timeout_s=timeout_s, limits=limits, python=python, workers=max_workers)
    for uid, (components, suspect) in pending.items():
        outcome = outcomes[uid]
        components["tests"] = outcome.fraction
        if outcome.nonplain:
            suspect = (*suspect, "returned an object that is not plain data")
        results[uid] = GradeResult(
            components, outcome.kind, error=outcome.error, outcome=outcome, uid=uid, suspect=suspect
        )
    return {uid: results[uid] for uid in uids}


def _is_python(language: str) -> bool:
    return normalize_language(language) == "python"
