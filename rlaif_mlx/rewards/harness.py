"""The unit-test harness that runs inside the sandbox (``main.py`` there).

Not imported: ``graders.py`` reads this file and runs its text in the sandbox,
so it must stay standard-library only and self-contained.
"""

import json
import os
import signal
import sys
import types


class _TestTimeout(BaseException):
    pass


def _main():
    fd = int(os.environ.pop("SANDBOX_RESULT_FD"))
    nonce = sys.stdin.readline().strip()  # before any candidate code runs
    with open("payload.json", encoding="utf-8") as f:
        payload = json.load(f)
    os.remove("payload.json")
    write, dumps, setitimer = os.write, json.dumps, signal.setitimer  # patch-proof copies
    limit = payload["per_test_timeout_s"]

    def emit(**event):
        event["nonce"] = nonce
        try:
            write(fd, ("\n" + dumps(event) + "\n").encode())
        except (OSError, TypeError, ValueError):
            pass

    def on_alarm(signum, frame):
        raise _TestTimeout()

    def run(source, filename, ns):
        code = compile(source, filename, "exec", dont_inherit=True)
        signal.signal(signal.SIGALRM, on_alarm)
        setitimer(signal.ITIMER_REAL, limit)
        try:
            exec(code, ns)
        finally:
            setitimer(signal.ITIMER_REAL, 0)

    def describe(exc, source):
        if isinstance(exc, _TestTimeout):
            text = "timed out after %gs" % limit
        else:
            text = type(exc).__name__ + (": %s" % (exc,) if str(exc) else "")
        return (text + " in: " + source.splitlines()[0])[:300] if source else text[:300]

    module = types.ModuleType("solution")
    sys.modules["solution"] = module
    ns = module.__dict__
    emit(event="start")
    try:
        run(payload["solution"], "solution.py", ns)
    except BaseException as exc:
        emit(event="solution_error", error=describe(exc, ""), timeout=isinstance(exc, _TestTimeout))
        return
    emit(event="loaded")
    index = 0
    for kind, source in payload["pieces"]:
        error, timeout = None, False
        try:
            run(source, "<tests>", ns)
        except BaseException as exc:
            error = describe(exc, source)
            timeout = isinstance(exc, _TestTimeout)
        if kind == "test":
            emit(event="test", index=index, ok=error is None, error=error, timeout=timeout)
            index += 1
        elif error is not None:
            emit(event="setup_error", error=error)
    emit(event="done")


try:
    _main()
finally:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(0)  # skip atexit hooks and non-daemon threads the candidate left behind
