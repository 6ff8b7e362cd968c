"""Warm grading sessions, kept across batches: a trusted driver and a sandboxed host, started once.

A session (see ``unit_tests``) costs a sandbox start (namespaces, mounts, two interpreters) and a
driver start; grading one solution in a running session costs a fork and a few round trips. So the
sessions outlive a batch: ``pool_for`` keeps them per interpreter and sandbox limits, ``GraderPool.grade``
hands a batch's solutions, one at a time, to whichever session is free, and a session that a solution
brought down (or that has grown old) is closed and replaced by a fresh one.

A solution cannot reach the next one through a reused session: the host forks each solution from its
own clean state, kills every process of the namespace and removes every file after it (``host.py``);
the driver gives each solution fresh test namespaces (``driver.py``). A session that stops answering
is stopped from here: the sandbox's process tree is killed and its solution timed out.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import socket
import subprocess
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

from .sandbox import SandboxLimits, SandboxResult
from .sandbox_modes import select_mode
from .sandbox_process import run_mode

_HERE = Path(__file__).parent
_WIRE = (_HERE / "wire.py").read_text()
HOST = _WIRE + "\n" + (_HERE / "host.py").read_text()
DRIVER = "\n".join([_WIRE, (_HERE / "driver_link.py").read_text(), (_HERE / "driver.py").read_text()])
START_S = 60.0  # a session's start: the sandbox's mounts and two interpreters, on a loaded machine
GRACE_S = 30.0  # on top of a solution's budget: the driver's own kills and waits (10 s each)
LIFETIME_S = 3600.0  # the sandbox's wall clock and the host's CPU limit; sessions are replaced well before
RECYCLE_S = 1200.0
RECYCLE_JOBS = 20_000
UNCONTAINED_JOBS = 64
MAX_POOLS = 4


class Session:
    """One driver (outside the sandbox) and one host (inside it): a pipe to the host, a message socket back."""

    def __init__(self, python: str, limits: SandboxLimits):
        self.started = time.monotonic()
        self.graded = 0
        self.stopped_for_time = False
        self.result: SandboxResult | None = None
        self.problem: str | None = None
        self.stop = threading.Event()
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr = bytearray()
        mode = select_mode(python)
        # Without a pid namespace the host cannot find a process that left the solution's group:
        # such a session serves as many solutions as one batch's session did before the pool, no more.
        self.max_jobs = RECYCLE_JOBS if mode.pid_namespace else UNCONTAINED_JOBS
        to_host_r, to_host_w = os.pipe()
        # The host answers on a message socket, so that a solution's two pipe ends can ride along.
        to_driver_r, to_driver_w = (end.detach() for end in socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET))
        try:
            self.driver = subprocess.Popen(
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
        except OSError:  # e.g. EAGAIN: no process could be started
            for fd in (to_host_r, to_host_w, to_driver_r, to_driver_w):
                os.close(fd)
            raise
        os.close(to_host_w)
        os.close(to_driver_r)
        env = {
            "RLAIF_PID_NAMESPACE": "1" if mode.pid_namespace else "0",
            "RLAIF_PRIVATE_SHM": "1" if mode.readonly else "0",
        }

        def sandbox() -> None:
            try:
                self.result = run_mode(
                    HOST,
                    mode=mode,
                    stdin="",
                    timeout_s=LIFETIME_S,
                    limits=replace(limits, cpu_seconds=None),  # the host's own; each solution gets its own
                    python=python,
                    extra_files=None,
                    pass_fds={"RLAIF_RPC_IN": to_host_r, "RLAIF_RPC_OUT": to_driver_w},
                    env=env,
                    stop=self.stop,
                )
            except OSError as exc:
                self.problem = f"the sandbox could not start: {exc}"
                self.driver.kill()

        self.threads = [
            threading.Thread(target=sandbox, daemon=True),
            threading.Thread(target=self._read_verdicts, daemon=True),
            threading.Thread(target=self._drain_stderr, daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _read_verdicts(self) -> None:
        for line in iter(self.driver.stdout.readline, b""):
            self.lines.put(line.decode("utf-8", "replace").rstrip("\n"))
        self.lines.put(None)

    def _drain_stderr(self, cap: int = 1 << 16) -> None:
        """Reads what the tests print (and the driver's own errors), keeping the last ``cap`` bytes."""
        for chunk in iter(lambda: self.driver.stderr.read1(65536), b""):
            self.stderr += chunk
            del self.stderr[: max(len(self.stderr) - cap, 0)]

    def _next_line(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def ready(self) -> bool:
        """Waits for the driver's word that the host answered; False when the session could not start."""
        return self._next_line(START_S) == "ready"

    def grade(self, job: dict, budget_s: float) -> dict | None:
        """The driver's verdict on one job, or None when the driver gave none (the session is then dead).

        A session still busy ``GRACE_S`` past the job's budget is stopped (its sandbox killed): the
        driver then reports the host gone, and the solution timed out.
        """
        try:
            self.driver.stdin.write((json.dumps(job) + "\n").encode())
            self.driver.stdin.flush()
        except OSError:
            return None
        line = self._next_line(budget_s + GRACE_S)
        if line is None and self.alive():
            self.stopped_for_time = True
            self.stop.set()
            line = self._next_line(GRACE_S)
        self.graded += 1
        try:
            verdict = json.loads(line) if line is not None else None
        except ValueError:
            verdict = None
        return verdict if isinstance(verdict, dict) and verdict.get("uid") == job["uid"] else None

    def alive(self) -> bool:
        return self.driver.poll() is None and not self.stop.is_set()

    def worn(self) -> bool:
        return self.graded >= self.max_jobs or time.monotonic() - self.started > RECYCLE_S

    def close(self, *, kill: bool = False) -> str | None:
        """Ends the session (the driver's end of file ends the host; ``kill``: its tree is killed at once,
        for a host that is gone or hung); what went wrong in it, if anything."""
        if kill:
            self.stop.set()
        try:
            self.driver.stdin.close()
        except OSError:
            pass
        try:
            self.driver.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.driver.kill()
            self.driver.wait()
        self.threads[0].join(timeout=5)
        if self.threads[0].is_alive():  # the host did not end with its driver: kill its tree
            self.stop.set()
            self.threads[0].join()
        for thread in self.threads[1:]:
            thread.join(timeout=5)
        return self.problem or self._problem()

    def _problem(self) -> str | None:
        """What kept the session from grading, from the trusted side's view (never the candidate's output)."""
        result = self.result
        if result is not None and result.killed_reason and result.killed_reason.startswith("sandbox "):
            return result.killed_reason  # the supervisor's own status: setup or exec failed
        if self.driver.returncode not in (0, None):
            tail = bytes(self.stderr).decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            return f"the test driver failed (exit {self.driver.returncode}): {tail[0][:200]}"
        return None


class GraderPool:
    """Warm sessions for one interpreter and one set of sandbox limits."""

    def __init__(self, python: str, limits: SandboxLimits):
        self.python, self.limits = python, limits
        self.idle: list[Session] = []
        self.lock = threading.Lock()
        self.closed = False

    def _checkout(self) -> tuple[Session | None, str | None]:
        with self.lock:
            while self.idle:
                session = self.idle.pop()
                if session.alive() and not session.worn():
                    return session, None
                threading.Thread(target=session.close, daemon=True).start()
        try:
            session = Session(self.python, self.limits)
        except OSError as exc:
            return None, f"the test driver could not start: {exc}"
        if session.ready():
            return session, None
        return None, session.close() or "the sandbox's host did not start"

    def _checkin(self, session: Session) -> None:
        with self.lock:
            if not self.closed and session.alive() and not session.worn():
                self.idle.append(session)
                return
        session.close()

    def grade_one(self, job: dict, budget_s: float) -> tuple[dict | None, str | None, bool]:
        """One job: (verdict, problem, stopped_for_time). A session that failed to grade it is replaced
        and the job tried once more on a fresh one; ``problem`` says why when no verdict came."""
        problem = None
        for attempt in range(2):
            session, problem = self._checkout()
            if session is None:
                continue
            verdict = session.grade(job, budget_s)
            if verdict is not None and verdict.get("host_gone"):
                problem = session.close(kill=True)
                if verdict.get("answered") or attempt or session.stopped_for_time:
                    return verdict, None, session.stopped_for_time
                continue  # the host was gone before this solution ran: not its doing, so once more
            if verdict is not None and "driver_error" not in verdict:
                self._checkin(session)
                return verdict, None, False
            if verdict is not None:
                problem = f"the test driver failed: {str(verdict['driver_error'])[:200]}"
                self._checkin(session)
            else:
                problem = session.close() or "the grader ended before this solution ran"
        return None, problem, False

    def grade(self, jobs: list[dict], budgets: dict[str, float], *, workers: int):
        """Grades ``jobs`` over up to ``workers`` sessions at a time; yields ``(job, verdict, problem, timed)``."""
        todo = deque(jobs)
        done: queue.Queue = queue.Queue()

        def work() -> None:
            while True:
                try:
                    job = todo.popleft()
                except IndexError:
                    done.put(None)
                    return
                try:
                    done.put((job, *self.grade_one(job, budgets[job["uid"]])))
                except BaseException as exc:  # a bug here must not lose the job: it is left unscored
                    done.put((job, None, f"the grader failed: {type(exc).__name__}: {exc}", False))

        count = max(1, min(workers, len(jobs)))
        threads = [threading.Thread(target=work, daemon=True) for _ in range(count)]
        for thread in threads:
            thread.start()
        finished = 0
        while finished < count:
            item = done.get()
            if item is None:
                finished += 1
            else:
                yield item

    def close(self) -> None:
        with self.lock:
            self.closed = True
            idle, self.idle = self.idle, []
        _together([session.close for session in idle])


_POOLS: dict[tuple[str, SandboxLimits], GraderPool] = {}
_POOLS_LOCK = threading.Lock()
_OWNER = [os.getpid()]


def pool_for(python: str, limits: SandboxLimits) -> GraderPool:
    """The warm pool for this interpreter and these limits (a few are kept, the oldest closed)."""
    with _POOLS_LOCK:
        if _OWNER[0] != os.getpid():  # a forked child: the parent's sessions are not ours to use
            _POOLS.clear()
            _OWNER[0] = os.getpid()
        key = (python, limits)
        pool = _POOLS.pop(key, None)
        if pool is None or pool.closed:
            if not _POOLS:  # the first pool of this process: its sessions end with it (not at import)
                atexit.unregister(close_pools)
                atexit.register(close_pools)
            pool = GraderPool(python, limits)
        _POOLS[key] = pool  # the most recently used last
        old = [k for k in _POOLS if k != key][: max(len(_POOLS) - MAX_POOLS, 0)]
        evicted = [_POOLS.pop(k) for k in old]
    for pool_ in evicted:
        pool_.close()
    return pool


def close_pools() -> None:
    """Ends every warm session of this process (at exit, or when a caller wants its processes back)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values()) if _OWNER[0] == os.getpid() else []
        _POOLS.clear()
    _together([pool.close for pool in pools])


def _together(closers: list) -> None:
    """Runs each closer in its own thread and waits for all: each waits on its own processes (seconds under
    load), and a process that graded should not leave one after another at exit."""
    threads = [threading.Thread(target=close) for close in closers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
