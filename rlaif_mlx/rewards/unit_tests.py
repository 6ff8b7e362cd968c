"""Unit tests run against candidates, with pass or fail decided outside the candidate's process.

A session is two processes joined by two pipes:

- the **host** (``host.py``), inside the sandbox, forks one fresh process per
  solution and serves its functions; it never sees a test;
- the **driver** (``driver.py``), outside the sandbox, runs the task's tests
  (see ``test_plan``) with the solution's names bound to stand-ins that call
  into the host and decode the answers as plain data (``wire.py``).

Only the driver's verdicts count, and only this process reads them: nothing
the candidate prints, writes or exits with can pass a test. A session grades
many solutions (one sandbox start for all of them); when a solution brings the
host down, it is failed (it crashed) and the solutions after it are graded
again alone. Each verdict carries a kind set here: ``passed``, ``failed``,
``timed_out``, ``crashed``, or ``infrastructure`` when the sandbox or the
driver could not run at all, before any candidate code ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .sandbox import SandboxLimits, SandboxResult
from .sandbox_modes import select_mode
from .sandbox_process import run_mode
from .test_plan import TestPlan, build_test_plan

_HERE = Path(__file__).parent
_WIRE = (_HERE / "wire.py").read_text()
HOST = _WIRE + "\n" + (_HERE / "host.py").read_text()
DRIVER = _WIRE + "\n" + (_HERE / "driver.py").read_text()
_STARTUP_S = 10.0  # sandbox and driver start-up, on top of the solutions' own budgets

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
    session_size: int = 64,
    workers: int = 1,
) -> dict[str, TestOutcome]:
    """Tests many solutions, spread over ``workers`` sessions at a time of at most ``session_size`` each.

    Returns:
        uid -> outcome, for every job.
    """
    limits = limits or SandboxLimits()
    per_test = per_test_timeout_s or max(timeout_s / 2, 0.1)
    out: dict[str, TestOutcome] = {}
    empty = [job for job in jobs if job.plan.total == 0]
    for job in empty:
        out[job.uid] = TestOutcome(0, 0, 0.0, "the task's tests contain no assert", False, kind=INFRASTRUCTURE)
    todo = [job for job in jobs if job.plan.total > 0]
    # One sandbox start per worker when the batch allows: starts cost more than a solution's tests.
    size = max(1, min(session_size, -(-len(todo) // max(workers, 1))))
    chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
    if chunks:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(chunks)))) as pool:
            for results in pool.map(lambda c: _session_with_retries(c, timeout_s, per_test, limits, python), chunks):
                out.update(results)
    return out


def _session_with_retries(jobs, timeout_s, per_test, limits, python) -> dict[str, TestOutcome]:
    """One session; the solutions after one that brought the host down are graded again, alone.

    A solution no session could grade (the sandbox or the driver failed before it ran) is an
    infrastructure failure: left unscored, never a score.
    """
    out, problem = _session(jobs, timeout_s, per_test, limits, python)
    rest = [job for job in jobs if job.uid not in out]
    if rest and out and len(jobs) > 1:
        for job in rest:  # alone, so no other solution can take them down
            single, problem = _session([job], timeout_s, per_test, limits, python)
            out.update(single)
    for job in jobs:
        if job.uid not in out:
            reason = problem or "the grader ended before this solution ran"
            out[job.uid] = TestOutcome(0, job.plan.total, 0.0, reason, False, kind=INFRASTRUCTURE)
    return out


def _session(jobs, timeout_s, per_test, limits, python) -> tuple[dict[str, TestOutcome], str | None]:
    """Runs one host and one driver over ``jobs``; the verdicts it got, and what went wrong, if anything."""
    payload = json.dumps(
        [
            {
                "uid": j.uid,
                "prelude": j.prelude,
                "solution": j.solution,
                "pieces": j.plan.pieces,
                "names": list(j.plan.names),
                "timeout": timeout_s,
                "per_test": per_test,
            }
            for j in jobs
        ]
    )
    budget = timeout_s * len(jobs) + _STARTUP_S
    mode = select_mode(python)
    to_host_r, to_host_w = os.pipe()
    to_driver_r, to_driver_w = os.pipe()
    try:
        driver = subprocess.Popen(
            [python, "-I", "-B", "-c", DRIVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(to_host_w, to_driver_r),
            start_new_session=True,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "LANG": "C.UTF-8",
                "PYTHONHASHSEED": "0",
                "RLAIF_RPC_OUT": str(to_host_w),
                "RLAIF_RPC_IN": str(to_driver_r),
            },
        )
    except OSError as exc:  # e.g. EAGAIN: no process could be started
        for fd in (to_host_r, to_host_w, to_driver_r, to_driver_w):
            os.close(fd)
        return {}, f"the test driver could not start: {exc}"
    os.close(to_host_w)
    os.close(to_driver_r)
    streams: dict[str, bytes] = {}
    helpers = [
        threading.Thread(target=_feed, args=(driver, payload), daemon=True),
        threading.Thread(target=_drain, args=(driver.stdout, streams, "stdout"), daemon=True),
        threading.Thread(target=_drain, args=(driver.stderr, streams, "stderr"), daemon=True),
    ]
    for helper in helpers:
        helper.start()
    try:
        result = run_mode(
            HOST,
            mode=mode,
            stdin="",
            timeout_s=budget,
            limits=limits,
            python=python,
            extra_files=None,
            pass_fds={"RLAIF_RPC_IN": to_host_r, "RLAIF_RPC_OUT": to_driver_w},
            env={"RLAIF_PID_NAMESPACE": "1" if mode.pid_namespace else "0"},
        )
    except OSError as exc:
        driver.kill()
        driver.wait()
        return {}, f"the sandbox could not start: {exc}"
    try:
        driver.wait(timeout=_STARTUP_S + timeout_s)
    except subprocess.TimeoutExpired:
        driver.kill()
        driver.wait()
    for helper in helpers:
        helper.join()
    verdicts, errors = _verdicts(streams.get("stdout", b""), jobs, result)
    problem = _problem(result, driver.returncode, streams.get("stderr", b"")) or next(iter(errors.values()), None)
    return verdicts, problem


def _drain(stream, into: dict[str, bytes], name: str, cap: int = 1 << 20) -> None:
    """Reads a pipe to its end, keeping the first ``cap`` bytes (the tests may print)."""
    kept = bytearray()
    for chunk in iter(lambda: stream.read(65536), b""):
        kept += chunk[: max(cap - len(kept), 0)]
    stream.close()
    into[name] = bytes(kept)


def _feed(driver: subprocess.Popen, payload: str) -> None:
    try:
        driver.stdin.write(payload.encode())
        driver.stdin.close()
    except OSError:  # the driver is gone; its missing verdicts say so
        pass


def _problem(result: SandboxResult, driver_rc: int | None, driver_stderr: bytes) -> str | None:
    """What kept the session from grading, from the trusted side's view (never the candidate's output)."""
    if result.killed_reason and result.killed_reason.startswith("sandbox "):
        return result.killed_reason  # the supervisor's own status: setup or exec failed
    if driver_rc not in (0, None):
        tail = driver_stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        return f"the test driver failed (exit {driver_rc}): {tail[0][:200]}"
    return None


def _verdicts(
    stdout: bytes, jobs: list[UnitTestJob], result: SandboxResult
) -> tuple[dict[str, TestOutcome], dict[str, str]]:
    """The driver's verdicts as outcomes, and its own errors by uid (a solution it could not grade)."""
    by_uid = {job.uid: job for job in jobs}
    out: dict[str, TestOutcome] = {}
    errors: dict[str, str] = {}
    for line in stdout.decode("utf-8", "replace").splitlines():
        try:
            verdict = json.loads(line)
            job = by_uid[verdict["uid"]]
        except (ValueError, KeyError, TypeError):
            continue
        total = job.plan.total
        if verdict.get("host_gone"):  # the host went down while this solution's code ran
            kind = TIMED_OUT if result.timed_out else CRASHED
            why = "timed out" if result.timed_out else "the sandbox's host process died"
            out[job.uid] = TestOutcome(
                0, total, 0.0, f"stopped: {why} while this solution ran", result.timed_out, kind=kind
            )
            continue
        if "driver_error" in verdict:
            errors[job.uid] = f"the test driver failed: {str(verdict['driver_error'])[:200]}"
            continue
        passed = min(int(verdict["passed"]), total)
        out[job.uid] = _outcome(verdict, passed, total)
    return out, errors


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
