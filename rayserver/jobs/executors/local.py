"""The local executor: jobs run on this host, each in a procwrap forked by the fork server.

Procwraps of a previous worker that still run are adopted (recognised by
their command line) and polled; a procwrap that died without recording a
final state gets one here, with a reason decoded from its wait status, and
whatever is left of its step is killed first. A cancel signals the
procwrap's group; a backstop SIGKILLs it if it ignores the cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable

from rayserver.common.states import ACTIVE_STATES, JobState
from rayserver.jobs import procwrap
from rayserver.jobs.executors.base import LOCAL, SchedulerEvents
from rayserver.jobs.executors.forkclient import ForkServerClient
from rayserver.jobs.executors.forkserver import ForkServer, ForkServerError
from rayserver.jobs.jobdb import JobDB
from rayserver.jobs.rows import JobRow
from supervisor.util import describe_status, proc_stat

log = logging.getLogger("rayserver.jobs.executors.local")

POLL_INTERVAL = 0.25  # adopted procwraps (not our fork server's children)
LAUNCH_RETRY = 2.0  # after the fork server failed a launch
LEFTOVER_WAIT = 1.0  # s for a SIGKILLed step group to vanish before the record


def procwrap_alive(pid: int | None, job_id: int) -> bool:
    """True when ``pid`` is a live (non-zombie) procwrap of ``job_id``.

    The title check guards against a reused pid: ``job=<id>`` must be one of
    the words of its command line, next to the procwrap marker.
    """
    if not pid or pid <= 0:
        return False
    try:
        raw = open(f"/proc/{pid}/cmdline", "rb").read()  # noqa: SIM115 - tiny read
    except OSError:
        return False
    info = proc_stat(pid)
    if info is None or info.state == "Z":
        return False
    words = raw.replace(b"\0", b" ").decode("utf-8", "replace").split()
    return f"job={job_id}" in words and any(
        w.endswith("/procwrap.pyo") or w == "rayserver.procwrap" for w in words
    )


class LocalExecutor:
    """Procwraps on this host: launched through the fork server, adopted ones polled."""

    name = LOCAL

    def __init__(
        self,
        db: JobDB,
        fork_server: ForkServer,
        events: SchedulerEvents,
        grace: Callable[[], float],
        resume: Callable[[], bool] = lambda: True,
    ) -> None:
        self.db = db
        self.events = events
        self._grace = grace
        self._resume = resume  # the setting resume_interrupted, as it is now
        self.fork = ForkServerClient(
            fork_server,
            self._on_fork_exit,
            on_lost=self._on_fork_lost,
            on_final=self._on_final,
            on_change=self._on_change,
        )
        self._running: dict[int, int] = {}  # job id -> procwrap pid (0 while launching)
        self._cpus: dict[int, int] = {}  # job id -> cpu slots it takes (its -n / rad -N)
        self._capacity = 1
        self._adopted: dict[int, int] = {}  # the subset we poll: not our fork server's
        self._backstops: dict[int, asyncio.Task[None]] = {}
        self._records: set[asyncio.Task[None]] = set()  # dead jobs being recorded
        self._stopping = False
        self._dispatching = False
        self._fork_lost = False
        self._launch_paused_until = 0.0  # monotonic; after the fork server failed a launch

    @property
    def running_count(self) -> int:
        return len(self._running)

    @property
    def used_cpus(self) -> int:
        """Cpu slots taken by the running jobs: each its ``cpus`` (jobspec.job_cpus)."""
        return sum(self._cpus.get(job_id, 1) for job_id in self._running)

    def _slots(self, row: JobRow) -> int:
        # A job wider than the host (its record was edited down) waits to run alone.
        return max(1, min(int(row.cpus or 1), self._capacity))

    @property
    def adopted(self) -> dict[int, int]:
        """Job id -> pid of the procwraps polled because our fork server did not start them."""
        return dict(self._adopted)

    @property
    def grace(self) -> float:
        return self._grace()

    # --- adoption and watching ---------------------------------------------------

    async def adopt(self) -> None:
        for row in self.db.in_states((JobState.RUNNING,)):
            if row.executor != self.name:
                continue
            job_id, pid = row.id, row.pid
            if procwrap_alive(pid, job_id):
                self._cpus[job_id] = self._slots(row)
                self._watch(job_id, pid or 0)
                log.info("adopted job %s (procwrap pid %s)", job_id, pid)
            else:
                await self._record_dead(
                    row,
                    JobState.INTERRUPTED,
                    f"its procwrap (pid {pid}) was gone when the server "
                    "restarted: the job died with the server",
                )

    def _watch(self, job_id: int, pid: int) -> None:
        self._running[job_id] = pid
        self._adopted[job_id] = pid
        # Not our fork server's child: its datagrams go to the previous worker.
        self.events.job_changed(job_id, fed=False)

    async def run(self) -> None:
        """Poll the adopted procwraps (ours report their exit through the fork server)."""
        while not self._stopping:
            await asyncio.sleep(POLL_INTERVAL)
            for job_id, pid in list(self._adopted.items()):
                if procwrap_alive(pid, job_id):
                    continue
                row = self.db.get(job_id)
                if row and not row.final:
                    await self._record_dead(
                        row,
                        JobState.INTERRUPTED,
                        f"its procwrap (pid {pid}) ended without recording "
                        "a result (exit status unknown: adopted process)",
                    )
                self._finished(job_id)

    # --- dispatch -----------------------------------------------------------------

    def dispatch_now(self, capacity: int) -> None:
        """Start queued local jobs while cpu slots are free (only sends; no awaits)."""
        if self._dispatching:
            return  # re-entered from a callback below: the outer loop goes on
        self._dispatching = True
        try:
            self._launch_while_free(capacity)
        finally:
            self._dispatching = False

    def _launch_while_free(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        while not self._stopping and self.used_cpus < capacity:
            if self._fork_lost or time.monotonic() < self._launch_paused_until:
                return
            row = self.db.next_queued(executor=self.name)
            if row is None or row.id in self._running:
                # (A job queued again to resume whose old procwrap has not exited yet
                # waits for that exit: two runs of one job must never overlap.)
                return
            if self.used_cpus + self._slots(row) > capacity:
                return  # it waits for enough free cpus (nothing overtakes it)
            job_id = row.id
            if not self.db.mark_starting(job_id):
                continue  # cancelled or taken meanwhile
            # Our fork server's procwrap tells us of each change from now on.
            self.events.job_changed(job_id, fed=True)
            self._cpus[job_id] = self._slots(row)
            self._running[job_id] = 0  # hold the slot: the exit may come before the pid
            try:
                self.fork.launch_nowait(job_id, self._launched_callback(job_id))
            except ForkServerError as exc:
                self._running.pop(job_id, None)
                self.db.unstart(job_id, reason=f"could not be started: {exc}")
                self.events.job_changed(job_id)
                raise

    async def dispatch(self, capacity: int) -> int:
        before = len(self._running)
        self.dispatch_now(capacity)
        return max(0, len(self._running) - before)

    def _launched_callback(self, job_id: int) -> Callable[[int | None, str | None], None]:
        def launched(pid: int | None, error: str | None) -> None:
            if pid is not None:
                if job_id in self._running:  # not yet over (its exit may come first)
                    self._running[job_id] = pid
                log.info("job %s started (procwrap pid %s)", job_id, pid)
                return
            self._running.pop(job_id, None)
            self.db.unstart(job_id, reason=f"could not be started: {error}")
            self.events.job_changed(job_id)
            log.error("cannot start job %s: %s; retrying in %g s", job_id, error, LAUNCH_RETRY)
            self._launch_paused_until = time.monotonic() + LAUNCH_RETRY
            self.events.notify()

        return launched

    # --- exits ----------------------------------------------------------------------

    def _on_final(self, job_id: int) -> None:
        """A procwrap committed its job's final state (it is about to exit).

        Its waiters are answered and its slot reused now; the exit report
        that follows still checks the row (see :meth:`_on_fork_exit`).
        """
        self.events.job_changed(job_id)
        if job_id in self._running and job_id not in self._adopted:
            self._finished(job_id)

    def _on_change(self, job_id: int) -> None:
        """A procwrap changed its job's row (claimed it, wrote progress)."""
        self.events.job_changed(job_id)

    def _on_fork_exit(self, job_id: int, pid: int, status: int) -> None:
        """The fork server reaped a procwrap (called in the event loop)."""
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == procwrap.EXIT_RESUMED:
            log.info("job %s: procwrap %s queued it again to resume", job_id, pid)
            self._finished(job_id)  # its slot is free: the job may start again now
            return
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == procwrap.EXIT_CLAIM_LOST:
            self._running.pop(job_id, None)
            if not self._adopt_claimer(job_id, pid):
                log.info("job %s: procwrap %s found nothing to run", job_id, pid)
                self._finished(job_id)
            return
        row = self.db.get(job_id)
        if row and not row.final and row.pid in (pid, None):
            # Killed by a signal: ended from outside, not the job's fault. The
            # slot stays taken until the record is written.
            state = JobState.INTERRUPTED if os.WIFSIGNALED(status) else JobState.FAILED
            reason = (
                f"its procwrap (pid {pid}) ended ({describe_status(status)}) "
                "before it recorded a result"
            )
            self._record_in_background(row, state, reason)
            return
        self._finished(job_id)

    def _adopt_claimer(self, job_id: int, pid: int) -> bool:
        """After a lost claim: watch the procwrap that did claim the job, if one runs it.

        Its row was not 'starting' any more (cancelled while queued, or taken
        back): nothing ran. One case needs care: the previous worker died
        between marking the job 'starting' and its procwrap's claim, and that
        procwrap claimed the job after we queued it again. It runs the job
        (once); we watch it like any adopted one, so its slot counts and its
        waiters are answered.
        """
        row = self.db.get(job_id)
        other = row.pid if row and row.state == JobState.RUNNING else None
        if other and other != pid and procwrap_alive(other, job_id):
            self._cpus[job_id] = self._slots(row)  # type: ignore[arg-type]
            self._watch(job_id, other)
            log.info(
                "job %s: claimed by procwrap %s of the previous worker; adopted", job_id, other
            )
            return True
        return False

    def _on_fork_lost(self) -> None:
        self._fork_lost = True
        log.error("the fork server exited: no new job can start until the worker restarts")

    def _record_in_background(self, row: JobRow, state: JobState, reason: str) -> None:
        async def record() -> None:
            try:
                await self._record_dead(row, state, reason)
            finally:
                self._finished(row.id)

        task = asyncio.get_running_loop().create_task(record(), name=f"record-dead-{row.id}")
        self._records.add(task)
        task.add_done_callback(self._records.discard)

    async def _record_dead(self, row: JobRow, state: JobState, reason: str) -> None:
        """Final ``state`` for a job whose procwrap is gone; ends what is left of its steps.

        A recorded request wins over ``state``: a cancel makes the job
        ``cancelled``, a shutdown ``interrupted``.
        """
        pgid = row.pgid_children
        if pgid:
            members = procwrap.group_members(pgid)
            if members:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                # SIGKILL lands asynchronously: the final state is only written
                # once nothing is left (waiting without holding up the loop).
                deadline = time.monotonic() + LEFTOVER_WAIT
                while procwrap.group_members(pgid) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                reason += f"; killed {len(members)} leftover step process(es)"
        if row.cancel_request == "cancel":
            state = JobState.CANCELLED
        elif row.cancel_request == "shutdown":
            state = JobState.INTERRUPTED
        if state == JobState.INTERRUPTED:
            resume = self._resume() and row.resumable
            got = self.db.interrupt(row.id, reason, resume=resume)
            if got is not None:
                self.events.job_changed(row.id)
            if got == JobState.QUEUED:
                log.warning("job %s queued again to resume: %s", row.id, reason)
            elif got is not None:
                log.warning("job %s %s: %s", row.id, got, reason)
        elif self.db.finish(row.id, state, reason=reason):
            self.events.job_changed(row.id)
            log.warning("job %s %s: %s", row.id, state, reason)

    def _finished(self, job_id: int) -> None:
        self._adopted.pop(job_id, None)
        self._running.pop(job_id, None)
        self._cpus.pop(job_id, None)
        task = self._backstops.pop(job_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self.events.job_ended(job_id)

    # --- cancel and shutdown ----------------------------------------------------------

    async def cancel(self, row: JobRow) -> None:
        """SIGTERM the procwrap's group (it records ``cancelled``); a backstop follows.

        The backstop SIGKILLs the procwrap's and the step's groups if it is
        still alive after ``cancel_grace + 2 s``.
        """
        if row.state == JobState.RUNNING and procwrap_alive(row.pid, row.id):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(row.pid or 0, signal.SIGTERM)
        if row.id not in self._backstops:
            self._backstops[row.id] = asyncio.create_task(self._backstop(row.id))

    async def _backstop(self, job_id: int) -> None:
        await asyncio.sleep(self.grace + 2.0)
        row = self.db.get(job_id)
        if row is None:
            return
        pid = row.pid
        if row.state == JobState.RUNNING and procwrap_alive(pid, job_id):
            log.warning(
                "job %s: procwrap %s ignored the cancel for %.1f s; SIGKILL",
                job_id,
                pid,
                self.grace + 2.0,
            )
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid or 0, signal.SIGKILL)
            await asyncio.sleep(0.1)
        row = self.db.get(job_id)
        if row and not row.final and not procwrap_alive(row.pid, job_id):
            # After a cancel: the request makes it cancelled.
            await self._record_dead(
                row,
                JobState.FAILED,
                f"killed after not stopping within {self.grace + 2.0:g} s of the cancel",
            )
        self._backstops.pop(job_id, None)

    async def shutdown(self) -> None:
        """Unclaimed jobs go back to the queue; running ones are interrupted and record it."""
        self._stopping = True
        try:
            for row in self.db.in_states((JobState.STARTING,)):
                if row.executor == self.name:
                    # Not yet claimed: give it back to the queue (the procwrap's claim then fails).
                    self.db.unstart(row.id)
            await self._interrupt_running()
            for task in list(self._backstops.values()):
                task.cancel()
            for task in [*self._backstops.values(), *self._records]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._backstops.clear()
        finally:
            await self.fork.aclose()

    async def _interrupt_running(self) -> None:
        """SIGTERM our running procwraps; wait up to the grace (+1 s) for their records."""
        waiting: list[int] = []
        for row in self.db.in_states((JobState.RUNNING,)):
            job_id = row.id
            if job_id not in self._running or row.executor != self.name:
                continue
            self.db.request_cancel(job_id, "shutdown")
            if procwrap_alive(row.pid, job_id):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(row.pid or 0, signal.SIGTERM)
                waiting.append(job_id)
        deadline = time.monotonic() + self.grace + 1.0
        while waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            # (Recorded: final, or queued again to resume, at the next start.)
            waiting = [
                j for j in waiting if (r := self.db.get(j)) is not None and r.state in ACTIVE_STATES
            ]
        if waiting:
            log.warning(
                "jobs %s did not record their end within %.1f s of the shutdown",
                waiting,
                self.grace + 1.0,
            )
