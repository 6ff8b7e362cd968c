"""Launching one sandboxed program and collecting what it leaves: the process side of ``sandbox``.

``run`` starts ``[prefix] -> supervisor -> code`` for a launch mode, feeds
stdin, reads stdout, stderr, the result channel and the supervisor's status
pipe with caps, and kills the whole tree at the deadline. ``sandbox_modes``
decides the mode; ``sandbox`` is the public face.
"""

from __future__ import annotations

import json
import logging
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_log = logging.getLogger(__name__)

RESULT_FD_ENV = "SANDBOX_RESULT_FD"
"""Environment variable that names the result-channel fd in the child."""

NOBODY_UID = 65534
_STATUS_CAP = 4096
_DRAIN_GRACE_S = 0.3


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one sandboxed run.

    ``cpu_seconds=None`` derives the CPU limit from the wall-clock timeout.
    ``output_bytes`` caps what is kept of stdout and of stderr (each);
    ``channel_bytes`` caps the result channel.
    """

    memory_bytes: int = 1 << 30
    cpu_seconds: int | None = None
    file_size_bytes: int = 16 << 20
    max_processes: int = 64
    output_bytes: int = 64 << 10
    channel_bytes: int = 1 << 20


@dataclass
class SandboxResult:
    """What came out of one sandboxed run.

    ``returncode`` is the candidate's own status (negative signal number when
    a signal ended it). ``killed_reason`` is None when the code ended by
    itself, else a short reason such as "timeout", "memory", "cpu limit",
    "file size limit". ``channel`` holds what the code wrote to the dedicated
    result pipe (fd named by ``$SANDBOX_RESULT_FD``), separate from stdout.
    """

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None
    duration_s: float
    channel: str = ""
    truncated: bool = False
    isolation: str = "none"


@dataclass(frozen=True)
class LaunchMode:
    """One way of launching the supervisor, with the layers it claims."""

    name: str
    prefix: Callable[[str], list[str]] = field(default=lambda workdir: [])
    readonly: bool = False
    drop: str | None = None  # "uid" (become nobody) | "caps" (drop all capabilities) | None
    network_isolated: bool = False
    fs_readonly: bool = False
    pid_namespace: bool = False
    hidden: bool = False  # the code sees only the interpreter (site-packages emptied) and its own folder


# The supervisor: argv[1] is a JSON config. Standard library only; it runs
# with -I -S so nothing from the environment or site-packages is loaded.
_SUPERVISOR = (Path(__file__).parent / "sandbox_supervisor.py").read_text()


def interpreter_view(python: str) -> tuple[list[str], list[str]]:
    """The folders the code may see for ``python`` to run, and the ones inside them to empty.

    System libraries, ``/etc`` and the interpreter's prefixes are shown read-only; its
    site-packages are emptied, so neither installed packages (the project's own, HumanEval's
    data) nor any file of the user's (task files, the project, home) can be read by the code.
    """
    import site
    import sysconfig

    shown = ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc"]
    hidden: list[str] = []
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
        prefixes |= {sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")}
        hidden = [*site.getsitepackages(), site.getusersitepackages()]
    else:  # another interpreter: its installation folder (bin/..)
        prefixes = {os.path.dirname(os.path.dirname(os.path.realpath(python)))}
    shown += sorted({os.path.realpath(p) for p in prefixes if p} | {os.path.dirname(os.path.realpath(python))})
    return shown, sorted({os.path.realpath(p) for p in hidden if p})


def _minimal_env(workdir: str, result_fd: int) -> dict[str, str]:
    """A fresh environment: nothing from os.environ (no API keys) reaches the code."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        # The interpreter runs with -I, which ignores PYTHON*; these reach the
        # processes the code itself may start.
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        RESULT_FD_ENV: str(result_fd),
    }


def _write_files(workdir: str, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = os.path.normpath(os.path.join(workdir, name))
        if os.path.isabs(name) or not path.startswith(workdir + os.sep):
            raise ValueError(f"extra file {name!r} must be a relative path inside the sandbox")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def _chown_tree(root: str, uid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), uid, uid)
    os.chown(root, uid, uid)


