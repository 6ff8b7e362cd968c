"""The candidate host: runs inside the sandbox and serves the candidate's functions to the test driver.

Not imported by the package: ``grading`` runs ``wire.py`` + this file's text as
the sandbox's ``main.py``, so it stays standard-library only.

The host never sees a test or an expected value. It reads requests from the
driver (load this solution, call this function with these plain arguments,
read this attribute), forks one fresh process per solution (after killing
whatever the previous one left behind), and relays that process's replies
line by line, tagged with the solution's number. The candidate's process can
write anything into its reply pipe: the driver decodes it as plain data, so the
worst a forged reply can do is claim a return value.

The host makes itself non-dumpable first, so a candidate without capabilities
can neither ptrace it nor open its ``/proc/<pid>/fd`` or ``mem``.
"""

import json
import os
import select
import signal
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

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0


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


def _kill_others(own_namespace):
    """Kills every process of the namespace but the supervisor (pid 1) and this host."""
    if not own_namespace:
        return
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in (1, os.getpid()):
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


class _Child:
    def __init__(self, number, pid, to_child, from_child):
        self.number, self.pid, self.to_child, self.lines = number, pid, to_child, _Lines(from_child)

    def stop(self, own_namespace):
        for kill in (lambda: os.killpg(self.pid, signal.SIGKILL), lambda: os.kill(self.pid, signal.SIGKILL)):
            try:
                kill()
            except OSError:
                pass
        _kill_others(own_namespace)
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = None
        for fd in (self.to_child, self.lines.fd):
            os.close(fd)
        while True:  # reap whatever the candidate left (we are its subreaper only in a namespace)
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    break
            except ChildProcessError:
                break
        return status


def _start(job, drivers, root):
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    folder = os.path.join(root, "c%d" % job["k"])
    os.mkdir(folder, 0o700)
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            for fd in (*drivers, to_child_w, from_child_r):
                os.close(fd)
            os.chdir(folder)
            _candidate(job, to_child_r, from_child_w)
        finally:
            os._exit(0)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass
    os.close(to_child_r)
    os.close(from_child_w)
    return _Child(job["k"], pid, to_child_w, from_child_r)


def _describe(status):
    if status is None:
        return "gone"
    if os.WIFSIGNALED(status):
        return "killed by signal %d" % os.WTERMSIG(status)
    return "exited with status %d" % os.waitstatus_to_exitcode(status)


def _send(child, data, driver):
    """Writes a request to the child without blocking the host: False when the driver spoke first."""
    os.set_blocking(child.to_child, False)
    while data:
        try:
            data = data[os.write(child.to_child, data) :]
            continue
        except BlockingIOError:
            pass
        except OSError:  # the child closed its end or died: the relay reports it
            return True
        ready, _, _ = select.select([driver.fd], [child.to_child], [])
        if driver.fd in ready:
            return False
    return True


def _relay(child, driver, out, own_namespace):
    """Waits for the child's next reply and forwards it; a kill from the driver or the child's end ends it."""
    while True:
        line = child.lines.pop()
        if line is not None:
            if line == b"":
                child.stop(own_namespace)
                _write(out, "%d !died reply over %d bytes\n" % (child.number, _MAX_LINE))
                return False
            _write(out, "%d %s\n" % (child.number, line.decode("utf-8", "replace")))
            return True
        if child.lines.eof:
            status = child.stop(own_namespace)
            _write(out, "%d !died %s\n" % (child.number, _describe(status)))
            return False
        ready, _, _ = select.select([child.lines.fd, driver.fd], [], [])
        if driver.fd in ready:
            return None  # the driver speaks (a kill): the caller reads it
        child.lines.fill()


def _host():
    requests_fd, replies_fd = int(os.environ.pop("RLAIF_RPC_IN")), int(os.environ.pop("RLAIF_RPC_OUT"))
    own_namespace = os.environ.pop("RLAIF_PID_NAMESPACE", "0") == "1"
    os.environ.pop("SANDBOX_RESULT_FD", None)  # the solutions answer through the host only
    _nondumpable()
    root = os.getcwd()
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != root]
    driver = _Lines(requests_fd)
    _write(replies_fd, "ready\n")
    child = None
    pending = None
    while True:
        line = pending if pending is not None else driver.read()
        pending = None
        if not line:
            break
        msg = json.loads(line)
        op = msg["op"]
        if op in ("kill", "unload") or (op == "load" and child is not None):
            status = child.stop(own_namespace) if child is not None else None
            child = None
            if op == "kill":  # the driver waits for this line
                _write(replies_fd, "%d !died %s\n" % (msg.get("k", -1), _describe(status)))
            if op != "load":
                continue
        if op == "load":
            try:
                child = _start(msg, (requests_fd, replies_fd), root)
            except OSError as exc:  # e.g. EAGAIN: another session's processes fill the user's limit
                _write(replies_fd, "%d !infra cannot start a process: %s\n" % (msg["k"], exc.strerror or exc))
                continue
        elif child is None or msg.get("k") != child.number:
            _write(replies_fd, "%d !died no such solution\n" % msg.get("k", -1))
            continue
        elif not _send(child, line + b"\n", driver):
            pending = driver.read()
            continue
        alive = _relay(child, driver, replies_fd, own_namespace)
        if alive is None:
            pending = driver.read()
        elif alive is False:
            child = None
    if child is not None:
        child.stop(own_namespace)


try:
    _host()
finally:
    os._exit(0)
