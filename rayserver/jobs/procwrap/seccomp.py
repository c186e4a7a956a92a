"""A small seccomp filter for job steps: no sockets of any kind, no io_uring, no key rings.

Landlock restricts files and (from ABI 4) TCP, but not UDP, raw or netlink
sockets, and not ``connect`` to a unix socket *file*: a step could reach
``/run/user/<uid>/bus`` (and through systemd run anything, unconfined), the
munge socket of Slurm, or the network over UDP. A network namespace hides
the network but not socket files. So every ``socket()`` call of a step is
refused with EACCES, which covers every family at once; ``socketpair()``
(anonymous, connects nothing) stays allowed. ``io_uring`` is refused
because its operations can create and connect sockets without the
``socket`` system call; ``keyctl`` and friends because the user key ring is
shared by every process of the server's user. Below Landlock ABI 3 the
path-based ``truncate(2)`` is refused too (Landlock cannot control it there).

The filter is classic BPF, built here from the kernel's documented layout
(``struct seccomp_data``: nr at 0, arch at 4); a system call of a foreign
architecture (32-bit code, x32) is refused outright, since its numbers
differ. Installed with ``prctl(PR_SET_SECCOMP)`` after no_new_privs.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import struct

PR_SET_SECCOMP = 22
PR_GET_SECCOMP = 21
SECCOMP_MODE_FILTER = 2
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06
_X32_BIT = 0x40000000

# (audit arch, {name: number}) per machine; io_uring and keyctl numbers are per arch too.
_ARCHES: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (
        0xC000003E,
        {
            "socket": 41,
            "truncate": 76,
            "add_key": 248,
            "request_key": 249,
            "keyctl": 250,
            "io_uring_setup": 425,
            "io_uring_enter": 426,
            "io_uring_register": 427,
        },
    ),
    "aarch64": (
        0xC00000B7,
        {
            "socket": 198,
            "truncate": 45,
            "add_key": 217,
            "request_key": 218,
            "keyctl": 219,
            "io_uring_setup": 425,
            "io_uring_enter": 426,
            "io_uring_register": 427,
        },
    ),
}


class SeccompError(OSError):
    """The filter cannot be built or installed here."""


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def denied_calls(*, deny_truncate: bool) -> dict[str, int]:
    """The refused system calls and their errno."""
    calls = {
        "socket": errno.EACCES,
        "io_uring_setup": errno.ENOSYS,  # programs fall back to plain I/O on ENOSYS
        "io_uring_enter": errno.ENOSYS,
        "io_uring_register": errno.ENOSYS,
        "add_key": errno.EACCES,
        "request_key": errno.EACCES,
        "keyctl": errno.EACCES,
    }
    if deny_truncate:
        calls["truncate"] = errno.EACCES
    return calls


def build_filter(*, deny_truncate: bool, machine: str | None = None) -> bytes:
    """The BPF program (raw instructions) for this machine's architecture."""
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        raise SeccompError(
            errno.EOPNOTSUPP,
            f"no seccomp filter for the {machine} architecture "
            f"(known: {', '.join(sorted(_ARCHES))})",
        )
    arch, numbers = _ARCHES[machine]
    calls = denied_calls(deny_truncate=deny_truncate)
    prog = [
        _insn(_LD_W_ABS, 0, 0, 4),  # arch
        _insn(_JEQ_K, 1, 0, arch),
        _insn(_RET_K, 0, 0, RET_ERRNO | errno.ENOSYS),  # a foreign ABI: nothing runs
        _insn(_LD_W_ABS, 0, 0, 0),  # nr
    ]
    if machine == "x86_64":
        prog.append(_insn(_JGE_K, 0, 1, _X32_BIT))  # x32 numbers carry this bit
        prog.append(_insn(_RET_K, 0, 0, RET_ERRNO | errno.ENOSYS))
    for name, err in calls.items():
        prog.append(_insn(_JEQ_K, 0, 1, numbers[name]))
        prog.append(_insn(_RET_K, 0, 0, RET_ERRNO | err))
    prog.append(_insn(_RET_K, 0, 0, RET_ALLOW))
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def available() -> bool:
    """True when the kernel has seccomp filters (PR_GET_SECCOMP answers)."""
    return _libc().prctl(PR_GET_SECCOMP, 0, 0, 0, 0) >= 0


class Filter:
    """A built filter, kept alive until a child installs it (:meth:`install`)."""

    def __init__(self, *, deny_truncate: bool) -> None:
        self.code = build_filter(deny_truncate=deny_truncate)
        self._buf = ctypes.create_string_buffer(self.code, len(self.code))
        self._prog = _SockFprog(len(self.code) // 8, ctypes.addressof(self._buf))

    def install(self) -> None:
        """Apply the filter to this process and its future children (needs no_new_privs)."""
        if _libc().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(self._prog), 0, 0):
            err = ctypes.get_errno()
            raise SeccompError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")
