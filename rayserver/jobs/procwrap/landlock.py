"""Landlock (Linux 5.13+) through ctypes: the kernel's ABI and one job's ruleset.

Landlock lets an unprivileged process restrict itself, and everything it
starts, to the file hierarchies it names; the restriction cannot be undone,
holds for root too, and survives exec. The ruleset is built once per job in
the procwrap (outside the box) and applied in each step's child between fork
and exec (:meth:`Ruleset.restrict_self`).

Rights the running kernel does not know are masked off, so the same code
runs on every ABI: REFER from ABI 2, TRUNCATE from 3, TCP bind/connect from
4, IOCTL_DEV from 5, the scopes (abstract unix sockets, signals) from 6.
What an older ABI cannot restrict is covered elsewhere (see sandbox.py:
seccomp denies sockets everywhere and ``truncate(2)`` below ABI 3).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os

SYS_CREATE_RULESET = 444  # the same number on every architecture (new syscall table)
SYS_ADD_RULE = 445
SYS_RESTRICT_SELF = 446
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
# Rights that a rule on a file (not a folder) may carry.
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV

READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
# Everything beneath a writable folder, except device nodes and sockets.
WRITE = (
    READ
    | FS_WRITE_FILE
    | FS_REMOVE_DIR
    | FS_REMOVE_FILE
    | FS_MAKE_DIR
    | FS_MAKE_REG
    | FS_MAKE_FIFO
    | FS_MAKE_SYM
    | FS_REFER
    | FS_TRUNCATE
)


class LandlockError(OSError):
    """A Landlock call failed; the message names the call and the reason."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel's struct is packed: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.syscall.restype = ctypes.c_long
    return lib


def _syscall(name: str, number: int, *args: object) -> int:
    ret = _libc().syscall(ctypes.c_long(number), *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise LandlockError(err, f"{name}: {os.strerror(err)}")
    return int(ret)


@functools.lru_cache(maxsize=1)
def abi_version() -> int:
    """The Landlock ABI of the running kernel; 0 when it has none or it is disabled."""
    try:
        return _syscall(
            "landlock_create_ruleset",
            SYS_CREATE_RULESET,
            None,
            ctypes.c_size_t(0),
            ctypes.c_uint32(CREATE_RULESET_VERSION),
        )
    except LandlockError as exc:
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
            return 0
        raise


def fs_rights(abi: int) -> int:
    """The file-system rights ABI ``abi`` handles."""
    best = max((v for v in _FS_BY_ABI if v <= abi), default=0)
    return _FS_BY_ABI.get(best, 0)


def why_unavailable() -> str:
    """A sentence saying why Landlock is missing (for the start-up refusal)."""
    try:
        lsm = open("/sys/kernel/security/lsm").read().strip()  # noqa: SIM115 - one small read
    except OSError:
        lsm = ""
    release = os.uname().release
    if lsm and "landlock" not in lsm.split(","):
        return (
            f"Landlock is built into kernel {release} but not enabled (active security "
            f"modules: {lsm}); add landlock to the kernel's lsm= boot parameter"
        )
    return f"kernel {release} offers no Landlock (it needs Linux 5.13 or newer with Landlock)"


class Ruleset:
    """One Landlock ruleset: the folders a job may read and write, and no TCP at all.

    Built in the procwrap; :meth:`restrict_self` is called in the step's
    child. The descriptor is close-on-exec, so no step inherits it.
    """

    def __init__(self, abi: int | None = None) -> None:
        self.abi = abi_version() if abi is None else abi
        if self.abi < 1:
            raise LandlockError(errno.EOPNOTSUPP, why_unavailable())
        self.fs = fs_rights(self.abi)
        attr = _RulesetAttr(self.fs, 0, 0)
        if self.abi >= 4:
            attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP  # and no port is allowed
        if self.abi >= 6:
            attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        # The struct grew with the ABIs: pass the size this kernel knows.
        size = 8 if self.abi < 4 else (16 if self.abi < 6 else 24)
        self.fd = _syscall(
            "landlock_create_ruleset",
            SYS_CREATE_RULESET,
            ctypes.byref(attr),
            ctypes.c_size_t(size),
            ctypes.c_uint32(0),
        )
        self.granted: list[tuple[str, int]] = []

    def allow(self, path: str, rights: int) -> bool:
        """Grant ``rights`` beneath ``path`` (a folder) or on it (a file).

        Returns False when the path does not exist (nothing granted). The
        path is opened with O_PATH and resolved: a rule holds for the real
        folder a symlink such as /bin points to.
        """
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            allowed = rights & self.fs
            if not os.path.isdir(f"/proc/self/fd/{fd}"):
                allowed &= FILE_RIGHTS
            rule = _PathBeneathAttr(allowed, fd)
            _syscall(
                f"landlock_add_rule({path})",
                SYS_ADD_RULE,
                ctypes.c_int(self.fd),
                ctypes.c_int(RULE_PATH_BENEATH),
                ctypes.byref(rule),
                ctypes.c_uint32(0),
            )
        finally:
            os.close(fd)
        self.granted.append((path, allowed))
        return True

    def restrict_self(self) -> None:
        """Enter the ruleset's domain (needs no_new_privs); for a step's child only."""
        _syscall(
            "landlock_restrict_self",
            SYS_RESTRICT_SELF,
            ctypes.c_int(self.fd),
            ctypes.c_uint32(0),
        )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def covers_tcp(self) -> bool:
        return self.abi >= 4

    @property
    def covers_truncate(self) -> bool:
        return self.abi >= 3

    @property
    def scopes(self) -> bool:
        return self.abi >= 6
