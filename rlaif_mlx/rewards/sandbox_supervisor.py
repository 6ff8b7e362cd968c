"""The sandbox supervisor program, run as ``python -I -S -B -c <this file's text> CONFIG``.

Not imported: ``sandbox.py`` reads this file and hands its text to the child
interpreter, so it must stay standard-library only and self-contained.
"""

import json
import os
import re
import sys

cfg = json.loads(sys.argv[1])
work, status_fd = cfg["workdir"], cfg["status_fd"]
os.set_inheritable(status_fd, False)  # the code never gets this pipe


def report(line):
    try:
        os.write(status_fd, (line + "\n").encode())
    except OSError:
        pass


if sys.platform.startswith("linux"):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]


def check(ret, what):
    if ret != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), what)


def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), target)


RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
KEEP = {
    "nosuid": 2,
    "nodev": 4,
    "noexec": 8,
    "noatime": 1024,
    "nodiratime": 2048,
    "relatime": 1 << 21,
    "strictatime": 1 << 24,
}


def private_dev(dev="/dev"):
    # Device nodes stay writable on a read-only mount and uid 0, even without
    # capabilities, may open e.g. block devices: keep only harmless nodes.
    stage = os.path.join(work, ".dev")
    os.mkdir(stage)
    mount("/dev", stage, None, BIND | REC)
    mount("tmpfs", dev, "tmpfs", NOSUID | NOEXEC, "mode=755,size=64k")
    for name in ("null", "zero", "full", "random", "urandom"):
        if os.path.exists(os.path.join(stage, name)):
            open(dev + "/" + name, "w").close()
            mount(os.path.join(stage, name), dev + "/" + name, None, BIND)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink("/proc/self/fd/%d" % i, dev + "/" + name)
    os.symlink("/proc/self/fd", dev + "/fd")
    os.mkdir(dev + "/shm")
    mount("tmpfs", dev + "/shm", "tmpfs", NOSUID | NODEV | NOEXEC, "mode=1777,size=16m")
    check(libc.umount2(stage.encode(), 2), stage)  # MNT_DETACH
    os.rmdir(stage)


def show(path, stage):
    """Makes ``path`` appear at the same place under ``stage`` (a bind mount, or the same symlink)."""
    target = stage + path
    if os.path.islink(path):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            os.symlink(os.readlink(path), target)
    elif os.path.isdir(path) and not os.path.ismount(target):
        os.makedirs(target, exist_ok=True)
        mount(path, target, None, BIND | REC)


def pivot_into_view(view):
    """A new root holding only the interpreter, system libraries, /etc, /proc, a private /dev and
    the working folder; the rest of the machine (the user's files, task files) is not there."""
    stage = view["stage"]
    os.makedirs(stage, exist_ok=True)
    mount("tmpfs", stage, "tmpfs", NOSUID | NODEV, "mode=755,size=1m")
    for path in sorted(view["shown"], key=len):
        if os.path.lexists(path):
            show(path, stage)
    os.makedirs(stage + work)
    mount(work, stage + work, None, BIND)
    os.makedirs(stage + "/proc")
    mount("/proc", stage + "/proc", None, BIND | REC)
    os.makedirs(stage + "/dev")
    private_dev(stage + "/dev")
    os.makedirs(stage + "/.old")
    os.chdir(stage)
    number = {"x86_64": 155, "aarch64": 41}[os.uname().machine]  # SYS_pivot_root
    check(libc.syscall(number, b".", b".old"), "pivot_root")
    os.chdir("/")
    check(libc.umount2(b"/.old", 2), "/.old")  # MNT_DETACH
    os.rmdir("/.old")
    for path in view["hidden"]:
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", NOSUID | NODEV | RDONLY, "mode=755,size=4k")


def make_readonly():
    mount(None, "/", None, REC | PRIVATE)
    mount(work, work, None, BIND)
    mount(None, work, None, REMOUNT | BIND | NOSUID | NODEV)
    if cfg["view"]:
        pivot_into_view(cfg["view"])
    else:
        private_dev()
    for line in open("/proc/self/mountinfo").read().splitlines():
        parts = line.split()
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
        opts = parts[5].split(",")
        if point in (work, "/dev/shm") or "ro" in opts:
            continue
        # Keep the per-mount flags: in a user namespace they are locked.
        flags = REMOUNT | BIND | RDONLY | sum(KEEP.get(o, 0) for o in set(opts))
        try:
            mount(None, point, None, flags)
        except FileNotFoundError:
            pass  # hidden under the private /dev: unreachable anyway


def drop_privileges(kind):
    for cap in range(int(open("/proc/sys/kernel/cap_last_cap").read()) + 1):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP: no exec can regain it
    if kind == "uid":
        os.setgroups([])
        os.setgid(cfg["nobody"])
        os.setuid(cfg["nobody"])
    else:
        check(libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()), "capset")
    check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS


def set_limits():
    import resource

    for name, (soft, hard) in cfg["limits"].items():
        try:
            res = getattr(resource, name)
            top = resource.getrlimit(res)[1]
            if top != resource.RLIM_INFINITY:
                soft, hard = min(soft, top), min(hard, top)
            resource.setrlimit(res, (soft, hard))
        except (AttributeError, ValueError, OSError):
            pass  # best effort, e.g. RLIMIT_AS on macOS


try:
    if cfg["readonly"]:
        make_readonly()
    set_limits()
except Exception as exc:
    report("setup-error %r" % (exc,))
    os._exit(121)

pid = os.fork()
if pid == 0:
    try:
        os.chdir(work)  # after the bind mount, so relative paths hit the writable dir
        if cfg["drop"]:
            drop_privileges(cfg["drop"])
        os.execve(cfg["argv"][0], cfg["argv"], os.environ)
    except BlockingIOError as exc:  # EAGAIN: the user's process limit (RLIMIT_NPROC) is reached, by anyone's
        report("exec-error cannot start a process: %s" % (exc.strerror,))
    except BaseException as exc:
        report("exec-error %r" % (exc,))
    os._exit(122)

for fd in [cfg["result_fd"], *cfg["keep_fds"]]:
    os.close(fd)
while True:  # as pid 1 of a namespace we also reap orphans
    try:
        done, status = os.wait()
    except InterruptedError:
        continue
    if done == pid:
        break
if os.WIFSIGNALED(status):
    report("signal %d" % os.WTERMSIG(status))
    os._exit(128 + os.WTERMSIG(status))
report("exit %d" % os.waitstatus_to_exitcode(status))
os._exit(os.waitstatus_to_exitcode(status))
