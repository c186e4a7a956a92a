"""A shared lock on a step's ambient files while its program reads them in.

Radiance opens an existing ambient file and reads every record in it
without a lock: its first ``aflock(F_RDLCK)`` returns at once, because the
remembered lock type starts as zero, which is F_RDLCK on Linux
(src/rt/ambient.c). A process that opens the file while another is in the
middle of appending sees part of a record at the end, says ``ignoring last 0
values in ambient file (corrupted)`` and truncates the file under the
writer, whose write then goes on past the new end (a run of zeros, or a
record cut in two); its stdio buffer is then left part-full, so its first
records go out unlocked and mid-record. Shown with a writer holding the lock
in mid-append (docs/operations.md, "Shared ambient files").

So the procwrap takes a shared fcntl lock on the file before it starts the
program and keeps it until a process of the step has the file open, has
read it to its end (its file position, in /proc, at the file's size) and
has gone past its check of the file's length: after the read, Radiance
compares its position with ``lseek(SEEK_END)`` and truncates the file to
its position if they differ, still without a lock. An append that lands in
between is cut off, and a writer that had already sought to the old end then
writes past the new one (a run of zeros: 1 round in 100 of concurrent first
writers on a busy machine). Nothing in /proc shows that check, so the lock
is kept until the reader has run ``PAST_CHECK_CPU`` of cpu time since its
read (the check takes microseconds; a preempted reader gains none), or
sleeps (it waits for its input or for a writer's lock: both after the
check), or has ended. Radiance's writers wait for that lock before each
append, so no append is in progress while the newcomer reads and checks.
The lock holds back the other writers' appends only, and for as long as the
program takes to start and read the file (at most ``HOLD_LIMIT``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
from typing import Protocol

from rayserver.jobs.procwrap.confine import ConfinementError, open_confined
from supervisor.util import proc_stat

HOLD_LIMIT = 60.0  # seconds: a program that takes longer to load its scene is let go
LOCK_WAIT = 30.0  # seconds for the shared lock (writers hold theirs only to append)
PAST_CHECK_CPU = 0.02  # seconds of the reader's cpu time after its read (see above)
_POLL = 0.005
_TICKS = os.sysconf("SC_CLK_TCK")


class StepLog(Protocol):
    def log(self, text: str) -> None: ...


class ReadGuard:
    """Shared locks taken before a step starts, each released once the step has read its file."""

    def __init__(self, job: StepLog, workdir: str, names: list[str]) -> None:
        self._job = job
        self._held: dict[str, int] = {}  # name -> locked descriptor
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for rel in names:
            try:
                fd = open_confined(workdir, rel, write=False)
            except ConfinementError:
                continue  # absent: nothing to read in yet
            if shared_lock(fd, LOCK_WAIT):
                self._held[rel] = fd
            else:
                os.close(fd)
                job.log(f"rayserver: the ambient file {rel} stayed locked; not guarded\n")

    def started(self, pid: int, *, whole_group: bool) -> None:
        """Watch the step (``pid``, or its whole process group) in a thread until it has read."""
        if not self._held:
            return
        self._thread = threading.Thread(
            target=self._watch, args=(pid, whole_group), name="ambient-guard", daemon=True
        )
        self._thread.start()

    def release(self) -> None:
        """Drop every lock still held (the step ended or could not start)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()

    def _watch(self, pid: int, whole_group: bool) -> None:
        deadline = time.monotonic() + HOLD_LIMIT
        readers: dict[str, tuple[int, float]] = {}  # name -> (reader pid, its cpu at the read)
        while self._held and not self._stop.wait(_POLL):
            pids = _group(pid) if whole_group else [pid]
            for rel, fd in list(self._held.items()):
                if rel not in readers:
                    st = os.fstat(fd)
                    reader = next(
                        (p for p in pids if read_through(p, st.st_dev, st.st_ino, st.st_size)),
                        None,
                    )
                    if reader is None:
                        continue
                    readers[rel] = (reader, cpu_seconds(reader) or 0.0)
                if past_check(*readers[rel]):
                    del self._held[rel]
                    os.close(fd)  # (closing our only descriptor of it drops our lock)
            if time.monotonic() > deadline and self._held:
                names = ", ".join(self._held)
                self._job.log(
                    f"rayserver: the step had not read the ambient file {names} after "
                    f"{HOLD_LIMIT:g} s; its lock is released\n"
                )
                for fd in self._held.values():
                    os.close(fd)
                self._held.clear()


def past_check(pid: int, cpu_at_read: float) -> bool:
    """Is the process that read the file through past Radiance's length check (see above)?

    True once it has ended, sleeps (state S: blocked on its input or a lock),
    or has run PAST_CHECK_CPU seconds of cpu time since its read.
    """
    info = proc_stat(pid)
    if info is None or info.state in ("S", "Z", "X"):
        return True  # (None: ended and reaped)
    now = cpu_seconds(pid)
    return now is None or now - cpu_at_read >= PAST_CHECK_CPU


def cpu_seconds(pid: int) -> float | None:
    """The process's cpu time so far: nanoseconds from schedstat, else clock ticks."""
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    info = proc_stat(pid)
    return None if info is None else info.cpu_ticks / _TICKS


# struct flock on Linux (LP64): l_type, l_whence, padding, l_start, l_len, l_pid, padding.
_FLOCK = struct.Struct("hhxxxxqqixxxx")


def shared_lock(fd: int, wait: float) -> bool:
    """A shared whole-file lock on ``fd`` within ``wait`` seconds (writers hold theirs briefly).

    An open file description lock (F_OFD_SETLK): it conflicts with the POSIX
    fcntl locks Radiance takes, but unlike one of those it belongs to ``fd``
    alone. A POSIX lock of this process would go the moment the process
    closes any other descriptor of the file, as the receipt's hashing of the
    step's inputs does just before the step starts: the guard was gone before
    the program read the file (1 round in ~100 of concurrent first writers on
    a loaded machine, "ignoring last 0 values" in the test's job logs).
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0))
            return True
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN) or time.monotonic() > deadline:
                return False
        time.sleep(0.01)


def read_through(pid: int, dev: int, ino: int, size: int) -> bool:
    """Has process ``pid`` a descriptor of the file (dev, ino) positioned at ``size`` or more?"""
    base = f"/proc/{pid}"
    try:
        names = os.listdir(f"{base}/fd")
    except OSError:
        return False
    for name in names:
        try:
            st = os.stat(f"{base}/fd/{name}")
            if (st.st_dev, st.st_ino) != (dev, ino):
                continue
            with open(f"{base}/fdinfo/{name}", "rb") as f:
                pos = int(f.readline().split()[1])  # "pos:\t<offset>"
        except (OSError, ValueError, IndexError):
            continue
        if pos >= size:
            return True
    return False


def _group(pgid: int) -> list[int]:
    """Live members of process group ``pgid`` (rad, its shell, its rpict)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = proc_stat(name)
            if info is not None and info.state != "Z" and info.pgrp == pgid:
                out.append(int(name))
    return out
