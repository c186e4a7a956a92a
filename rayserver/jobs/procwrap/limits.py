"""A job's limits that the procwrap enforces itself: log size, live processes, the memory cgroup.

- :class:`CappedLog`: beyond ``max_log_bytes`` the log keeps its head and
  its tail, with a line saying how much was dropped; the job goes on.
- :func:`descendants`: every live process below the procwrap. The procwrap
  is a child subreaper, so a step's process that left its process group
  (``setsid``) or was orphaned still hangs below it: the count of
  ``max_job_processes`` and the final sweep see them all.
- The memory cgroup (cgroup v2 with a delegated subtree, as systemd gives a
  unit with ``Delegate=yes``): the daemon moves itself into
  ``<its cgroup>/server`` at start and enables the memory controller for
  the children; each job gets ``<its cgroup>/job-<id>`` with
  ``memory.max`` (and ``pids.max``), which its procwrap moves into, so
  every step is born there. Without such a subtree the memory limit is an
  rlimit of each process.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable

from supervisor.util import proc_stat

SERVER_LEAF = "server"
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


class CappedLog:
    """Writes a job log to ``fd``, keeping at most about ``max_bytes`` of it.

    The first half is written as it comes; after that only the newest
    bytes are kept (in memory, at most half the limit) and written by
    :meth:`finish`, after a line saying how many bytes were dropped.
    ``max_bytes`` 0 means no limit.
    """

    def __init__(
        self, fd: int, max_bytes: int, on_capped: Callable[[], None] | None = None
    ) -> None:
        self.fd = fd
        self.max_bytes = max_bytes
        self.on_capped = on_capped  # called once, when the limit is first reached
        self.head_left = max_bytes // 2 if max_bytes else -1
        self.tail_max = max(0, max_bytes // 2 - 256)
        self.tail: deque[bytes] = deque()
        self.tail_len = 0
        self.dropped = 0
        self.capped = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.head_left < 0:
            self._raw(data)
            return
        if not self.capped:
            if len(data) <= self.head_left:
                self.head_left -= len(data)
                self._raw(data)
                return
            cut = data.rfind(b"\n", 0, self.head_left) + 1 if self.head_left else 0
            self._raw(data[:cut])
            self._raw(
                f"\nrayserver: the log reached max_log_bytes ({self.max_bytes} bytes): "
                "output is dropped from here on; its last part follows at the end of "
                "the job\n".encode()
            )
            self.capped = True
            if self.on_capped is not None:
                self.on_capped()
            data = data[cut:]
        self.tail.append(data)
        self.tail_len += len(data)
        while self.tail_len - len(self.tail[0]) >= self.tail_max and len(self.tail) > 1:
            self.dropped += len(self.tail[0])
            self.tail_len -= len(self.tail.popleft())

    def finish(self) -> None:
        """Write the kept tail (if the log was capped), once; later writes are not capped."""
        self.head_left = -1
        if not self.capped or not self.tail:
            return
        tail = b"".join(self.tail)
        self.tail.clear()
        excess = len(tail) - self.tail_max
        if excess > 0:
            self.dropped += excess
            tail = tail[excess:]
        newline = tail.find(b"\n")
        if 0 <= newline < len(tail) - 1:  # start at a whole line
            self.dropped += newline + 1
            tail = tail[newline + 1 :]
        self._raw(
            f"rayserver: {self.dropped} bytes of output were dropped (max_log_bytes = "
            f"{self.max_bytes}); the last {len(tail)} bytes follow\n".encode()
        )
        self._raw(tail)
        self.tail_len = 0

    def _raw(self, data: bytes) -> None:
        while data:
            n = os.write(self.fd, data)
            data = data[n:]


def descendants(root: int) -> list[tuple[int, int]]:
    """Live (non-zombie) processes below ``root`` as (pid, rss kB), found through /proc."""
    children: dict[int, list[tuple[int, str, int]]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = proc_stat(name)
            if info is not None:
                children.setdefault(info.ppid, []).append((int(name), info.state, info.rss_pages))
    out: list[tuple[int, int]] = []
    todo = [root]
    while todo:
        for pid, state, rss in children.get(todo.pop(), ()):
            todo.append(pid)
            if state != "Z":
                out.append((pid, rss * _PAGE_KB))
    return out


def has_children() -> bool:
    """Has this process any child (so possibly descendants)? One small read, no /proc scan.

    Every live descendant of a subreaper hangs from one of its children (an
    orphan is re-parented to it), so no child means no descendant at all.
    """
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as fh:
            return bool(fh.read().strip())
    except OSError:
        return True  # no such file (an old kernel): scan


def kill_descendants(root: int, rounds: int = 50) -> int:
    """SIGKILL every process below ``root`` until none is left; how many were killed.

    Repeated because a process may fork between the scan and its kill.
    Zombies are left to the caller's reaping.
    """
    import signal
    import time

    killed: set[int] = set()
    if root == os.getpid() and not has_children():
        return 0
    for _ in range(rounds):
        live = descendants(root)
        if not live:
            break
        for pid, _rss in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.005)
    return len(killed)


# --- cgroup v2 ------------------------------------------------------------------


def _cgroup2_mount() -> str:
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split()[4]
    except OSError:
        pass
    return ""


def own_cgroup(mount: str | None = None) -> str:
    """The folder of this process's cgroup v2 ("" when there is none)."""
    mount = _cgroup2_mount() if mount is None else mount
    if not mount:
        return ""
    try:
        with open("/proc/self/cgroup") as fh:
            for line in fh:
                if line.startswith("0::"):
                    return os.path.join(mount, line[3:].strip().lstrip("/"))
    except OSError:
        pass
    return ""


