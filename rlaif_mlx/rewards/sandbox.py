"""Run untrusted generated code with limits.

Every run gets a fresh temporary working directory (deleted afterwards), an
environment built from scratch (no API keys), rlimits (CPU, memory, file size,
processes, no core files), capped output, and a process tree that is killed as
a whole. Where the OS allows it, isolation layers are stacked on top:

- Linux, through util-linux ``unshare``: a network namespace (no network, not
  even the host's loopback); a pid namespace (everything the code starts dies
  with it, host processes are invisible); a mount namespace whose root holds
  only the system libraries, ``/etc``, the interpreter (its site-packages
  emptied) and the working directory, all read-only but the working
  directory, with a private ``/dev`` (null, zero, full, random, urandom) and a
  small private ``/dev/shm``: the user's files, the task files and installed
  packages are not there to read. As root the code runs as ``nobody`` when
  that user can execute the interpreter, else as uid 0 with no capabilities
  (so it cannot undo the mounts); otherwise a user namespace is used.
- macOS: ``sandbox-exec`` with a profile denying network and writes outside
  the working directory (files stay readable there: a warning says so).

The layers are probed once per interpreter (``sandbox_capabilities``); a
missing one is a logged warning. Process tree: ``[unshare] -> supervisor ->
code``. The supervisor (``python -I -S``) sets the rlimits (there rather than
in ``preexec_fn``, which is unsafe when grading from threads), sets up the
mounts, drops privileges, forks the code, and reports its exit status on a
private pipe; the grading process is never the code's parent.

Best-effort by nature: RLIMIT_NPROC counts all processes of a user and is not
enforced for uid 0 (also inside a user namespace), so it only bites for
``nobody`` or a non-root trainer; the pid namespace and the wall clock bound a
fork bomb otherwise. RLIMIT_AS is not enforced on macOS. The sandbox protects
the host; deciding whether tests passed happens outside it (``unit_tests``).
"""

from __future__ import annotations

import sys

from .sandbox_modes import candidate_modes, sandbox_capabilities, select_mode
from .sandbox_process import RESULT_FD_ENV, SandboxLimits, SandboxResult, run_mode

__all__ = ["RESULT_FD_ENV", "SandboxLimits", "SandboxResult", "run_sandboxed", "sandbox_capabilities"]


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
    mode = select_mode(python) if isolate else candidate_modes(python)[-1]
    return run_mode(
        code,
        mode=mode,
        stdin=stdin,
        timeout_s=timeout_s,
        limits=limits or SandboxLimits(),
        python=python,
        extra_files=extra_files,
    )
