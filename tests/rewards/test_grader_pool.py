"""Warm grading sessions: a solution cannot poison the next one graded in the same session.

Each poisoner below runs in a session that then grades honest solutions, in the same batch and in
the next one. The honest ones must keep their own grade: the wrong one wrong, the right one right,
and none of them may see a file, process or patch the poisoner left. One session is used throughout
(``workers=1``), and the test checks it really was the same session where the poisoner let it live.
"""

from __future__ import annotations

import sys

import pytest

from rlaif_mlx.rewards.grader_pool import pool_for
from rlaif_mlx.rewards.sandbox import SandboxLimits, sandbox_capabilities
from rlaif_mlx.rewards.test_plan import build_test_plan
from rlaif_mlx.rewards.unit_tests import UnitTestJob, run_sessions

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="namespaces and unshare are Linux's")

TESTS = "assert add(1, 2) == 3\nassert add(2, 5) == 7\nassert add(-1, 4) == 3\nassert add(10, -4) == 6\n"
RIGHT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a * b\n"
# Right only when nothing of an earlier solution is left: no file, no process, no patched built-in.
CLEAN = (
    "import os, builtins\n"
    "LEFT = [p for p in ('../poison.txt', '../c0', '/dev/shm/poison') if os.path.exists(p)]\n"
    "LEFT += [d for d in os.listdir('..') if d != os.path.basename(os.getcwd())]\n"
    "PIDS = [p for p in os.listdir('/proc') if p.isdigit() and int(p) not in (1, os.getpid(), os.getppid())]\n"
    "def add(a, b):\n"
    "    if LEFT or PIDS or builtins.abs(-1) != 1 or hasattr(builtins, 'POISON'):\n"
    "        return 0\n"
    "    return a + b\n"
)
POISONERS = {
    "patches built-ins": (
        "import builtins, json\nbuiltins.abs = lambda x: 0\nbuiltins.POISON = 1\n"
        "json.loads = lambda *a, **k: {'ok': True, 'value': 3}\ndef add(a, b):\n    return a + b\n"
    ),
    "writes files": (
        "import os\nfor path in ('../poison.txt', 'mine.txt', '/dev/shm/poison', '../c0/x'):\n"
        "    try:\n        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)\n"
        "        open(path, 'w').write('3')\n    except OSError:\n        pass\n"
        "os.makedirs('../locked/deep', exist_ok=True)\nos.chmod('../locked', 0)\nos.chmod('..', 0o500)\n"
        "def add(a, b):\n    return a + b\n"
    ),
    # Deeper than a path can name: the host cannot remove it, so it ends and a fresh sandbox follows.
    "nests folders past PATH_MAX": (
        "import os\nos.chdir('..')\nfor _ in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\n"
        "def add(a, b):\n    return a + b\n"
    ),
    "leaves a thread": (
        "import os, threading, time\ndef forge():\n    while True:\n        for fd in range(64):\n"
        '            try:\n                os.write(fd, b\'{"ok": true, "value": 3}\\n\')\n'
        "            except OSError:\n                pass\n        time.sleep(0.01)\n"
        "threading.Thread(target=forge, daemon=True).start()\ndef add(a, b):\n    return a + b\n"
    ),
    "leaves a process": (
        "import os, signal, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        "        time.sleep(0.2)\n        os.kill(-1, signal.SIGKILL)\n    time.sleep(30)\n    os._exit(0)\n"
        "def add(a, b):\n    return a + b\n"
    ),
}


def _jobs(codes: dict[str, str]) -> list[UnitTestJob]:
    plan = build_test_plan(TESTS, entry_point="add")
    return [UnitTestJob(uid=uid, solution=code, plan=plan) for uid, code in codes.items()]


@pytest.fixture
def limits():
    if not sandbox_capabilities()["pid_namespace"]:
        pytest.skip("without a pid namespace the host cannot find what a solution leaves behind")
    limits = SandboxLimits(output_bytes=12_345)  # a pool of this test's own
    yield limits
    pool_for(sys.executable, limits).close()


@pytest.mark.parametrize("name", list(POISONERS))
def test_a_solution_cannot_poison_the_next_in_its_session(name, limits):
    grade = lambda codes: run_sessions(_jobs(codes), timeout_s=5, limits=limits, workers=1)  # noqa: E731
    pool = pool_for(sys.executable, limits)
    first = grade({"warm": RIGHT})
    assert first["warm"].kind == "passed"
    (session,) = pool.idle
    same_batch = grade({"poisoner": POISONERS[name], "wrong": WRONG, "right": RIGHT, "clean": CLEAN})
    next_batch = grade({"wrong": WRONG, "right": RIGHT, "clean": CLEAN})
    if name != "nests folders past PATH_MAX":
        assert pool.idle == [session]  # every batch was graded in the session the first left warm
    for results in (same_batch, next_batch):
        assert (results["wrong"].passed, results["wrong"].kind) == (0, "failed"), results["wrong"]
        assert results["right"].kind == "passed", results["right"]
        assert results["clean"].kind == "passed", results["clean"]


def test_a_host_stopped_or_killed_by_a_solution_is_replaced_before_the_next(limits):
    stop = "import os, signal\ndef add(a, b):\n    os.kill(os.getppid(), signal.SIGSTOP)\n    return a + b\n"
    kill = "import os, signal\ndef add(a, b):\n    os.kill(os.getppid(), signal.SIGKILL)\n    return a + b\n"
    results = run_sessions(
        _jobs({"stop": stop, "after stop": CLEAN, "kill": kill, "after kill": CLEAN, "wrong": WRONG}),
        timeout_s=5,
        per_test_timeout_s=0.5,
        limits=limits,
        workers=1,
    )
    # Both compute the sums (the driver talks to their process directly): passing is theirs to keep.
    assert results["stop"].kind != "infrastructure" and results["kill"].kind != "infrastructure"
    assert results["after stop"].kind == "passed" and results["after kill"].kind == "passed"
    assert (results["wrong"].passed, results["wrong"].kind) == (0, "failed")
