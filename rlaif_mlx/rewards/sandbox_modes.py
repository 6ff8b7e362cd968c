"""Which isolation a sandboxed run gets here: the launch modes, their probe, and the capabilities report.

Modes are tried most isolated first and each is probed once per interpreter:
a tiny program checks every layer the mode claims (no network, no writes
outside its folder, nothing readable outside the interpreter and its folder).
The first mode whose probe passes is used; a missing layer is a logged warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading

from .sandbox_process import LaunchMode, SandboxLimits, interpreter_view, run_mode

_log = logging.getLogger(__name__)
# Checks what a launch mode really gives: stdin names a listening port, a writable
# path outside the working dir, a readable file there, and the site-packages folders.
_PROBE = r"""
import json, os, socket, sys
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
try:
    out["read_outside"] = open(cfg["readable"]).read() == "secret"
except OSError:
    out["read_outside"] = False
out["packages_listed"] = any(os.path.isdir(p) and os.listdir(p) for p in cfg["packages"])
print(json.dumps(out))
"""


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


def candidate_modes(python: str) -> list[LaunchMode]:
    """Launch modes in order of preference for this platform and user."""
    if sys.platform == "darwin":
        modes = []
        if shutil.which("sandbox-exec"):
            modes.append(
                LaunchMode(
                    "sandbox-exec",
                    prefix=lambda w: ["sandbox-exec", "-p", _darwin_profile(w)],
                    network_isolated=True,
                    fs_readonly=True,
                )
            )
        return modes + [LaunchMode("none")]
    if not sys.platform.startswith("linux"):
        return [LaunchMode("none")]
    root = os.geteuid() == 0
    unshare = shutil.which("unshare")
    modes: list[LaunchMode] = []
    if unshare:
        base = [unshare, "--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child"]
        as_root = lambda w: base + ["--"]  # noqa: E731
        as_user = lambda w: base + ["--user", "--map-root-user", "--"]  # noqa: E731
        full = dict(readonly=True, network_isolated=True, fs_readonly=True, pid_namespace=True)
        net = dict(network_isolated=True, pid_namespace=True)
        # Each full mode first with the hidden view (only the interpreter and the code's folder exist).
        if root:  # nobody first: it also makes RLIMIT_NPROC bite, if it can run python
            for drop, name in (("uid", "namespaces+nobody"), ("caps", "namespaces")):
                modes.append(LaunchMode(name + "+hidden", prefix=as_root, drop=drop, hidden=True, **full))
                modes.append(LaunchMode(name, prefix=as_root, drop=drop, **full))
        modes.append(LaunchMode("user-namespaces+hidden", prefix=as_user, drop="caps", hidden=True, **full))
        modes.append(LaunchMode("user-namespaces", prefix=as_user, drop="caps", **full))
        if root:
            modes.append(LaunchMode("namespaces-net-only", prefix=as_root, drop="caps", **net))
        modes.append(LaunchMode("user-namespaces-net-only", prefix=as_user, drop="caps", **net))
    if root:
        modes.append(LaunchMode("none+nobody", drop="uid"))
    return modes + [LaunchMode("none")]


def probe_mode(mode: LaunchMode, python: str) -> bool:
    """Run a tiny program under ``mode`` and check every layer it claims."""
    outside_dir = tempfile.mkdtemp(prefix="rlaif-probe-")
    os.chmod(outside_dir, 0o777)  # writable by anyone: only the sandbox may stop the write
    outside = os.path.join(outside_dir, "outside.txt")
    readable = os.path.join(outside_dir, "readable.txt")
    with open(readable, "w") as f:
        f.write("secret")
    os.chmod(readable, 0o644)
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        packages = interpreter_view(python)[1]
        stdin = json.dumps(
            {"port": listener.getsockname()[1], "outside": outside, "readable": readable, "packages": packages}
        )
        result = run_mode(
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
        if mode.hidden and (seen.get("read_outside") is not False or seen.get("packages_listed") is not False):
            return False
        return True
    except OSError as exc:
        _log.debug("sandbox mode %s failed: %s", mode.name, exc)
        return False
    finally:
        listener.close()
        shutil.rmtree(outside_dir, ignore_errors=True)


_MODES: dict[str, LaunchMode] = {}
_MODES_LOCK = threading.Lock()


def select_mode(python: str) -> LaunchMode:
    """The most isolated mode that works here; probed once per interpreter."""
    with _MODES_LOCK:
        if python in _MODES:
            return _MODES[python]
        candidates = candidate_modes(python)
        chosen = next((m for m in candidates[:-1] if probe_mode(m, python)), candidates[-1])
        missing = [
            name
            for name, ok in (
                ("network isolation", chosen.network_isolated),
                ("read-only filesystem", chosen.fs_readonly),
                ("hidden filesystem (the code could read task files)", chosen.hidden),
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
    mode = select_mode(python)
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    privileges = {"uid": "nobody", "caps": "no capabilities"}.get(mode.drop or "", "unchanged")
    return {
        "platform": sys.platform,
        "mode": mode.name,
        "network_isolated": mode.network_isolated,
        "fs_readonly": mode.fs_readonly,
        "fs_hidden": mode.hidden,
        "namespaces": mode.name.startswith(("namespaces", "user-namespaces")),
        "pid_namespace": mode.pid_namespace,
        "privileges": privileges,
        "nproc_enforced": mode.drop == "uid" or not as_root,
        "env_scrubbed": True,
        "rlimits": True,
    }