def _remove_tree(path: str) -> None:
    def retry(func, target, _exc):  # code may chmod its own files to 000
        try:
            os.chmod(os.path.dirname(target), 0o700)
            os.chmod(target, 0o700)
            func(target)
        except OSError:
            pass

    try:
        shutil.rmtree(path, onerror=retry)
    except RecursionError:  # folders nested deeper than Python recurses: rm walks them without recursing
        subprocess.run(["rm", "-rf", "--", path], stdin=subprocess.DEVNULL, capture_output=True)


def _rlimits(limits: SandboxLimits, timeout_s: float) -> dict[str, tuple[int, int]]:
    cpu = limits.cpu_seconds or math.ceil(timeout_s) + 1
    return {
        "RLIMIT_CORE": (0, 0),
        "RLIMIT_CPU": (cpu, cpu + 1),  # SIGXCPU first, SIGKILL a second later
        "RLIMIT_AS": (limits.memory_bytes, limits.memory_bytes),
        "RLIMIT_FSIZE": (limits.file_size_bytes, limits.file_size_bytes),
        "RLIMIT_NPROC": (limits.max_processes, limits.max_processes),
    }


def run_mode(
    code: str,
    *,
    mode: LaunchMode,
    stdin: str,
    timeout_s: float,
    limits: SandboxLimits,
    python: str,
    extra_files: dict[str, str] | None,
    pass_fds: dict[str, int] | None = None,
    env: dict[str, str] | None = None,
    stop: threading.Event | None = None,
) -> SandboxResult:
    """Runs ``code`` as ``main.py`` under ``mode``; see ``sandbox.run_sandboxed``.

    ``pass_fds`` maps environment variable names to open file descriptors the code
    inherits; they are closed here once the sandbox holds them (so the code's exit
    is seen as end of file at the other end). ``env`` adds variables. Setting ``stop`` kills the
    tree as the deadline would (a long-lived sandbox run from a thread).
    """
    pass_fds = pass_fds or {}
    base = os.path.realpath(tempfile.mkdtemp(prefix="rlaif-sbx-"))
    workdir = os.path.join(base, "work")
    os.mkdir(workdir, 0o700)
    fds: list[int] = []
    try:
        _write_files(workdir, {**(extra_files or {}), "main.py": code})
        if mode.drop == "uid":
            _chown_tree(workdir, NOBODY_UID)
            os.chmod(base, 0o711)  # nobody may pass through to its folder, not list the stage
        result_r, result_w = os.pipe()
        status_r, status_w = os.pipe()
        fds += [result_r, result_w, status_r, status_w]
        config = {
            "workdir": workdir,
            "readonly": mode.readonly,
            "drop": mode.drop,
            "nobody": NOBODY_UID,
            "status_fd": status_w,
            "result_fd": result_w,
            "limits": _rlimits(limits, timeout_s),
            "argv": [python, "-I", "-B", os.path.join(workdir, "main.py")],
            "keep_fds": sorted(pass_fds.values()),
            "view": None,
        }
        if mode.hidden:
            shown, emptied = interpreter_view(python)
            config["view"] = {"stage": os.path.join(base, "root"), "shown": shown, "hidden": emptied}
        argv = mode.prefix(workdir) + [python, "-I", "-S", "-B", "-c", _SUPERVISOR, json.dumps(config)]
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=_minimal_env(workdir, result_w) | (env or {}) | {name: str(fd) for name, fd in pass_fds.items()},
            pass_fds=(result_w, status_w, *pass_fds.values()),
            start_new_session=True,
            close_fds=True,
        )
        for fd in (result_w, status_w):  # only the child keeps the write ends
            os.close(fd)
            fds.remove(fd)
        for fd in pass_fds.values():
            os.close(fd)
        pass_fds = {}
        streams, timed_out = _communicate(
            proc,
            stdin.encode(),
            {
                "stdout": (proc.stdout.fileno(), limits.output_bytes),
                "stderr": (proc.stderr.fileno(), limits.output_bytes),
                "channel": (result_r, limits.channel_bytes),
                "status": (status_r, _STATUS_CAP),
            },
            deadline=start + timeout_s,
            stop=stop,
        )
        duration = time.monotonic() - start
        proc.stdout.close()
        proc.stderr.close()
    finally:
        for fd in [*fds, *pass_fds.values()]:
            os.close(fd)
        _remove_tree(base)
    text = {k: v[0].decode("utf-8", errors="replace") for k, v in streams.items()}
    returncode, problem = _decode_status(text["status"], proc.returncode)
    reason = "timeout" if timed_out else problem or _killed_reason(returncode, text["stderr"])
    return SandboxResult(
        returncode=returncode,
        stdout=text["stdout"],
        stderr=text["stderr"],
        timed_out=timed_out,
        killed_reason=reason,
        duration_s=duration,
        channel=text["channel"],
        truncated=any(v[1] for v in streams.values()),
        isolation=mode.name,
    )


