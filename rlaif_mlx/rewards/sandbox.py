"""Run untrusted generated code with limits.

Every run gets a fresh temporary working directory (deleted afterwards), an
environment built from scratch (no API keys), rlimits (CPU, memory, file size,
processes, no core files), capped output, and a process tree that is killed as
a whole. Where the OS allows it, isolation layers are stacked on top:

- Linux, through util-linux ``unshare``: a network namespace (no network, not
  even the host's loopback); a pid namespace (everything the code starts dies
  with it, host processes are invisible); a mount namespace where every mount
  is read-only except the working directory, a private ``/dev`` (null, zero,
  full, random, urandom) and a small private ``/dev/shm``. As root the code
  runs as ``nobody`` when that user can execute the interpreter, else as uid 0
  with no capabilities (so it cannot undo the mounts); otherwise a user
  namespace is used.
- macOS: ``sandbox-exec`` with a profile denying network and writes outside
  the working directory.

The layers are probed once per interpreter (``sandbox_capabilities``); a
missing one is a logged warning. Process tree: ``[unshare] -> supervisor ->
code``. The supervisor (``python -I -S``) sets the rlimits (there rather than
in ``preexec_fn``, which is unsafe when grading from threads), sets up the
mounts, drops privileges, forks the code, and reports its exit status on a
private pipe; the grading process is never the code's parent.

Best-effort by nature: RLIMIT_NPROC counts all processes of a user and is not
enforced for uid 0 (also inside a user namespace), so it only bites for
``nobody`` or a non-root trainer; the pid namespace and the wall clock bound a
fork bomb otherwise. RLIMIT_AS is not enforced on macOS. The filesystem stays
readable. Code written to cheat the in-process test harness is out of scope:
the sandbox protects the host and makes accidents fail loudly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import selectors
import shutil
import signal
import socket
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
class _Mode:
    """One way of launching the supervisor, with the layers it claims."""

    name: str
    prefix: Callable[[str], list[str]] = field(default=lambda workdir: [])
    readonly: bool = False
    drop: str | None = None  # "uid" (become nobody) | "caps" (drop all capabilities) | None
    network_isolated: bool = False
    fs_readonly: bool = False
    pid_namespace: bool = False


# The supervisor: argv[1] is a JSON config. Standard library only; it runs
# with -I -S so nothing from the environment or site-packages is loaded.
_SUPERVISOR = (Path(__file__).parent / "sandbox_supervisor.py").read_text()

# Checks what a launch mode really gives: stdin names a listening port and a
# writable path outside the working dir.
_PROBE = r"""
import json, socket, sys
cfg, out = json.loads(sys.stdin.read()), {}
try:
    socket.create_connection(("127.0.0.1", cfg["port"]), timeout=2)
    out["network"] = True
except OSError:
    out["network"] = False
for key, path in (("write_outside", cfg["outside"]), ("write_inside", "inside.txt")):
    try:
        open(path, "w").close()
        out[key] = True
    except OSError:
        out[key] = False
