"""Small helpers shared by the supervisor modules: announcements, exit statuses, children.

Generic (nothing here knows rayserver): the procwraps use the /proc reader,
the subreaper flag and the signal names too.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

# A log record with this extra attribute is a message for the person at the
# terminal: terminal handlers show it bare, file handlers log it normally.
ANNOUNCE = "announce"

PR_SET_CHILD_SUBREAPER = 36


def announce(logger: logging.Logger, message: str, level: int = logging.INFO) -> None:
    """Log ``message`` and mark it as one the terminal shows verbatim."""
    logger.log(level, message, extra={ANNOUNCE: True})


def signal_name(num: int) -> str | None:
    """'SIGKILL' for 9; None for a number that names no signal here."""
    try:
        return signal.Signals(num).name
    except ValueError:
        return None


def describe_status(status: int) -> str:
    """'exit code 3' / 'killed by signal 9 (SIGKILL)' for a waitpid status."""
    if os.WIFSIGNALED(status):
        num = os.WTERMSIG(status)
        name = signal_name(num) or "unknown"
        return f"killed by signal {num} ({name})" + (
            " (core dumped)" if os.WCOREDUMP(status) else ""
        )
    if os.WIFEXITED(status):
        return f"exit code {os.WEXITSTATUS(status)}"
    return f"status {status:#x}"


def reap_exited() -> Iterator[tuple[int, int]]:
    """(pid, raw wait status) of each child that has exited, without waiting, until none."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def exit_code(status: int) -> int:
    """The shell's view of a waitpid status: the exit code, or 128 + signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 1


@functools.lru_cache(maxsize=1)
def libc() -> ctypes.CDLL:
    """The C library of this process (a dlopen, done once)."""
    return ctypes.CDLL(None, use_errno=True)


def set_child_subreaper() -> bool:
    """Become the reaper of orphaned descendants (Linux prctl); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class ProcStat(NamedTuple):
    """The fields of ``/proc/<pid>/stat`` that are used here."""

    state: str  # R, S, D, Z, T, ...
    ppid: int
    pgrp: int
    rss_pages: int
    cpu_ticks: int  # utime + stime, in clock ticks (os.sysconf("SC_CLK_TCK") a second)


def proc_stat(pid: int | str) -> ProcStat | None:
    """``/proc/<pid>/stat`` of one process, or None when it is gone (or unreadable).

    The command name (field 2) may hold spaces and parentheses: the fields
    are counted from the last ``)``.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return ProcStat(
            fields[0].decode(),
            int(fields[1]),
            int(fields[2]),
            int(fields[21]),
            int(fields[11]) + int(fields[12]),
        )
    except (IndexError, ValueError):
        return None


def list_children(pid: int | None = None) -> list[int]:
    """Pids of the live children of ``pid`` (default: this process), zombies excluded.

    Uses /proc/<pid>/task/*/children where the kernel offers it, else scans
    /proc for processes whose parent is ``pid``.
    """
    pid = os.getpid() if pid is None else pid
    found: set[int] = set()
    tasks = Path(f"/proc/{pid}/task")
    have_children_files = False
    with contextlib.suppress(OSError):
        for task in tasks.iterdir():
            children = task / "children"
            with contextlib.suppress(OSError):
                found.update(int(x) for x in children.read_text().split())
                have_children_files = True
    if not have_children_files:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            info = proc_stat(entry.name)
            if info is not None and info.ppid == pid and info.state != "Z":
                found.add(int(entry.name))
        return sorted(found)
    live = []
    for child in sorted(found):
        info = proc_stat(child)
        if info is not None and info.state != "Z":
            live.append(child)
    return live


def set_title(title: str | None) -> None:
    """Set the process title shown by ``ps`` (no-op when title is None)."""
    if title is None:
        return
    import setproctitle

    setproctitle.setproctitle(title)


def daemon_supported() -> bool:
    """Whether this platform can detach (double fork, setsid) and switch identity."""
    return os.name == "posix" and all(
        hasattr(os, name) for name in ("fork", "setsid", "setuid", "setgid", "initgroups")
    )
