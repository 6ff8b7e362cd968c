"""The candidate host: runs inside the sandbox and serves the candidate's functions to the test driver.

Not imported by the package: ``grading`` runs ``wire.py`` + this file's text as
the sandbox's ``main.py``, so it stays standard-library only.

The host never sees a test or an expected value. It reads requests from the
driver (load this solution, kill it), forks one fresh process per solution
(after killing whatever the previous one left behind and removing every file it
wrote, so one host serves any number of solutions, batch after batch), and
hands the driver that process's two pipe ends over its message socket: the
driver then calls the solution's functions directly, as plain data. The
candidate's process can write anything into its reply pipe: the driver decodes
it as plain data, so the worst a forged reply can do is claim a return value,
and it cannot reach the host's socket or another solution's pipes.

The host makes itself non-dumpable first, so a candidate without capabilities
can neither ptrace it nor open its ``/proc/<pid>/fd`` or ``mem``.
"""

import gc
import json
import os
import resource
import signal
import socket
import sys
import types

_MAX_LINE = 16 << 20


class _Lines:
    """Line reader over a pipe, with a cap on one line's length."""

    def __init__(self, fd):
        self.fd, self.buf, self.eof = fd, bytearray(), False

    def pop(self):
        """One complete line, ``b""`` for one over the cap, or None when none is buffered."""
        end = self.buf.find(b"\n")
        if end < 0:
            if len(self.buf) > _MAX_LINE:
                self.buf.clear()
                return b""
            return None
        line = bytes(self.buf[:end])
        del self.buf[: end + 1]
        return line if len(line) <= _MAX_LINE else b""

    def fill(self):
        """Reads what the pipe holds; False at end of file."""
        try:
            data = os.read(self.fd, 1 << 20)
        except OSError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read(self):
        """The next line, blocking; None at end of file."""
        while True:
            line = self.pop()
            if line is not None or self.eof:
                return line
            self.fill()


def _write(fd, text):
    data = text.encode("utf-8", "replace")
    while data:
        data = data[os.write(fd, data) :]


def _nondumpable():
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: what a solution leaves is ours to reap


# ---- the candidate's process -------------------------------------------------------


class _CallTimeout(BaseException):
    pass


def _candidate(job, requests, replies):
    """Runs in the forked process: load the solution, then answer calls until the host stops us."""
    objects = {}

    def reply(obj):
        try:
            _write(replies, json.dumps(obj) + "\n")
        except (OSError, TypeError, ValueError):
            os._exit(0)

    def on_alarm(signum, frame):
        raise _CallTimeout()

    def timed(fn, seconds):
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def raised(exc):
        if isinstance(exc, _CallTimeout):
            return {"ok": False, "timeout": True}
        return {"ok": False, "raised": [type(exc).__name__, str(exc)[:300]]}

    def value(result):
        try:
            return {"ok": True, "value": wire_encode(result)}
        except NotPlain:
            objects[len(objects)] = result
            return {"ok": True, "handle": len(objects) - 1, "type": type(result).__name__, "callable": callable(result)}

    def target(spec, ns):
        return ns[spec[1]] if spec[0] == "name" else objects[spec[1]]

    module = types.ModuleType("solution")
    module.__file__ = "solution.py"
    sys.modules["solution"] = module
    ns = module.__dict__
    try:
        for source, filename in ((job["prelude"], "<prompt>"), (job["solution"], "solution.py")):
            if source:
                code = compile(source, filename, "exec", dont_inherit=True)
                timed(lambda code=code: exec(code, ns), job["timeout"])
    except BaseException as exc:
        reply(raised(exc) | {"load": True})
        os._exit(0)
    names = {}
    for name in job["names"]:
        if name in ns:
            names[name] = value(ns[name])
    reply({"ok": True, "names": names})
    lines = _Lines(requests)
    while True:
        line = lines.read()
        if not line:
            os._exit(0)
        try:
            msg = json.loads(line)
            obj = target(msg["target"], ns)
            refs = objects.__getitem__
            if msg["op"] == "get":
                result = value(timed(lambda obj=obj, name=msg["attr"]: getattr(obj, name), msg["timeout"]))
            else:
                args = [wire_decode(a, 0, refs) for a in msg["args"]]
                kwargs = {k: wire_decode(v, 0, refs) for k, v in msg["kwargs"]}
                result = value(timed(lambda obj=obj, args=args, kwargs=kwargs: obj(*args, **kwargs), msg["timeout"]))
                after = {}
                for key, arg in list(enumerate(args)) + list(kwargs.items()):
                    if type(arg) in (list, dict, set):
                        try:
                            after[str(key)] = wire_encode(arg)
                        except NotPlain:
                            pass
                result["after"] = after
        except BaseException as exc:
            result = raised(exc)
        reply(result)


# ---- the host -----------------------------------------------------------------------


_PLACE = {"own_namespace": False, "private_shm": False, "root": "."}