print(json.dumps(out))
"""


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


def _darwin_profile(workdir: str) -> str:
    """A sandbox-exec profile: no network, writes only inside ``workdir``."""
    real = os.path.realpath(workdir)
    work = '"' + real.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return (
        "(version 1)\n(allow default)\n(deny network*)\n(deny file-write*)\n"
        f"(allow file-write* (subpath {work}))\n"
        '(allow file-write-data (literal "/dev/null") (literal "/dev/zero")\n'
        '    (literal "/dev/dtracehelper"))\n'
    )


def _candidate_modes(python: str) -> list[_Mode]:
    """Launch modes in order of preference for this platform and user."""
    if sys.platform == "darwin":
        modes = []
        if shutil.which("sandbox-exec"):
            modes.append(
                _Mode(
                    "sandbox-exec",
                    prefix=lambda w: ["sandbox-exec", "-p", _darwin_profile(w)],
                    network_isolated=True,
                    fs_readonly=True,
                )
            )
        return modes + [_Mode("none")]
    if not sys.platform.startswith("linux"):
        return [_Mode("none")]
    root = os.geteuid() == 0
    unshare = shutil.which("unshare")
    modes: list[_Mode] = []
    if unshare:
        base = [unshare, "--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child"]
        as_root = lambda w: base + ["--"]  # noqa: E731
        as_user = lambda w: base + ["--user", "--map-root-user", "--"]  # noqa: E731
        full = dict(readonly=True, network_isolated=True, fs_readonly=True, pid_namespace=True)
        net = dict(network_isolated=True, pid_namespace=True)
        if root:  # nobody first: it also makes RLIMIT_NPROC bite, if it can run python
            modes.append(_Mode("namespaces+nobody", prefix=as_root, drop="uid", **full))
            modes.append(_Mode("namespaces", prefix=as_root, drop="caps", **full))
        modes.append(_Mode("user-namespaces", prefix=as_user, drop="caps", **full))
        if root:
            modes.append(_Mode("namespaces-net-only", prefix=as_root, drop="caps", **net))
        modes.append(_Mode("user-namespaces-net-only", prefix=as_user, drop="caps", **net))
    if root:
        modes.append(_Mode("none+nobody", drop="uid"))
    return modes + [_Mode("none")]


def _probe_mode(mode: _Mode, python: str) -> bool:
    """Run a tiny program under ``mode`` and check every layer it claims."""
    outside_dir = tempfile.mkdtemp(prefix="rlaif-probe-")
    os.chmod(outside_dir, 0o777)  # writable by anyone: only the sandbox may stop the write
    outside = os.path.join(outside_dir, "outside.txt")
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        stdin = json.dumps({"port": listener.getsockname()[1], "outside": outside})
        result = _run(
            _PROBE, mode=mode, stdin=stdin, timeout_s=15.0, limits=SandboxLimits(), python=python, extra_files=None
        )
        try:
            seen = json.loads(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            _log.debug(
                "sandbox mode %s failed: rc=%s %s %s",
                mode.name,
                result.returncode,
                result.killed_reason,
                result.stderr[-500:],
            )
            return False
        if not seen.get("write_inside"):
            return False
        if mode.network_isolated and seen.get("network"):
            return False
        if mode.fs_readonly and (seen.get("write_outside") or os.path.exists(outside)):
            return False
        return True
    except OSError as exc:
        _log.debug("sandbox mode %s failed: %s", mode.name, exc)
        return False
    finally:
        listener.close()
        shutil.rmtree(outside_dir, ignore_errors=True)


_MODES: dict[str, _Mode] = {}
_MODES_LOCK = threading.Lock()


def _select_mode(python: str) -> _Mode:
    """The most isolated mode that works here; probed once per interpreter."""
    with _MODES_LOCK:
        if python in _MODES:
            return _MODES[python]
        candidates = _candidate_modes(python)
        chosen = next((m for m in candidates[:-1] if _probe_mode(m, python)), candidates[-1])
        missing = [
            name
            for name, ok in (
                ("network isolation", chosen.network_isolated),
                ("read-only filesystem", chosen.fs_readonly),
            )
            if not ok
        ]
        if missing:
            _log.warning(
                "sandbox: %s unavailable here (mode %r); generated code runs with "
                "rlimits, a scrubbed environment and a temp dir only",
                " and ".join(missing),
                chosen.name,
            )
        _MODES[python] = chosen
        return chosen


def sandbox_capabilities(*, python: str = sys.executable) -> dict:
    """Which isolation layers are active for sandboxed runs on this machine.

    Args:
        python: the interpreter that runs generated code.

    Returns:
        A dict with ``mode`` (name of the launch mode), ``network_isolated``,
        ``fs_readonly``, ``namespaces``, ``pid_namespace``, ``privileges``
        ("nobody", "no capabilities" or "unchanged"), ``nproc_enforced`` and
        ``platform``; meant to be logged by the trainer.
    """
    mode = _select_mode(python)
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    privileges = {"uid": "nobody", "caps": "no capabilities"}.get(mode.drop or "", "unchanged")
    return {
        "platform": sys.platform,
        "mode": mode.name,
        "network_isolated": mode.network_isolated,
        "fs_readonly": mode.fs_readonly,
        "namespaces": mode.name.startswith(("namespaces", "user-namespaces")),
        "pid_namespace": mode.pid_namespace,
        "privileges": privileges,
        "nproc_enforced": mode.drop == "uid" or not as_root,
        "env_scrubbed": True,
        "rlimits": True,
    }


def run_sandboxed(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 10.0,
    limits: SandboxLimits | None = None,
    python: str = sys.executable,
    extra_files: dict[str, str] | None = None,
    isolate: bool = True,
) -> SandboxResult:
    """Run Python ``code`` as ``main.py`` in a fresh temp dir, with limits.

    Args:
        code: the program's source.
        stdin: text fed to the program's stdin (then closed).
        timeout_s: wall-clock limit; on expiry the whole process tree is killed.
        limits: resource limits; defaults to ``SandboxLimits()``.
        python: the interpreter to run it with (started with ``-I -B``).
        extra_files: more files to create in the working dir, name -> text.
        isolate: use the namespace / sandbox-exec layers when available;
            False keeps only limits, env scrubbing and the temp dir.

    Returns:
        A ``SandboxResult``; the caller's process is never affected by what
        the code does.
    """
    mode = _select_mode(python) if isolate else _candidate_modes(python)[-1]
    return _run(
        code,
        mode=mode,
        stdin=stdin,
        timeout_s=timeout_s,
        limits=limits or SandboxLimits(),
        python=python,
        extra_files=extra_files,
    )


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

    shutil.rmtree(path, onerror=retry)


def _rlimits(limits: SandboxLimits, timeout_s: float) -> dict[str, tuple[int, int]]:
    cpu = limits.cpu_seconds or math.ceil(timeout_s) + 1
    return {
        "RLIMIT_CORE": (0, 0),
        "RLIMIT_CPU": (cpu, cpu + 1),  # SIGXCPU first, SIGKILL a second later
        "RLIMIT_AS": (limits.memory_bytes, limits.memory_bytes),
        "RLIMIT_FSIZE": (limits.file_size_bytes, limits.file_size_bytes),
        "RLIMIT_NPROC": (limits.max_processes, limits.max_processes),
    }


def _run(
    code: str,
    *,
    mode: _Mode,
    stdin: str,
    timeout_s: float,
    limits: SandboxLimits,
    python: str,
    extra_files: dict[str, str] | None,
) -> SandboxResult:
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="rlaif-sbx-"))
    fds: list[int] = []
    try:
        _write_files(workdir, {**(extra_files or {}), "main.py": code})
        if mode.drop == "uid":
            _chown_tree(workdir, NOBODY_UID)
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
        }
        argv = mode.prefix(workdir) + [python, "-I", "-S", "-B", "-c", _SUPERVISOR, json.dumps(config)]
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=_minimal_env(workdir, result_w),
            pass_fds=(result_w, status_w),
            start_new_session=True,
            close_fds=True,
        )
        for fd in (result_w, status_w):  # only the child keeps the write ends
            os.close(fd)
            fds.remove(fd)
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
        )
        duration = time.monotonic() - start
        proc.stdout.close()
        proc.stderr.close()
    finally:
        for fd in fds:
            os.close(fd)
        _remove_tree(workdir)
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
    proc: subprocess.Popen, stdin: bytes, streams: dict[str, tuple[int, int]], *, deadline: float
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
                elif now >= deadline:
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
