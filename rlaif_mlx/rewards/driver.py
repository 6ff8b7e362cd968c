"""The trusted test driver: runs a task's tests, with the candidate's functions served from the sandbox.

Not imported by the package: ``grader_pool`` runs ``wire.py`` + ``driver_link.py`` + this
file's text as ``python -I -B -c``, outside the sandbox, so it stays standard-library only.

The task's test code (setup, asserts, ``check(candidate)``, helpers, loops)
runs here, in a process the candidate's code never runs in. Every name the
tests take from the solution (``candidate``, the entry point, a class) is a
stand-in that forwards calls to the candidate's process as plain data and
decodes the answer into fresh built-in objects, so every ``==``, ``abs(...) <
tol``, ``math.isclose`` or truth test compares values this process made. An
object that is not plain data comes back as a stand-in whose comparisons,
truth value and hash raise: such a test fails. Expected values never leave
this process. A test passes only when its code ran to the end here.

Input (stdin): one JSON job a line, for as long as the pool keeps this driver. Output (stdout):
"ready" (or "gone") once the host answered, then one JSON verdict per job.
"""

import builtins
import json
import os
import signal
import sys
import time


class _Stand:
    """The driver's stand-in for one of the candidate's objects (a function, a class, an instance)."""

    __slots__ = ("_conn", "_k", "_spec", "_type")

    def __init__(self, conn, k, spec, type_name):
        object.__setattr__(self, "_conn", conn)
        object.__setattr__(self, "_k", k)
        object.__setattr__(self, "_spec", spec)
        object.__setattr__(self, "_type", type_name)

    def __call__(self, *args, **kwargs):
        return self._conn.ask(self, {"op": "call"}, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._conn.ask(self, {"op": "get", "attr": name}, (), {})

    def __setattr__(self, name, value):
        raise NotPlainResult("cannot set attributes of the candidate's objects from the tests")

    def __repr__(self):
        return "<the candidate's %s object>" % self._type

    def _refuse(self, *args):
        raise NotPlainResult("the candidate returned a %s object, not plain data" % self._type)

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __hash__ = __len__ = _refuse
    __iter__ = __contains__ = __getitem__ = __index__ = __int__ = __float__ = __abs__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refuse
    __neg__ = __pos__ = __round__ = __mod__ = __rmod__ = __floordiv__ = __rfloordiv__ = __pow__ = _refuse


class _Conn(_Link):
    """The link, plus calls made through the stand-ins and their answers decoded as plain data."""

    def ask(self, stand, msg, args, kwargs):
        k = stand._k
        if k != self.current:
            raise _Died("that object's process was restarted")

        def ref_of(value):
            return value._spec[1] if type(value) is _Stand and value._spec[0] == "ref" and value._k == k else None

        try:
            msg = dict(msg, k=k, target=stand._spec, timeout=max(self.deadline - time.monotonic(), 0.001))
            msg["args"] = [wire_encode(a, 0, None, ref_of) for a in args]
            msg["kwargs"] = [[key, wire_encode(v, 0, None, ref_of)] for key, v in kwargs.items()]
        except NotPlain as exc:
            raise TypeError("the test passes a value that is not plain data (%s) to the candidate" % exc) from None
        outer = _STATE["in_rpc"]
        _STATE["in_rpc"] = True  # the alarm must not land inside the protocol: the wait has its own deadline
        try:
            try:
                self.to_child(msg, self.deadline)
                answer = self.reply(k, self.deadline)
            except _TestTimeout:
                self.kill(k, wait=False)  # the host ends it before it starts the next one
                raise
        finally:
            _STATE["in_rpc"] = outer
        if not outer and time.monotonic() >= self.deadline:
            raise _TestTimeout()  # the alarm fired while we waited
        return self.result(k, answer, args, kwargs)

    def result(self, k, answer, args=(), kwargs=None):
        if type(answer) is not dict:
            raise NotPlainResult("a malformed reply")
        if answer.get("ok") is not True:
            if answer.get("timeout") is True:
                raise _TestTimeout()
            raised = answer.get("raised")
            if type(raised) is list and len(raised) == 2 and all(type(x) is str for x in raised):
                cls = getattr(builtins, raised[0], None)
                if type(cls) is type and issubclass(cls, Exception) and cls.__module__ == "builtins":
                    raise cls(raised[1])
                raise RuntimeError("the candidate raised %s: %s" % (raised[0], raised[1]))
            raise NotPlainResult("a malformed reply")
        if "handle" in answer:
            if type(answer["handle"]) is not int or type(answer.get("type")) is not str:
                raise NotPlainResult("a malformed reply")
            self.nonplain = True
            return _Stand(self, k, ["ref", answer["handle"]], answer["type"][:80])
        try:
            value = wire_decode(answer.get("value"))
            after = answer.get("after") or {}
            for key, arg in list(enumerate(args)) + list((kwargs or {}).items()):
                if str(key) in after and type(arg) in (list, dict, set):
                    new = wire_decode(after[str(key)])
                    if type(new) is not type(arg):
                        continue
                    if type(arg) is list:
                        arg[:] = new
                    else:
                        arg.clear()
                        arg.update(new)
        except (NotPlain, ValueError, TypeError, RecursionError, AttributeError) as exc:
            raise NotPlainResult("the candidate's answer is not plain data (%s)" % exc) from None
        return value


def _describe(exc, source):
    if isinstance(exc, _TestTimeout):
        text = "timed out"
    elif isinstance(exc, _Died):
        text = "the candidate's process ended (%s)" % exc
    else:
        text = type(exc).__name__ + (": %s" % (exc,) if str(exc) else "")
    first = source.strip().splitlines()[0] if source.strip() else ""
    return (text + (" in: " + first if first else ""))[:300]


def _on_alarm(signum, frame):
    if not _STATE["in_rpc"]:
        raise _TestTimeout()


_STATE = {"in_rpc": False, "loads": 0}
_CODE = {}


def _load(conn, job):
    """Starts a fresh process for the solution; the namespace the tests run in, or raises."""
    _STATE["loads"] += 1
    conn.drop_child()
    k = conn.current = _STATE["loads"]
    conn.send(
        {
            "op": "load",
            "k": k,
            "prelude": job["prelude"],
            "solution": job["solution"],
            "names": job["names"],
            "timeout": job["per_test"],
            "cpu": job["cpu"],
        }
    )
    try:
        conn.child = conn.host_reply(k, conn.deadline)
        os.set_blocking(conn.child[0], False)
        answer = conn.reply(k, conn.deadline)
    except _TestTimeout:
        conn.kill(k)  # waits: a host that cannot start a process in time is gone
        raise
    if type(answer) is not dict:
        raise _Died("a malformed reply")
    if answer.get("ok") is not True:
        if answer.get("timeout") is True:
            raise _TestTimeout()
        raised = answer.get("raised") or ["?", ""]
        raise RuntimeError("%s: %s" % (str(raised[0])[:80], str(raised[1])[:200]))
    ns = {"__name__": "__tests__", "__builtins__": builtins}
    names = answer.get("names")
    if type(names) is not dict:
        raise _Died("a malformed reply")
    for name, value in names.items():
        if name in job["names"] and type(value) is dict:
            conn.deadline = time.monotonic() + job["per_test"]
            ns[name] = (
                conn.result(k, value)
                if "handle" not in value
                else _Stand(conn, k, ["name", name], str(value.get("type"))[:80])
            )
    return ns


def _run_job(conn, job):
    started = time.monotonic()
    end = started + job["timeout"]
    passed, failures = 0, []
    timed_out = crashed = False
    load_error = None
    ns = None
    index = 0
    for kind, source in job["pieces"]:
        error = None
        try:
            if ns is None:
                if load_error is not None:
                    raise RuntimeError("the solution does not load")
                try:
                    conn.deadline = min(time.monotonic() + job["per_test"], end)
                    _STATE["in_rpc"] = True
                    ns = _load(conn, job)
                except (_TestTimeout, _Died, RuntimeError, NotPlainResult) as exc:
                    load_error = _describe(exc, "")
                    crashed = crashed or isinstance(exc, _Died)
                    timed_out = timed_out or isinstance(exc, _TestTimeout)
                    raise RuntimeError("the solution does not load") from None
                finally:
                    _STATE["in_rpc"] = False
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise _TestTimeout()
            conn.deadline = time.monotonic() + min(job["per_test"], remaining)
            code = _CODE.get(source)
            if code is None:  # a task's tests come back batch after batch: compile each piece once
                if len(_CODE) > 4096:
                    _CODE.clear()
                code = _CODE[source] = compile(source, "<tests>", "exec", dont_inherit=True)
            signal.setitimer(signal.ITIMER_REAL, conn.deadline - time.monotonic())
            try:
                exec(code, ns)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except (_HostGone, _Infra):
            raise
        except BaseException as exc:
            error = _describe(exc, source)
            if isinstance(exc, (_TestTimeout, _Died)):
                timed_out = timed_out or isinstance(exc, _TestTimeout)
                crashed = crashed or isinstance(exc, _Died)
                ns = None  # the process is gone: a fresh one for the next piece
        if kind == "test":
            index += 1
            if error is None:
                passed += 1
            elif len(failures) < 5:
                failures.append(error)
    return {
        "uid": job["uid"],
        "passed": passed,
        "total": index,
        "timed_out": timed_out,
        "crashed": crashed,
        "load_error": load_error,
        "failures": failures,
        "nonplain": conn.nonplain,
        "seconds": round(time.monotonic() - started, 4),
    }


def _main():
    verdicts = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the tests print goes to stderr: stdout carries verdicts only
    conn = _Conn(int(os.environ["RLAIF_RPC_OUT"]), int(os.environ["RLAIF_RPC_IN"]))
    signal.signal(signal.SIGALRM, _on_alarm)
    try:
        ready = conn.host_message(time.monotonic() + 60)[0] == "ready"
    except (_TestTimeout, _HostGone):
        ready = False
    print("ready" if ready else "gone", file=verdicts, flush=True)
    if not ready:
        return
    for line in iter(sys.stdin.readline, ""):  # one job a line, for as long as the pool keeps us
        job = json.loads(line)
        conn.nonplain = False
        conn.current = None
        conn.answered = 0
        try:
            verdict = _run_job(conn, job)
            if conn.current is not None:  # the host ends it (and cleans up) before it starts the next one
                conn.kill(conn.current, wait=False)
        except _HostGone:  # "answered": whether the host died before this solution's code could run
            print(
                json.dumps({"uid": job["uid"], "host_gone": True, "answered": conn.answered}), file=verdicts, flush=True
            )
            return
        except _Infra as exc:
            print(json.dumps({"uid": job["uid"], "driver_error": str(exc)}), file=verdicts, flush=True)
            continue
        except BaseException as exc:  # a bug here, not the candidate's doing: the trainer counts it
            print(
                json.dumps({"uid": job["uid"], "driver_error": "%s: %s" % (type(exc).__name__, exc)}),
                file=verdicts,
                flush=True,
            )
            continue
        print(json.dumps(verdict), file=verdicts, flush=True)


_main()
