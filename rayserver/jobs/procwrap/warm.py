"""A warm procwrap: after a job that ended cleanly, the same process runs the next one.

A fork server's procwrap (see ``entry.run_spare``) does not exit after its
job when nothing of that job is left in it: it tells the fork server
``done <job> <exit code>`` (the fork server reports that exit to the worker
as it reports a reaped procwrap's) and waits for its next job id. A job
costs a datagram then, not a fork, a process start and an exit (page faults
of a fresh process, the first use of each module, its exit's unmapping).

Nothing of one job may reach the next. What a job changes in its procwrap,
and how it is undone or checked before another job runs here:

- the sandbox: Landlock, seccomp and the network namespace are entered by a
  short-lived thread per step (or a forked child), never by the procwrap's
  own thread, and rlimits are set in the step's process (prlimit or the
  forked child); nothing to undo, :func:`threads_left` checks the thread ended;
- the job's cgroup: the procwrap moves back to its own when the job's box
  closes; checked (:meth:`Turns.another`);
- children: every one reaped (the job's cpu time and peak memory come from
  its own children only: ``Job.usage``); one left over means no reuse;
- descriptors: no more open than before the first job;
- signal handlers and the wakeup pipe: reset to a spare's; the working
  directory: ``/``; the environment: each step gets its job's own, built
  from scratch (the procwrap's is never changed);
- the private TMPDIR: removed with the box.

A job that was signalled (cancel, shutdown, a limit) or hit an internal
error ends its procwrap, as before; so does the fork server's EOF (a dead
worker) and the :data:`MAX_JOBS` th job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from typing import TYPE_CHECKING

from rayserver.jobs.procwrap import limits
from rayserver.jobs.procwrap.exits import EXIT_CLAIM_LOST, EXIT_DONE, EXIT_FAILED

if TYPE_CHECKING:
    from rayserver.jobs.procwrap.job import Job

MAX_JOBS = 200  # then a fresh procwrap: whatever a long life accumulates goes with it
REUSABLE_CODES = (EXIT_DONE, EXIT_FAILED, EXIT_CLAIM_LOST)


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 1 << 30  # unknown: never more than the baseline... so never reused


class Turns:
    """When this procwrap may take another job (made before its first job)."""

    def __init__(self) -> None:
        self.served = 0
        self.fds = _open_fds()
        self.cgroup = limits.own_cgroup()

    def another(self, code: int, job: Job) -> bool:
        """True when the job that just ended left nothing behind and another may run here."""
        self.served += 1
        if self.served >= MAX_JOBS or code not in REUSABLE_CODES:
            return False
        if job.term_signal is not None or job.limit_reason is not None:
            return False
        return (
            not children_left()
            and not threads_left()
            and limits.own_cgroup() == self.cgroup
            and _open_fds() - 2 <= self.fds  # (the job's wake pipe is still open here)
        )


def children_left() -> bool:
    """Reap what has exited; True when a child of this process still lives."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def threads_left() -> bool:
    """True when a thread besides the main one lives (a relay, a step's spawning thread)."""
    return threading.active_count() > 1


def between_jobs(job: Job) -> None:
    """Back to a spare's state: default signal handlers, no wakeup pipe, cwd ``/``."""
    signal.set_wakeup_fd(-1)  # before its pipe closes: the fd number may be reused
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    job.close()
    with contextlib.suppress(OSError):
        os.chdir("/")  # a project folder is not held open (unmounts, removals)


def report_done(intake: socket.socket, job_id: int, code: int) -> bool:
    """``done <job> <code>`` to the fork server; False when it is gone (then exit)."""
    try:
        intake.send(b"done %d %d" % (job_id, code), socket.MSG_NOSIGNAL)
    except OSError:
        return False
    return True