def _communicate(
    proc: subprocess.Popen,
    stdin: bytes,
    streams: dict[str, tuple[int, int]],
    *,
    deadline: float,
    stop: threading.Event | None = None,
) -> tuple[dict[str, tuple[bytes, bool]], bool]:
    """Feed stdin and read every stream with a cap until the tree is gone.

    Reading never blocks on one stream and drops bytes past each cap, so a
    child that floods output costs neither memory nor a hang.
    """
    sel = selectors.DefaultSelector()
    bufs = {name: bytearray() for name in streams}
    truncated = {name: False for name in streams}
    for name, (fd, _cap) in streams.items():
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, name)
    pending = memoryview(stdin)
    stdin_fd = proc.stdin.fileno()
    os.set_blocking(stdin_fd, False)
    sel.register(stdin_fd, selectors.EVENT_WRITE, "stdin")
    timed_out = False
    stop_at: float | None = None  # set once the process is gone: drain briefly, then stop
    try:
        while sel.get_map():
            now = time.monotonic()
            if stop_at is None:
                if _has_exited(proc):
                    _kill_tree(proc)  # orphans of the code, if any survived
                    stop_at = now + _DRAIN_GRACE_S
                elif now >= deadline or (stop is not None and stop.is_set()):
                    timed_out = True
                    _kill_tree(proc)
                    stop_at = now + _DRAIN_GRACE_S
            elif now >= stop_at:
                break
            wait = (stop_at if stop_at is not None else deadline) - now
            for key, _ in sel.select(timeout=max(0.0, min(wait, 0.05))):
                name = key.data
                if name == "stdin":
                    try:
                        sent = os.write(stdin_fd, pending[:65536])
                        pending = pending[sent:]
                    except BlockingIOError:
                        continue
                    except OSError:  # the child closed its stdin
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(stdin_fd)
                        proc.stdin.close()
                    continue
                try:
                    data = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(key.fd)
                    continue
                room = streams[name][1] - len(bufs[name])
                if len(data) > room:
                    truncated[name] = True
                bufs[name] += data[: max(room, 0)]
    finally:
        sel.close()
        if not proc.stdin.closed:
            proc.stdin.close()
        _kill_tree(proc)
        proc.wait()
    return {name: (bytes(bufs[name]), truncated[name]) for name in streams}, timed_out


def _has_exited(proc: subprocess.Popen) -> bool:
    # WNOWAIT leaves the zombie in place, so its pid (= the process group id)
    # cannot be reused before _kill_tree signals the group.
    if hasattr(os, "waitid"):
        try:
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True
    return proc.poll() is not None


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (it leads its own session)."""
    if proc.returncode is not None:
        return  # reaped: the group id may belong to someone else now
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _decode_status(status: str, wrapper_rc: int | None) -> tuple[int | None, str | None]:
    """The candidate's return code as reported by the supervisor."""
    for line in status.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "exit":
            return int(rest), None
        if kind == "signal":
            return -int(rest), None
        if kind in ("setup-error", "exec-error"):
            return wrapper_rc, f"sandbox {kind.replace('-', ' ')}: {rest}"
    if wrapper_rc is not None and wrapper_rc < 0:
        # No status line: the supervisor itself was killed (by the code, when
        # it runs without a pid namespace, or by the timeout).
        return wrapper_rc, "sandbox supervisor killed"
    return wrapper_rc, None


def _killed_reason(returncode: int | None, stderr: str) -> str | None:
    if returncode is None or returncode == 0:
        return None
    if returncode == -getattr(signal, "SIGXCPU", 24):
        return "cpu limit"
    if returncode == -getattr(signal, "SIGXFSZ", 25) or "File too large" in stderr:
        return "file size limit"
    if "MemoryError" in stderr:
        return "memory"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return None
