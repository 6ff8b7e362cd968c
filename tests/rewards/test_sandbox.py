"""The sandbox with real subprocesses: limits, process-tree kills, isolation layers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

from rlaif_mlx.rewards.sandbox import SandboxLimits, run_sandboxed, sandbox_capabilities

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the sandbox needs a Unix")

CAPS = sandbox_capabilities()
# A second interpreter outside /root (when there is one) lets root runs exercise
# the "nobody" mode too: pyenv / conda interpreters under /root are not
# executable by nobody, so the default interpreter may run as uid 0.
_SYSTEM_PY = shutil.which("python3", path="/usr/bin:/usr/local/bin")
PYTHONS = [sys.executable] + (
    [_SYSTEM_PY] if _SYSTEM_PY and os.path.realpath(_SYSTEM_PY) != os.path.realpath(sys.executable) else []
)


def _pids_with_marker(marker: str) -> list[int]:
    """Host pids of live processes whose command line contains ``marker``."""
    if os.path.isdir("/proc"):
        pids = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(name))
            except OSError:
                continue
        return pids
    out = subprocess.run(["ps", "-axo", "pid=,command="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if marker in line]


def _wait_gone(marker: str, within_s: float = 30.0) -> list[int]:
    """Live pids with ``marker``, once there are none or ``within_s`` passed (a deadline, not a speed test)."""
    deadline = time.monotonic() + within_s
    while (alive := _pids_with_marker(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def test_runs_code_with_stdin_and_exit_code():
    r = run_sandboxed("import sys\nprint(sys.stdin.read().upper())\nsys.exit(3)", stdin="hello")
    assert r.stdout.strip() == "HELLO"
    assert r.returncode == 3
    assert not r.timed_out and r.killed_reason is None
    assert r.isolation == CAPS["mode"]


def test_result_channel_is_separate_from_stdout():
    code = "import os\nprint('noise')\nos.write(int(os.environ['SANDBOX_RESULT_FD']), b'result')"
    r = run_sandboxed(code)
    assert r.channel == "result"
    assert r.stdout.strip() == "noise"


def test_extra_files_and_temp_dir_is_deleted():
    code = "import os\nprint(os.getcwd())\nprint(open('data/in.txt').read())\nopen('out.txt', 'w').write('x')"
    r = run_sandboxed(code, extra_files={"data/in.txt": "payload"})
    workdir, content = r.stdout.split()
    assert content == "payload"
    assert not os.path.exists(workdir)
    with pytest.raises(ValueError):
        run_sandboxed("pass", extra_files={"../escape.txt": "x"})


def test_environment_is_built_from_scratch(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake-secret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake-secret")
    code = (
        "import json, os\n"
        "path = '/proc/self/environ'\n"
        "raw = open(path, 'rb').read() if os.path.exists(path) else b''\n"
        "print(json.dumps({'env': dict(os.environ), 'raw': raw.decode(errors='replace')}))\n"
    )
    out = json.loads(run_sandboxed(code).stdout)
    assert "ANTHROPIC_API_KEY" not in out["env"] and "OPENAI_API_KEY" not in out["env"]
    assert "secret" not in out["raw"] and "secret" not in json.dumps(out["env"])
    assert out["env"]["HOME"] == out["env"]["TMPDIR"]
    assert out["env"]["PYTHONHASHSEED"] == "0"


@pytest.mark.skipif(not CAPS["pid_namespace"], reason="no pid namespace on this machine")
def test_host_processes_are_invisible(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake-secret")
    code = (
        f"import os\ntry:\n    print(open('/proc/{os.getpid()}/environ', 'rb').read())\n"
        "except OSError as e:\n    print('blocked', type(e).__name__)"
    )
    r = run_sandboxed(code)
    assert "sk-ant" not in r.stdout
    assert "blocked" in r.stdout


def test_timeout_kills_an_infinite_loop():
    r = run_sandboxed("while True:\n    pass", timeout_s=1.0)
    assert r.timed_out and r.killed_reason == "timeout"


def test_timeout_kills_grandchildren():
    marker = f"rlaif-test-{uuid.uuid4().hex}"
    code = (
        "import subprocess, sys, time\n"
        "for _ in range(5):\n"
        f"    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'])\n"
        "time.sleep(60)\n"
    )
    r = run_sandboxed(code, timeout_s=1.5)
    assert r.timed_out
    assert _wait_gone(marker) == []


@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "plain"])
def test_orphaned_grandchildren_die_when_the_program_exits(isolate):
    marker = f"rlaif-test-{uuid.uuid4().hex}"
    code = (
        "import subprocess, sys\n"
        "procs = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', "
        f"'{marker}']) for _ in range(5)]\n"
        "print('spawned', len(procs))\n"
    )
    r = run_sandboxed(code, timeout_s=30.0, isolate=isolate)
    assert r.stdout.strip() == "spawned 5"
    # The grandchildren hold stdout open; the run must still end when the program does, not at its timeout.
    assert not r.timed_out
    assert _wait_gone(marker) == []


@pytest.mark.skipif(not CAPS["pid_namespace"], reason="no pid namespace on this machine")
def test_grandchild_that_leaves_the_process_group_dies_too():
    marker = f"rlaif-test-{uuid.uuid4().hex}"
    code = (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', "
        f"'{marker}'], start_new_session=True)\n"
    )
    run_sandboxed(code, timeout_s=10.0)
    assert _wait_gone(marker) == []


@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "plain"])
def test_killing_its_parent_does_not_reach_the_caller(isolate):
    code = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('still here')"
    r = run_sandboxed(code, isolate=isolate)
    assert r.returncode is not None  # we are still running, and got a result


def test_stdout_flood_is_capped_and_does_not_block():
    limits = SandboxLimits(output_bytes=4096)
    r = run_sandboxed("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", timeout_s=1.0, limits=limits)
    assert r.timed_out and r.truncated
    assert len(r.stdout) == 4096
    # A finite flood (50 MB) finishes normally, keeping only the cap.
    r = run_sandboxed(
        "import sys\nfor _ in range(800):\n    sys.stdout.write('y' * 65536)", timeout_s=60.0, limits=limits
    )
    assert r.returncode == 0 and not r.timed_out
    assert r.stdout == "y" * 4096 and r.truncated


def test_memory_limit():
    r = run_sandboxed("x = bytearray(2 << 30)\nprint('allocated')", limits=SandboxLimits(memory_bytes=256 << 20))
    assert "allocated" not in r.stdout
    assert r.killed_reason == "memory"


def test_file_size_limit_stops_a_disk_filler():
    code = (
        "with open('big.bin', 'wb') as f:\n"
        "    for _ in range(100):\n"
        "        f.write(b'x' * (1 << 20))\n"
        "print('wrote 100MB')"
    )
    r = run_sandboxed(code, limits=SandboxLimits(file_size_bytes=1 << 20))
    assert "wrote 100MB" not in r.stdout
    assert r.killed_reason == "file size limit"


def test_cpu_limit():
    r = run_sandboxed("while True:\n    pass", timeout_s=60.0, limits=SandboxLimits(cpu_seconds=1))
    assert not r.timed_out  # the CPU limit ended it, before the wall clock
    assert r.killed_reason in ("cpu limit", "killed by SIGKILL")


def test_capabilities_report():
    assert {
        "mode",
        "network_isolated",
        "fs_readonly",
        "namespaces",
        "pid_namespace",
        "privileges",
        "nproc_enforced",
    } <= set(CAPS)
    unshare = shutil.which("unshare")
    if sys.platform.startswith("linux") and os.geteuid() == 0 and unshare:
        # Where the kernel lets root create namespaces, our layers must all work.
        plain = subprocess.run([unshare, "--net", "--mount", "--pid", "--fork", "true"], capture_output=True)
        if plain.returncode == 0:
            assert CAPS["network_isolated"] and CAPS["fs_readonly"], CAPS
            assert CAPS["pid_namespace"] and CAPS["privileges"] != "unchanged", CAPS


def _require(python: str, layer: str) -> None:
    if not sandbox_capabilities(python=python)[layer]:
        pytest.skip(f"{layer} is unavailable here for {python} (sandbox_capabilities() says so)")


@pytest.mark.parametrize("python", PYTHONS)
def test_process_limit_bounds_a_fork_bomb(python):
    _require(python, "nproc_enforced")
    marker = f"rlaif-test-{uuid.uuid4().hex}"
    code = (
        "import subprocess\nprocs = []\ntry:\n    for _ in range(200):\n"
        f"        procs.append(subprocess.Popen(['sleep', '30', '{marker}']))\n"
        "except OSError as e:\n    print('stopped', type(e).__name__)\n"
        "print(len(procs))\n"
    )
    r = run_sandboxed(code, python=python, limits=SandboxLimits(max_processes=20))
    assert r.stdout.startswith("stopped"), r
    assert int(r.stdout.split()[-1]) < 20
    assert _wait_gone(marker) == []


@pytest.mark.parametrize("python", PYTHONS)
def test_network_is_unreachable(python):
    _require(python, "network_isolated")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        code = (
            "import socket\ns = socket.socket()\ns.settimeout(2)\n"
            f"try:\n    s.connect(('127.0.0.1', {port}))\n    print('connected')\n"
            "except OSError as e:\n    print('refused', e)"
        )
        r = run_sandboxed(code, python=python)
    assert r.stdout.startswith("refused"), r.stdout


@pytest.mark.parametrize("python", PYTHONS)
def test_writes_outside_the_temp_dir_fail(tmp_path, python):
    _require(python, "fs_readonly")
    tmp_path.chmod(0o777)  # so that only the sandbox, not permissions, can stop the write
    target = tmp_path / "escaped.txt"
    code = (
        f"try:\n    open({str(target)!r}, 'w').write('x')\n    print('wrote')\n"
        "except OSError as e:\n    print('blocked', e)\n"
        "open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())"
    )
    r = run_sandboxed(code, python=python)
    assert r.stdout.startswith("blocked"), r.stdout
    assert r.stdout.split()[-1] == "ok"
    assert not target.exists()


@pytest.mark.parametrize("python", PYTHONS)
def test_cannot_remount_or_reach_devices(python):
    _require(python, "fs_readonly")
    code = (
        "import subprocess\n"
        "r = subprocess.run(['mount', '-o', 'remount,rw', '/'], capture_output=True)\n"
        "print(r.returncode)\n"
        "try:\n    open('/escaped-rlaif-test', 'w')\n    print('wrote')\n"
        "except OSError:\n    print('blocked')\n"
        "import os\nprint(sorted(os.listdir('/dev')))\n"
    )
    r = run_sandboxed(code, python=python)
    lines = r.stdout.splitlines()
    assert lines[1] == "blocked"
    assert not os.path.exists("/escaped-rlaif-test")
    # Only harmless device nodes: no disks, consoles or /dev/kvm to open as uid 0.
    devices = set(json.loads(lines[2].replace("'", '"')))
    assert devices <= {"null", "zero", "full", "random", "urandom", "shm", "fd", "stdin", "stdout", "stderr"}, devices
