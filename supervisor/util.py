"""Small helpers shared by the supervisor modules: announcements, exit statuses, children."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
from pathlib import Path

# A log record with this extra attribute is a message for the person at the
# terminal: terminal handlers show it bare, file handlers log it normally.
ANNOUNCE = "announce"

PR_SET_CHILD_SUBREAPER = 36


def announce(logger: logging.Logger, message: str, level: int = logging.INFO) -> None:
    """Log ``message`` and mark it as one the terminal shows verbatim."""
    logger.log(level, message, extra={ANNOUNCE: True})


def describe_status(status: int) -> str:
    """'exit code 3' / 'killed by signal 9 (SIGKILL)' for a waitpid status."""
    if os.WIFSIGNALED(status):
        num = os.WTERMSIG(status)
        try:
            name = signal.Signals(num).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {num} ({name})" + (
            " (core dumped)" if os.WCOREDUMP(status) else ""
        )
    if os.WIFEXITED(status):
        return f"exit code {os.WEXITSTATUS(status)}"
    return f"status {status:#x}"


def exit_code(status: int) -> int:
    """The shell's view of a waitpid status: the exit code, or 128 + signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 1


def set_child_subreaper() -> bool:
    """Become the reaper of orphaned descendants (Linux prctl); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


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
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[-1].split()
            if len(fields) > 1 and int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry.name))
        return sorted(found)
    live = []
    for child in sorted(found):
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z":
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
