"""The trusted driver's lines: to the host in the sandbox (start, kill) and to each solution's process.

Not imported by the package: ``grader_pool`` runs ``wire.py`` + this file + ``driver.py`` as one
standard-library program, outside the sandbox.

The host answers on a message socket: "<k> started" with the solution's two pipe ends attached, or
"<k> !died <how>" once it killed it, or "<k> !infra <why>" when it could not start it. Calls then go
straight to the solution's process as one JSON line each way; its end of file is its death.
"""

import json
import os
import select
import socket
import time

_KILL_WAIT_S = 10.0
_MAX_LINE = 16 << 20


class _TestTimeout(BaseException):
    pass


class _Died(Exception):
    """The candidate's process ended (or the host answered that it has no such process)."""


class _HostGone(Exception):
    """The host stopped answering: nothing more can run in this sandbox."""


class _Infra(Exception):
    """The host could not start the solution's process (no fault of the solution's)."""


class NotPlainResult(TypeError):
    pass


class _Link:
    """The host (start, kill) and the solution's own two pipes (calls), for the solution being tested."""

    def __init__(self, out_fd, in_fd):
        self.out_fd, self.in_fd = out_fd, in_fd  # to the host: a pipe; from it: a message socket
        self.sock = socket.socket(fileno=in_fd)
        self.child = None  # the current solution's pipes: requests to it, replies from it
        self.buf = bytearray()
        self.deadline = None
        self.nonplain = False
        self.current = None
        self.answered = 0

    def host_message(self, deadline):
        """The host's next message and the descriptors that came with it."""
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            raise _TestTimeout()
        ready, _, _ = select.select([self.in_fd], [], [], wait)
        if not ready:
            raise _TestTimeout()
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, 4)
        except OSError:
            raise _HostGone() from None
        if not data and not fds:
            raise _HostGone()
        return data.decode("utf-8", "replace").strip(), fds

    def host_reply(self, k, deadline):
        """The host's next word on solution ``k``: its pipes once started; raises ``_Died`` or ``_Infra``."""
        while True:
            text, fds = self.host_message(deadline)
            number, _, rest = text.partition(" ")
            if number == str(k) and rest == "started" and len(fds) == 2:
                self.answered += 1
                return fds
            for fd in fds:  # a late start of a solution we gave up on
                os.close(fd)
            if number != str(k):
                continue
            self.answered += 1
            if rest.startswith("!infra"):
                raise _Infra(rest[7:])
            raise _Died(rest[6:] if rest.startswith("!died") else "a malformed word from the host")

    def send(self, msg):
        data = (json.dumps(msg) + "\n").encode()
        try:
            while data:
                data = data[os.write(self.out_fd, data) :]
        except OSError:
            raise _HostGone() from None

    def drop_child(self):
        if self.child is not None:
            for fd in self.child:
                os.close(fd)
        self.child = None
        self.buf.clear()

    def to_child(self, msg, deadline):
        """Writes a request to the solution without blocking past ``deadline``."""
        data, fd = (json.dumps(msg) + "\n").encode(), self.child[0]
        while data:
            try:
                data = data[os.write(fd, data) :]
                continue
            except BlockingIOError:
                pass
            except OSError:  # it closed its end or died: reading its reply says which
                return
            wait = deadline - time.monotonic()
            if wait <= 0:
                raise _TestTimeout()
            select.select([], [fd], [], wait)

    def reply(self, k, deadline):
        """Solution ``k``'s next reply, as JSON; its end of file is its death (the host says how)."""
        fd = self.child[1]
        while True:
            end = self.buf.find(b"\n")
            if 0 <= end <= _MAX_LINE:
                line = bytes(self.buf[:end])
                del self.buf[: end + 1]
                self.answered += 1
                try:
                    return json.loads(line)
                except (ValueError, RecursionError):
                    raise NotPlainResult("a malformed reply") from None
            if len(self.buf) > _MAX_LINE:
                self.kill(k)
                raise _Died("reply over %d bytes" % _MAX_LINE)
            wait = deadline - time.monotonic()
            if wait <= 0:
                raise _TestTimeout()
            ready, _, _ = select.select([fd, self.in_fd], [], [], wait)
            if self.in_fd in ready:  # only a late word on an earlier solution, or the host's end
                for stale in self.host_message(None)[1]:
                    os.close(stale)
            if fd in ready:
                data = os.read(fd, 1 << 20)
                if not data:
                    raise _Died(self.kill(k))
                self.buf += data

    def kill(self, k, wait=True):
        """Stops solution ``k``'s process; with ``wait``, until the host says it is gone (and how).

        A host that does not answer (a solution stopped it with SIGSTOP) can serve no one: gone.
        """
        self.drop_child()
        self.send({"op": "kill", "k": k})
        deadline = time.monotonic() + _KILL_WAIT_S
        while wait:
            try:
                for fd in self.host_reply(k, deadline):  # the start we gave up on
                    os.close(fd)
            except (_Died, _Infra) as exc:
                return str(exc) or "gone"
            except _TestTimeout:
                raise _HostGone() from None
        return "killed"
