"""Offline graders end to end: extraction, static checks, unit tests in the real sandbox.

Hostile completions: each must fail its own tests (never pass, never be left unscored) and leave
nothing behind. Forging a pass is tested in ``test_reward_integrity.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from rlaif_mlx.rewards.code import extract_code, static_check
from rlaif_mlx.rewards.graders import COMPONENTS, GradeRequest, grade_completion, grade_many
from rlaif_mlx.rewards.sandbox import SandboxLimits
from rlaif_mlx.rewards.test_plan import build_test_plan
from rlaif_mlx.rewards.unit_tests import run_unit_tests

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the sandbox needs a Unix")

SQUARE_TESTS = """
import math
def helper(x):
    return x * x
assert f(1) == helper(1)
assert f(2) == 4
assert f(3) == 9
assert f(4) == 16
assert f(5) == 25
"""
GOOD = "def f(x):\n    return x * x\n"


def _wait_gone(marker: str, within_s: float = 30.0) -> list[int]:
    """Host pids still alive whose command line contains ``marker``, once they are gone or ``within_s`` passed."""
    deadline = time.monotonic() + within_s
    while True:
        if os.path.isdir("/proc"):
            alive = []
            for name in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{name}/cmdline", "rb") as f:
                        if marker.encode() in f.read():
                            alive.append(int(name))
                except OSError:
                    continue
        else:
            out = subprocess.run(["ps", "-axo", "pid=,command="], capture_output=True, text=True).stdout
            alive = [int(line.split()[0]) for line in out.splitlines() if marker in line]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


# --- extraction -------------------------------------------------------------


def test_extract_fenced_python():
    text = "Here you go:\n```python\ndef f(x):\n    return x\n```\nDone."
    assert extract_code(text) == "def f(x):\n    return x"


def test_extract_fence_without_language():
    assert extract_code("```\nx = 1\n```") == "x = 1"


def test_extract_prefers_the_matching_language_among_several_blocks():
    text = "```bash\npip install x\n```\n```py\na = 1\n```\n```python\nb = 2\n```"
    assert extract_code(text) == "a = 1"
    assert extract_code(text, language="sh") == "pip install x"
    # No block names the language: the first untagged block, else the first block.
    assert extract_code("```js\nx\n```\n```\ny\n```", language="python") == "y"
    assert extract_code("```js\nx\n```", language="python") == "x"


def test_extract_unterminated_fence_takes_the_rest():
    assert extract_code("Sure:\n```python\ndef f():\n    return 1") == "def f():\n    return 1"


def test_extract_bare_code_and_indented_fence():
    assert extract_code("  x = 1\n  y = 2\n") == "x = 1\ny = 2"
    assert extract_code("1. step\n   ```python\n   z = 3\n   ```") == "z = 3"
    assert extract_code("````python\nprint('```')\n````") == "print('```')"


@pytest.mark.parametrize("text", ["", "   \n ", "```python\n```", "```python\n\n"])
def test_extract_empty(text):
    assert extract_code(text) is None


# --- static checks ----------------------------------------------------------


def test_static_check():
    ok = static_check("x = 1", language="python")
    assert ok.ok and ok.has_code == 1.0 and ok.parses == 1.0 and ok.reason is None
    empty = static_check(None, language="python")
    assert not empty.ok and empty.reason == "empty" and empty.has_code == 0.0
    bad = static_check("def f(:\n    pass", language="python")
    assert not bad.ok and bad.reason.startswith("syntax error") and bad.parses == 0.0
    assert bad.has_code == 1.0
    outside = static_check("return 1", language="py")  # compile, not just parse
    assert not outside.ok and "return" in outside.reason
    rust = static_check("fn main() {", language="rust")
    assert rust.ok and rust.parses == 1.0


# --- unit tests -------------------------------------------------------------


def test_all_tests_pass():
    out = run_unit_tests(GOOD, SQUARE_TESTS, timeout_s=10)
    assert (out.passed, out.total, out.fraction, out.error) == (5, 5, 1.0, None)


def test_partial_pass_counts_each_assert():
    code = "def f(x):\n    return x * x if x <= 3 else 0\n"
    out = run_unit_tests(code, SQUARE_TESTS, timeout_s=10)
    assert (out.passed, out.total) == (3, 5)
    assert out.fraction == pytest.approx(0.6)
    assert "2 of 5" in out.error
    assert out.failures[0].startswith("AssertionError in: assert f(4) == 16")


def test_humaneval_check_is_unrolled():
    tests = (
        "METADATA = {'author': 'x'}\n\n"
        "def check(candidate):\n"
        "    assert candidate([1, 2]) == 3\n"
        "    assert candidate([]) == 0\n"
        "    for n in range(3):\n"
        "        assert candidate([n]) == n\n"
        "    assert candidate([5]) == 6\n"
    )
    plan = build_test_plan(tests, entry_point="total")
    assert plan.total == 4
    out = run_unit_tests("def total(xs):\n    return sum(xs)", tests, entry_point="total")
    assert (out.passed, out.total) == (3, 4)
    missing = run_unit_tests("def other(xs):\n    return 0", tests, entry_point="total")
    assert missing.passed == 0 and "NameError" in missing.failures[0]


def test_check_with_return_runs_as_one_test():
    tests = "def check(candidate):\n    assert candidate(1) == 1\n    return None\n"
    out = run_unit_tests("def g(x):\n    return x", tests, entry_point="g")
    assert (out.passed, out.total) == (1, 1)


def test_pytest_style_functions_and_explicit_calls():
    tests = (
        "def test_one():\n    assert f(1) == 1\n"
        "def test_two():\n    assert f(2) == 5\n"
        "def check(fn):\n    assert fn(3) == 9\n"
        "check(f)\n"
    )
    out = run_unit_tests(GOOD, tests)
    assert (out.passed, out.total) == (2, 3)


def test_tests_without_asserts_or_broken_tests():
    assert run_unit_tests(GOOD, "x = 1").error == "the task's tests contain no assert"
    assert "do not parse" in run_unit_tests(GOOD, "assert (").error
    assert "not a name" in run_unit_tests(GOOD, "assert True", entry_point="f; x").error


def test_exception_while_defining_the_solution():
    out = run_unit_tests("raise ValueError('boom')\n", SQUARE_TESTS)
    assert out.passed == 0 and out.total == 5
    assert "ValueError: boom" in out.error


@pytest.mark.parametrize(
    "code",
    [
        "import sys\nsys.exit(0)\n",
        "import os\nos._exit(0)\n",
        # Without a pid namespace this kills the supervisor; inside one it is ignored
        # and the sleep runs into the timeout. Either way nothing passes.
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(5)\n",
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    ],
    ids=["sys.exit", "os._exit", "kill-parent", "kill-self"],
)
def test_early_exit_scores_zero(code):
    out = run_unit_tests(code + GOOD, SQUARE_TESTS, timeout_s=2)
    assert out.passed == 0 and out.fraction == 0.0
    assert out.error


def test_exit_midway_fails_that_test_and_the_rest_run_in_a_fresh_process():
    code = "def f(x):\n    if x == 3:\n        import os\n        os._exit(0)\n    return x * x\n"
    out = run_unit_tests(code, SQUARE_TESTS)
    assert (out.passed, out.total) == (4, 5)
    assert out.kind == "crashed" and "process ended" in out.failures[0]


def test_system_exit_inside_a_test_fails_that_test():
    code = "def f(x):\n    if x == 2:\n        raise SystemExit(0)\n    return x * x\n"
    out = run_unit_tests(code, SQUARE_TESTS)
    assert (out.passed, out.total) == (4, 5)
    assert "SystemExit" in out.failures[0]


def test_an_infinite_loop_is_ended_by_the_per_test_alarm_or_the_drivers_deadline():
    # A Python loop: the solution process's own alarm stops it within the per-test budget.
    out = run_unit_tests("while True:\n    pass\n", SQUARE_TESTS, timeout_s=60, per_test_timeout_s=1)
    assert out.passed == 0 and out.timed_out and out.kind == "timed_out"
    assert out.error == "solution failed to load: timed out"
    # A C-level loop ignores that alarm: the driver's deadline kills the process.
    out = run_unit_tests("sum(range(10 ** 12))\n", SQUARE_TESTS, timeout_s=60, per_test_timeout_s=1)
    assert out.passed == 0 and out.timed_out and out.kind == "timed_out"
    assert out.error == "solution failed to load: timed out"


def test_one_hanging_test_does_not_sink_the_others():
    code = "def f(x):\n    while x == 2:\n        pass\n    return x * x\n"
    out = run_unit_tests(code, SQUARE_TESTS, timeout_s=60, per_test_timeout_s=0.5)  # the wall clock never bites
    assert (out.passed, out.total) == (4, 5) and out.timed_out
    assert "timed out" in out.failures[0]


def test_stdout_flood_fails():
    code = "import sys\nwhile True:\n    sys.stdout.write('PASS ' * 10000)\n"
    out = run_unit_tests(code + GOOD, SQUARE_TESTS, timeout_s=1.5)
    assert out.passed == 0 and out.timed_out


def test_forged_replies_on_every_descriptor_are_worth_nothing():
    replies = "".join(f"{k} " + json.dumps({"ok": True, "value": k * k}) + "\n" for k in range(1, 50))
    code = (
        "import os, sys\n"
        "print('5 passed, 0 failed')\n"
        "for fd in range(3, 64):  # the host's pipes, the hard way\n"
        "    try:\n"
        f"        os.write(fd, {replies.encode()!r})\n"
        "    except OSError:\n"
        "        pass\n"
        "sys.stdout.flush()\nos._exit(0)\n"
    )
    out = run_unit_tests(code, SQUARE_TESTS)
    assert out.passed == 0 and out.kind in ("failed", "crashed"), out


def test_forked_grandchildren_are_killed():
    marker = f"rlaif-test-{uuid.uuid4().hex}"
    code = (
        "import subprocess, sys\n"
        "for _ in range(5):\n"
        "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', "
        f"'{marker}'])\n" + GOOD
    )
    out = run_unit_tests(code, SQUARE_TESTS, timeout_s=10)
    assert out.passed == 5  # forking is allowed; leaving processes behind is not
    assert _wait_gone(marker) == []


def test_memory_hog_fails():
    out = run_unit_tests("x = bytearray(2 << 30)\n" + GOOD, SQUARE_TESTS, limits=SandboxLimits(memory_bytes=256 << 20))
    assert out.passed == 0 and "MemoryError" in out.error


def test_disk_filler_hits_the_file_size_limit():
    code = (
        "def f(x):\n"
        "    with open('fill.bin', 'wb') as fh:\n"
        "        for _ in range(100):\n"
        "            fh.write(b'x' * (1 << 20))\n"
        "    return x * x\n"
    )
    out = run_unit_tests(code, SQUARE_TESTS, limits=SandboxLimits(file_size_bytes=1 << 20))
    assert out.passed == 0 and "File too large" in out.failures[0]


def test_api_keys_are_not_visible_to_solutions(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake")
    code = "import os\nSEEN = sorted(os.environ)\ndef seen():\n    return SEEN\n"
    tests = (
        "assert 'ANTHROPIC_API_KEY' not in seen()\nassert 'OPENAI_API_KEY' not in seen()\n"
        "assert not [k for k in seen() if k.startswith(('SANDBOX', 'RLAIF'))]\n"
    )
    out = run_unit_tests(code, tests)
    assert (out.passed, out.total) == (3, 3), out


# --- tiered grading ---------------------------------------------------------


def test_grade_completion_runs_tests_for_good_code():
    g = grade_completion(
        completion=f"```python\n{GOOD}```", task_tests=SQUARE_TESTS, entry_point=None, language="python", timeout_s=10
    )
    assert g.components == {"has_code": 1.0, "parses": 1.0, "tests": 1.0}
    assert g.error is None and g.kind == "passed" and g.outcome.passed == 5


def test_grade_completion_skips_tests_when_static_check_fails():
    g = grade_completion(
        completion="```python\ndef f(:\n```", task_tests=SQUARE_TESTS, entry_point=None, language="python", timeout_s=10
    )
    assert g.components == {"has_code": 1.0, "parses": 0.0, "tests": 0.0}
    assert g.outcome is None and g.kind == "syntax_error" and g.error.startswith("syntax error")
    g = grade_completion(completion="", task_tests=SQUARE_TESTS, entry_point=None, language="python")
    assert g.components == {"has_code": 0.0, "parses": 0.0, "tests": 0.0}
    assert g.error == "empty" and g.kind == "no_code"


def test_grade_completion_skips_other_languages_and_missing_tests():
    g = grade_completion(
        completion="```rust\nfn main() {}\n```", task_tests="assert True", entry_point=None, language="rust"
    )
    assert g.components == {"has_code": 1.0, "parses": 1.0, "tests": 0.0}
    assert g.kind == "no_tests" and "only run for Python" in g.error
    g = grade_completion(completion=GOOD, task_tests=None, entry_point=None, language="python")
    assert g.kind == "no_tests" and set(g.components) == set(COMPONENTS)


def test_grade_many_keeps_results_with_their_uid():
    # Slowest first, so completions finish in the reverse of submission order;
    # uid i makes exactly i of the 5 asserts pass.
    requests = []
    for passing in range(5, -1, -1):
        code = f"import time\ntime.sleep({0.15 * passing})\ndef f(x):\n    return x * x if x <= {passing} else -1\n"
        requests.append(GradeRequest(uid=f"u{passing}", completion=code, task_tests=SQUARE_TESTS))
    requests.append(GradeRequest(uid="broken", completion="def (", task_tests=SQUARE_TESTS))
    results = grade_many(requests, max_workers=4, timeout_s=10)
    assert set(results) == {r.uid for r in requests}
    for passing in range(6):
        result = results[f"u{passing}"]
        assert result.uid == f"u{passing}"
        assert result.outcome.passed == passing, (passing, result)
    assert results["broken"].components["parses"] == 0.0
    with pytest.raises(ValueError):
        grade_many([requests[0], requests[0]])


def test_a_process_that_cannot_be_started_is_the_graders_failure_not_the_solutions():
    # Another session's processes can fill the sandbox user's process limit (RLIMIT_NPROC): the host
    # then cannot fork the solution. That must leave it unscored, never score it as crashed.
    from rlaif_mlx.rewards.sandbox import sandbox_capabilities

    if sandbox_capabilities()["privileges"] != "nobody":
        pytest.skip("the process limit is per user: only an isolated 'nobody' makes it bite here alone")
    out = run_unit_tests(GOOD, SQUARE_TESTS, limits=SandboxLimits(max_processes=1))
    # The host cannot fork the solution or, while warm sessions of other tests hold 'nobody' processes, not start.
    assert out.kind == "infrastructure" and "cannot start a process" in out.error, out


def test_no_warning_about_the_students_code_reaches_the_user():
    """Parsing or compiling a completion (or a task's tests) in this process prints nothing: an invalid
    escape or an ``is`` with a literal is a SyntaxWarning (DeprecationWarning before Python 3.12)."""
    import warnings

    from rlaif_mlx.rewards.code import static_check
    from rlaif_mlx.rewards.suspect import suspect_reasons
    from rlaif_mlx.rewards.test_plan import build_test_plan, check_tests

    code = 'def f(x):\n    if x is 1:\n        return "\\d"\n    return x\n'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert static_check(code, language="python").ok
        assert suspect_reasons(code) == ()
        assert build_test_plan('assert f(2) != "\\d"', entry_point="f").total == 1
        assert check_tests("assert f(1) is 1", entry_point="f") is None
    assert [str(w.message) for w in caught] == []
