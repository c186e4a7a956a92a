"""Small ctypes wrappers the box needs: prctl, capabilities, namespaces, signal defaults.

Capabilities, no_new_privs, seccomp filters and Landlock domains belong to
a thread, not to the whole process; namespaces too, except that a user
namespace can only be entered by a single-threaded process. sandbox.py
relies on both facts (see its docstring).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# Python ignores these and the procwrap catches TERM/INT/HUP: a step gets the
# defaults back (rad's pipelines need SIGPIPE; SIGXFSZ ends an oversized write).
DEFAULT_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGPIPE", "SIGXFSZ", "SIGXFZ", "SIGTERM", "SIGINT", "SIGHUP", "SIGCHLD")
    if hasattr(signal, name)
)


@functools.lru_cache(maxsize=1)
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def prctl(option: int, arg2: int, arg3: int = 0) -> None:
    _check(
        libc().prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0), f"prctl({option})"
    )


def no_new_privs() -> None:
    """This thread (and what it starts) can never gain privileges by exec (setuid files)."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def enter_userns_netns(uid: int, gid: int) -> None:
    """A new user namespace (uid and gid mapped 1:1) with a new, empty network namespace.

    Single-threaded processes only (a forked child).
    """
    _check(libc().unshare(CLONE_NEWUSER | CLONE_NEWNET), "unshare(CLONE_NEWUSER|CLONE_NEWNET)")
    maps = (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1"))
    for name, text in maps:
        with open(f"/proc/self/{name}", "w") as fh:
            fh.write(text)


def unshare_net() -> None:
    """A new, empty network namespace for this thread (root: needs CAP_SYS_ADMIN)."""
    _check(libc().unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop_capabilities() -> None:
    """Root without capabilities (this thread): bounding set emptied, every set cleared."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as fh:
            last = int(fh.read())
    except (OSError, ValueError):
        last = 40
    for cap in range(last + 1):
        with contextlib.suppress(OSError):
            prctl(PR_CAPBSET_DROP, cap)
    with contextlib.suppress(OSError):
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    _check(libc().capset(ctypes.byref(header), (_CapData * 2)()), "capset")


def reset_signals() -> None:
    """In a forked child before exec: the signal defaults a program expects."""
    signal.set_wakeup_fd(-1)
    for sig in DEFAULT_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def try_in_child(action: object) -> bool:
    """Run ``action()`` in a throw-away forked child; True when it did not raise."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            action()  # type: ignore[operator]
            code = 0
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


_userns_ok: bool | None = None


def userns_available() -> bool:
    """Can this user make a user+network namespace? Tried once, in a throw-away child."""
    global _userns_ok
    if _userns_ok is None:
        _userns_ok = try_in_child(lambda: enter_userns_netns(os.geteuid(), os.getegid()))
    return _userns_ok