def _end_all(pid):
    """Kills the solution's process and every process it left, and reaps them all; its exit status.

    In a pid namespace this host is the subreaper of everything the solution started, so once
    ``waitpid`` says no child is left, none of the solution's processes is (a fork racing the
    listing is caught by the next pass). Without one, only its process group can be found.
    """
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
        except OSError:
            pass
    status = None
    while True:
        if _PLACE["own_namespace"]:
            for entry in os.listdir("/proc"):
                if entry.isdigit() and int(entry) not in (1, os.getpid()):
                    try:
                        os.kill(int(entry), signal.SIGKILL)
                    except OSError:
                        pass
        try:
            done, code = os.waitpid(-1 if _PLACE["own_namespace"] else pid, 0)
        except ChildProcessError:
            break
        if done == pid:
            status = code
            if not _PLACE["own_namespace"]:
                break
    while True:  # without a namespace: what else has ended by now
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break
    return status


def _remove(path):
    """Removes a file or a whole folder, opening folders a solution closed (chmod 0); no recursion."""
    stack = [(path, False)]
    while stack:
        path, emptied = stack.pop()
        try:
            if os.path.islink(path) or not os.path.isdir(path):
                os.unlink(path)
            elif emptied:
                os.rmdir(path)
            else:
                os.chmod(path, 0o700)
                stack.append((path, True))
                stack.extend((os.path.join(path, name), False) for name in os.listdir(path))
        except OSError:
            pass


def _clean(root, private_shm):
    """Removes every file a solution left (its folder, the rest of ours, the private /dev/shm), so the
    next one starts from the same empty state; False when something could not be removed."""
    bases = (root, "/dev/shm") if private_shm else (root,)
    try:
        os.chmod(root, 0o700)
        for base in bases:
            for name in os.listdir(base):
                _remove(os.path.join(base, name))
        return not any(os.listdir(base) for base in bases)
    except OSError:
        return False


class _Child:
    def __init__(self, number, pid):
        self.number, self.pid = number, pid

    def stop(self):
        """Kills the solution's process and everything it left, reaps them and removes its files."""
        status = _end_all(self.pid)
        if not _clean(_PLACE["root"], _PLACE["private_shm"]):
            os._exit(0)  # what is left could reach the next solution: this sandbox ends, a fresh one follows
        return status


def _start(job, keep_closed, root):
    """Forks the solution's process; the ends of its two pipes that the driver uses are returned."""
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    folder = os.path.join(root, "c%d" % job["k"])
    try:
        os.mkdir(folder, 0o700)
        pid = os.fork()
    except OSError:
        for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
            os.close(fd)
        raise
    if pid == 0:
        try:
            os.setpgid(0, 0)
            for fd in (*keep_closed, to_child_w, from_child_r):
                os.close(fd)
            os.chdir(folder)
            cpu = job.get("cpu")
            if type(cpu) is int and cpu > 0:  # this solution's own CPU budget; the host lives longer
                hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
                top = cpu + 1 if hard == resource.RLIM_INFINITY else min(cpu + 1, hard)
                resource.setrlimit(resource.RLIMIT_CPU, (min(cpu, top), top))
            _candidate(job, to_child_r, from_child_w)
        finally:
            os._exit(0)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass
    os.close(to_child_r)
    os.close(from_child_w)
    return _Child(job["k"], pid), (to_child_w, from_child_r)


def _describe(status):
    if status is None:
        return "gone"
    if os.WIFSIGNALED(status):
        return "killed by signal %d" % os.WTERMSIG(status)
    return "exited with status %d" % os.waitstatus_to_exitcode(status)


def _host():
    requests_fd, replies_fd = int(os.environ.pop("RLAIF_RPC_IN")), int(os.environ.pop("RLAIF_RPC_OUT"))
    _PLACE["own_namespace"] = os.environ.pop("RLAIF_PID_NAMESPACE", "0") == "1"
    _PLACE["private_shm"] = os.environ.pop("RLAIF_PRIVATE_SHM", "0") == "1"
    os.environ.pop("SANDBOX_RESULT_FD", None)  # the solutions answer through their own pipes only
    _nondumpable()
    root = _PLACE["root"] = os.getcwd()
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != root]
    _clean(root, _PLACE["private_shm"])  # main.py is read: every solution starts in an empty folder
    gc.freeze()  # the solutions' collections leave the host's objects (and their shared pages) alone
    replies = socket.socket(fileno=replies_fd)  # a message socket: each write one message, fds may ride along
    driver = _Lines(requests_fd)
    _write(replies_fd, "ready\n")
    child = None
    while True:
        line = driver.read()
        if not line:
            break
        msg = json.loads(line)
        status = child.stop() if child is not None else None  # every request ends the solution before
        child = None
        k = msg.get("k", -1)
        if msg["op"] == "kill":
            _write(replies_fd, "%d !died %s\n" % (k, _describe(status)))
        elif msg["op"] == "load":
            try:
                child, ends = _start(msg, (requests_fd, replies_fd), root)
            except OSError as exc:  # e.g. EAGAIN: another session's processes fill the user's limit
                _write(replies_fd, "%d !infra cannot start a process: %s\n" % (k, exc.strerror or exc))
                continue
            try:  # the driver talks to the solution directly, on these two pipes
                socket.send_fds(replies, [b"%d started\n" % k], list(ends))
            except OSError:
                break
            finally:
                for fd in ends:
                    os.close(fd)
    if child is not None:
        child.stop()


try:
    _host()
finally:
    os._exit(0)