def _words(path: str) -> set[str]:
    try:
        with open(path) as fh:
            return set(fh.read().split())
    except OSError:
        return set()


def _delegated(folder: str) -> bool:
    """Was ``folder`` handed to us? systemd marks a delegated cgroup with an xattr;
    a folder owned by an ordinary user can only have been delegated to it."""
    for name in ("trusted.delegate", "user.delegate"):
        with contextlib.suppress(OSError):
            if os.getxattr(folder, name) == b"1":
                return True
    try:
        owner = os.stat(folder).st_uid
    except OSError:
        return False
    return owner != 0 and owner == os.geteuid()


def setup_cgroup(own: str | None = None) -> str:
    """At daemon start: the delegated subtree this server may make job cgroups in, or "".

    Needs a cgroup v2 folder of our own with the memory controller
    available and writable by us (``Delegate=yes``). This process moves
    into ``<own>/server`` (a cgroup with children may hold no processes),
    then memory (and pids) are enabled for the children.
    """
    own = own_cgroup() if own is None else own
    if not own or os.path.basename(own) == SERVER_LEAF:
        return delegated_cgroup(own)
    if "memory" not in _words(os.path.join(own, "cgroup.controllers")):
        return ""
    if not _delegated(own) or not os.access(os.path.join(own, "cgroup.subtree_control"), os.W_OK):
        return ""
    try:
        leaf = os.path.join(own, SERVER_LEAF)
        os.makedirs(leaf, exist_ok=True)
        with open(os.path.join(leaf, "cgroup.procs"), "w") as fh:
            fh.write(str(os.getpid()))
        with open(os.path.join(own, "cgroup.subtree_control"), "w") as fh:
            fh.write(
                "+memory +pids" if "pids" in _words(own + "/cgroup.controllers") else "+memory"
            )
    except OSError:
        return ""
    return own


def delegated_cgroup(own: str | None = None) -> str:
    """The subtree made by :func:`setup_cgroup` that this process lives in, or ""."""
    own = own_cgroup() if own is None else own
    if not own or os.path.basename(own) != SERVER_LEAF:
        return ""
    base = os.path.dirname(own)
    if "memory" not in _words(os.path.join(base, "cgroup.subtree_control")):
        return ""
    return base if os.access(base, os.W_OK) else ""


def make_job_cgroup(base: str, job_id: int, memory_bytes: int, processes: int) -> str:
    """``<base>/job-<id>`` with memory.max (and pids.max); its folder."""
    path = os.path.join(base, f"job-{int(job_id)}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "memory.max"), "w") as fh:
        fh.write(str(memory_bytes) if memory_bytes else "max")
    if processes and os.path.exists(os.path.join(path, "pids.max")):
        with open(os.path.join(path, "pids.max"), "w") as fh:
            fh.write(str(processes))
    return path


def enter_job_cgroup(base: str, job_id: int, memory_bytes: int, processes: int) -> str:
    """Make the job's cgroup and move this process (the procwrap) into it; its folder."""
    path = make_job_cgroup(base, job_id, memory_bytes, processes)
    with open(os.path.join(path, "cgroup.procs"), "w") as fh:
        fh.write(str(os.getpid()))
    return path


def leave_job_cgroup(home: str) -> None:
    """Back to the procwrap's own cgroup, so the job's can be removed (best effort)."""
    if home:
        with contextlib.suppress(OSError), open(os.path.join(home, "cgroup.procs"), "w") as fh:
            fh.write(str(os.getpid()))


def remove_job_cgroup(path: str) -> None:
    """Remove a job's cgroup once it is empty (best effort)."""
    if path:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def memory_events_oom(path: str) -> int:
    """How often the job's cgroup killed for memory (memory.events oom_kill)."""
    try:
        with open(os.path.join(path, "memory.events")) as fh:
            for line in fh:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0
