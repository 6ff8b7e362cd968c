"""Unit tests run against candidates, with pass or fail decided outside the candidate's process.

A session is two processes, joined by a pipe one way and a message socket the other:

- the **host** (``host.py``), inside the sandbox, forks one fresh process per
  solution and hands the driver that process's two pipe ends; it never sees a test;
- the **driver** (``driver.py``, ``driver_link.py``), outside the sandbox, runs the
  task's tests (see ``test_plan``) with the solution's names bound to stand-ins
  that call the solution's process and decode the answers as plain data (``wire.py``).

Only the driver's verdicts count, and only this process reads them: nothing
the candidate prints, writes or exits with can pass a test. Sessions are kept
warm across batches (``grader_pool``): one sandbox start serves batch after
batch, the host ends each solution's processes and files before the next, and a
session a solution brought down is replaced. Each verdict carries a kind set here:
``passed``, ``failed``, ``timed_out``, ``crashed``, or ``infrastructure`` when the
sandbox or the driver could not run at all, before any candidate code ran.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from .grader_pool import pool_for
from .sandbox import SandboxLimits
from .test_plan import TestPlan, build_test_plan

PASSED, FAILED, TIMED_OUT, CRASHED, INFRASTRUCTURE = "passed", "failed", "timed_out", "crashed", "infrastructure"


@dataclass(frozen=True)
class TestOutcome:
    """Result of running a task's unit tests against one solution.

    ``total`` is counted by the trusted side from the test code. ``kind`` is one of
    ``passed``, ``failed``, ``timed_out``, ``crashed`` (the solution's process died,
    exited early or did not load) and ``infrastructure`` (the grader could not run;
    the sample is left unscored). ``failures`` holds the first few failure messages.
    ``nonplain``: some call returned an object that is not plain data.
    """

    __test__ = False  # not a pytest class

    passed: int
    total: int
    fraction: float
    error: str | None
    timed_out: bool
    failures: tuple[str, ...] = ()
    kind: str = FAILED
    nonplain: bool = False


@dataclass(frozen=True)
class UnitTestJob:
    """One solution to test: ``uid`` keys the result; ``prelude`` is code the prompt gave it."""

    uid: str
    solution: str
    plan: TestPlan
    prelude: str = ""


def run_unit_tests(
    code: str,
    tests: str,
    *,
    entry_point: str | None = None,
    timeout_s: float = 10.0,
    limits: SandboxLimits | None = None,
    per_test_timeout_s: float | None = None,
    python: str = sys.executable,
    prelude: str = "",
) -> TestOutcome:
    """Runs Python unit tests against one solution (see ``run_sessions`` for many).

    Args:
        code: the solution's source.
        tests: the task's test code (see ``test_plan.build_test_plan``).
        entry_point: the solution function that ``check(candidate)`` receives.
        timeout_s: the solution's whole budget (loading and every test).
        limits: sandbox resource limits.
        per_test_timeout_s: limit for loading and for each test; default half of ``timeout_s``.
        python: the interpreter for both sides.
        prelude: code given with the prompt (imports, helpers), run before the solution.
    """
    if entry_point is not None and not entry_point.isidentifier():
        return TestOutcome(
            0, 0, 0.0, f"the task's entry point {entry_point!r} is not a name", False, kind=INFRASTRUCTURE
        )
    try:
        plan = build_test_plan(tests, entry_point=entry_point)
    except SyntaxError as exc:
        return TestOutcome(0, 0, 0.0, f"the task's tests do not parse: {exc.msg}", False, kind=INFRASTRUCTURE)
    job = UnitTestJob(uid="solution", solution=code, plan=plan, prelude=prelude)
    return run_sessions(
        [job], timeout_s=timeout_s, limits=limits, per_test_timeout_s=per_test_timeout_s, python=python
    )["solution"]


def run_sessions(
    jobs: list[UnitTestJob],
    *,
    timeout_s: float = 10.0,
    limits: SandboxLimits | None = None,
    per_test_timeout_s: float | None = None,
    python: str = sys.executable,
    workers: int = 1,
) -> dict[str, TestOutcome]:
    """Tests many solutions on up to ``workers`` warm sessions at a time (see ``grader_pool``).

    Returns:
        uid -> outcome, for every job.
    """
    limits = limits or SandboxLimits()
    per_test = per_test_timeout_s or max(timeout_s / 2, 0.1)
    cpu = limits.cpu_seconds or math.ceil(timeout_s) + 1
    out: dict[str, TestOutcome] = {}
    by_uid: dict[str, UnitTestJob] = {}
    payloads = []
    for job in jobs:
        if job.plan.total == 0:
            out[job.uid] = TestOutcome(0, 0, 0.0, "the task's tests contain no assert", False, kind=INFRASTRUCTURE)
            continue
        by_uid[job.uid] = job
        payloads.append(
            {
                "uid": job.uid,
                "prelude": job.prelude,
                "solution": job.solution,
                "pieces": job.plan.pieces,
                "names": list(job.plan.names),
                "timeout": timeout_s,
                "per_test": per_test,
                "cpu": cpu,
            }
        )
    if payloads:
        pool = pool_for(python, limits)
        budgets = {p["uid"]: timeout_s for p in payloads}
        for payload, verdict, problem, stopped in pool.grade(payloads, budgets, workers=workers):
            job = by_uid[payload["uid"]]
            out[job.uid] = _outcome_of(job, verdict, problem, stopped)
    return out


def _outcome_of(job: UnitTestJob, verdict: dict | None, problem: str | None, stopped: bool) -> TestOutcome:
    """The driver's verdict as an outcome; no verdict is the grader's failure, never the solution's."""
    total = job.plan.total
    if verdict is None:
        reason = problem or "the grader ended before this solution ran"
        return TestOutcome(0, total, 0.0, reason, False, kind=INFRASTRUCTURE)
    if verdict.get("host_gone"):  # the host went down while this solution's code ran
        kind = TIMED_OUT if stopped else CRASHED
        why = "timed out" if stopped else "the sandbox's host process died"
        return TestOutcome(0, total, 0.0, f"stopped: {why} while this solution ran", stopped, kind=kind)
    try:
        passed = min(int(verdict["passed"]), total)
        return _outcome(verdict, passed, total)
    except (KeyError, TypeError, ValueError) as exc:
        return TestOutcome(
            0, total, 0.0, f"the test driver failed: a malformed verdict ({exc})", False, kind=INFRASTRUCTURE
        )


def _outcome(verdict: dict, passed: int, total: int) -> TestOutcome:
    failures = tuple(str(f) for f in verdict["failures"])
    if passed == total:
        kind, error = PASSED, None
    elif verdict["load_error"]:
        kind = TIMED_OUT if verdict["timed_out"] and not verdict["crashed"] else CRASHED
        error = f"solution failed to load: {verdict['load_error']}"
    else:
        kind = CRASHED if verdict["crashed"] else TIMED_OUT if verdict["timed_out"] else FAILED
        error = f"{total - passed} of {total} tests failed" + (f": {failures[0]}" if failures else "")
    return TestOutcome(
        passed=passed,
        total=total,
        fraction=passed / total,
        error=error,
        timed_out=bool(verdict["timed_out"]),
        failures=failures,
        kind=kind,
        nonplain=bool(verdict["nonplain"]),
    )
