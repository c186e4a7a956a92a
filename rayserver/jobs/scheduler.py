"""The scheduler (in the worker): starts queued jobs when a cpu slot is free.

At most the host record's cpu count of jobs run at once; the rest wait,
highest priority first, then oldest. A job with ``after`` waits (queued)
until those jobs are done, and is cancelled, naming the job, when one of
them ends failed, cancelled or interrupted. Everything it knows is in the job
database, so a new worker picks up where a crashed one stopped:

- ``starting`` rows go back to ``queued`` (guarded: if the old worker's
  procwrap claims its row first, the reset loses, and the other way round);
- ``running`` rows whose procwrap is alive (the pid lives and its
  ``/proc/<pid>/cmdline`` carries ``job=<id>``) are adopted and polled;
- ``running`` rows whose procwrap is gone died with the server: they are
  marked ``interrupted`` with the reason.

Procwraps are started through the fork server (never forked from this
threaded asyncio process). The fork server reports each exit; a procwrap
that died without recording a final state gets one here, with a reason
decoded from its wait status.

Latency: :meth:`Scheduler.notify` dispatches at once, in the caller's
turn of the event loop (no task switch, no polling), and a launch does not
wait for the fork server's answer. A procwrap reports its committed final
state straight to the worker (see rayserver.jobs.executors.forkserver), which wakes the
job's waiters and reuses its cpu slot before the procwrap has even exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Any

from rayserver.common.paths import Layout
from rayserver.common.states import JobState
from rayserver.jobs import procwrap
from rayserver.jobs.executors.forkserver import ForkServerClient, ForkServerError
from rayserver.jobs.jobdb import JobDB
from rayserver.jobs.rows import JobRow
from supervisor.util import describe_status

log = logging.getLogger("rayserver.jobs.scheduler")

POLL_INTERVAL = 0.25  # adopted procwraps (not our fork server's children)
IDLE_RESCAN = 1.0  # rows queued by another process are noticed this fast
LAUNCH_RETRY = 2.0  # after the fork server failed a launch


def procwrap_alive(pid: int | None, job_id: int) -> bool:
    """True when ``pid`` is a live (non-zombie) procwrap of ``job_id``.

    The title check guards against a reused pid: ``job=<id>`` must be one of
    the words of its command line, next to the procwrap marker.
    """
    if not pid or pid <= 0:
        return False
    try:
        raw = open(f"/proc/{pid}/cmdline", "rb").read()  # noqa: SIM115 - tiny read
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    if stat[stat.rfind(b")") + 2 :].split()[:1] == [b"Z"]:
        return False
    words = raw.replace(b"\0", b" ").decode("utf-8", "replace").split()
    return f"job={job_id}" in words and any(
        w.endswith("/procwrap.pyo") or w == "rayserver.procwrap" for w in words
    )


class Scheduler:
    """Queue dispatch, adoption after a restart, cancel and shutdown (one per worker).

    It takes over ``forkclient.on_exit`` (and ``on_lost``), so the worker may
    create the client with any placeholder callback.
    """

    def __init__(
        self, layout: Layout, db: JobDB, live_config: Any, forkclient: ForkServerClient
    ) -> None:
        self.layout = layout
        self.db = db
        self.live = live_config
        self.fork = forkclient
        forkclient.on_exit = self._on_fork_exit
        forkclient.on_lost = self._on_fork_lost
        forkclient.on_final = self._on_final
        self._running: dict[int, int] = {}  # job id -> procwrap pid (0 while launching)
        self._adopted: dict[int, int] = {}  # the subset we poll: not our fork server's
        self._events: dict[int, asyncio.Event] = {}
        self._backstops: dict[int, asyncio.Task[None]] = {}
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._fork_lost = False
        self._dispatching = False
        self._launch_paused_until = 0.0  # monotonic; after the fork server failed a launch
        self._slurm: Any = None  # rayserver.jobs.executors.slurm.SlurmExecutor with executor=slurm

    # --- properties ---------------------------------------------------------

    @property
    def capacity(self) -> int:
        record = getattr(self.live, "record", None)
        return max(0, int(getattr(record, "cpus", 0) or 0))

    @property
    def running_count(self) -> int:
        return len(self._running)

    @property
    def grace(self) -> float:
        settings = getattr(self.live, "settings", None)
        return float(getattr(settings, "cancel_grace", 5.0))

    # --- start ------------------------------------------------------------------

    async def start(self) -> None:
        """Recover the state a previous worker left, then start dispatching."""
        self._wake = asyncio.Event()
        reset = self.db.reset_starting()
        if reset:
            log.info("jobs %s were being started by a previous worker; queued again", reset)
        for row in self.db.in_states((JobState.RUNNING,)):
            if row.executor != "local":
                continue
            job_id, pid = row.id, row.pid
            if procwrap_alive(pid, job_id):
                self._running[job_id] = pid
                self._adopted[job_id] = pid
                log.info("adopted job %s (procwrap pid %s)", job_id, pid)
            else:
                self._record_dead(
                    row,
                    JobState.INTERRUPTED,
                    f"its procwrap (pid {pid}) was gone when the server "
                    "restarted: the job died with the server",
                )
        if (
            self.live.settings.executor == "slurm"
        ):  # Slurm jobs: see rayserver/jobs/executors/slurm.py
            from rayserver.jobs.executors.slurm import SlurmExecutor

            self._slurm = SlurmExecutor(self.db, self.live.settings, on_change=self.notify)
            await self._slurm.adopt()
            self._tasks.append(asyncio.create_task(self._slurm.run(), name="slurm-poll"))
        self._tasks.append(asyncio.create_task(self._dispatch_loop(), name="dispatch"))
        self._tasks.append(asyncio.create_task(self._poll_loop(), name="poll-adopted"))
        self.notify()

    def notify(self) -> None:
        """A job was queued, or the cpu count changed, or a slot freed: start what can start.

        Local jobs are dispatched right here (their launch is only sent, not
        awaited); the dispatch task is woken too, for Slurm and retries.
        """
        if self._wake is None:
            return
        self._wake.set()
        try:
            self._dispatch_local()
        except ForkServerError as exc:
            log.error("cannot start jobs: %s", exc)
        except Exception:  # noqa: BLE001 - a caller (an HTTP handler) must not fail for it
            log.exception("dispatch failed; the dispatch task retries")

    # --- dispatch ---------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_RESCAN)
            self._wake.clear()
            try:
                await self._dispatch()
            except ForkServerError as exc:
                log.error("cannot start jobs: %s", exc)
                await asyncio.sleep(LAUNCH_RETRY)
            except Exception:  # noqa: BLE001 - the loop must survive a bad row
                log.exception("dispatch failed; retrying")
                await asyncio.sleep(LAUNCH_RETRY)

    async def _dispatch(self) -> None:
        if self._slurm is not None and not self._stopping:
            await self._slurm.dispatch(self.capacity)
        self._dispatch_local()

    def _dispatch_local(self) -> None:
        """Start queued local jobs while cpu slots are free (synchronous; no awaits)."""
        if self._dispatching:
            return  # re-entered from a callback below: the outer loop goes on
        self._dispatching = True
        try:
            self._cancel_blocked()
            while not self._stopping and len(self._running) < self.capacity:
                if self._fork_lost or time.monotonic() < self._launch_paused_until:
                    return
                row = self.db.next_queued(executor="local")
                if row is None:
                    return
                job_id = row.id
                if not self.db.mark_starting(job_id):
                    continue  # cancelled or taken meanwhile
                self._running[job_id] = 0  # hold the slot: the exit may come before the pid
                try:
                    self.fork.launch_nowait(job_id, self._launched_callback(job_id))
                except ForkServerError as exc:
                    self._running.pop(job_id, None)
                    self.db.unstart(job_id, reason=f"could not be started: {exc}")
                    raise
        finally:
            self._dispatching = False

    def _cancel_blocked(self) -> None:
        """Queued jobs whose ``after`` job ended otherwise than done will never start."""
        for job_id, pred, pred_state in self.db.cancel_blocked():
            log.info(
                "job %s cancelled: job %s, which it was to run after, ended %s",
                job_id,
                pred,
                pred_state,
            )
            event = self._events.pop(job_id, None)
            if event is not None:
                event.set()

    def _launched_callback(self, job_id: int):  # noqa: ANN202 - a closure
        def launched(pid: int | None, error: str | None) -> None:
            if pid is not None:
                if job_id in self._running:  # not yet over (its exit may come first)
                    self._running[job_id] = pid
                log.info("job %s started (procwrap pid %s)", job_id, pid)
                return
            self._running.pop(job_id, None)
            self.db.unstart(job_id, reason=f"could not be started: {error}")
            log.error("cannot start job %s: %s; retrying in %g s", job_id, error, LAUNCH_RETRY)
            self._launch_paused_until = time.monotonic() + LAUNCH_RETRY
            if self._wake is not None:
                self._wake.set()

        return launched

    # --- exits --------------------------------------------------------------------

    def _on_final(self, job_id: int) -> None:
        """A procwrap committed its job's final state (it is about to exit).

        Its waiters are answered and its slot reused now; the exit report
        that follows still checks the row (see :meth:`_on_fork_exit`).
        """
        if job_id in self._running and job_id not in self._adopted:
            self._finished(job_id)

    def _on_fork_exit(self, job_id: int, pid: int, status: int) -> None:
        """The fork server reaped a procwrap (called in the event loop)."""
        self._running.pop(job_id, None)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == procwrap.EXIT_CLAIM_LOST:
            # Its row was not 'starting' any more (cancelled while queued, or
            # taken back): nothing ran, nothing to record. One case needs care:
            # the previous worker died between marking the job 'starting' and
            # its procwrap's claim, and that procwrap claimed the job after we
            # queued it again. It runs the job (once); we watch it like any
            # adopted one, so its slot counts and its waiters are answered.
            row = self.db.get(job_id)
            other = row.pid if row and row.state == JobState.RUNNING else None
            if other and other != pid and procwrap_alive(other, job_id):
                self._running[job_id] = other
                self._adopted[job_id] = other
                log.info(
                    "job %s: claimed by procwrap %s of the previous worker; adopted", job_id, other
                )
                return
            log.info("job %s: procwrap %s found nothing to run", job_id, pid)
        else:
            row = self.db.get(job_id)
            if row and not row.final and row.pid in (pid, None):
                # Killed by a signal: ended from outside, not the job's fault.
                self._record_dead(
                    row,
                    JobState.INTERRUPTED if os.WIFSIGNALED(status) else JobState.FAILED,
                    f"its procwrap (pid {pid}) ended ({describe_status(status)}) "
                    "before it recorded a result",
                )
        self._finished(job_id)

    def _on_fork_lost(self) -> None:
        self._fork_lost = True
        log.error("the fork server exited: no new job can start until the worker restarts")

    def _record_dead(self, row: JobRow, state: JobState, reason: str) -> None:
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
                # SIGKILL lands asynchronously; wait briefly (rare path) so the
                # recorded final state is only written once nothing is left.
                deadline = time.monotonic() + 1.0
                while procwrap.group_members(pgid) and time.monotonic() < deadline:
                    time.sleep(0.01)
                reason += f"; killed {len(members)} leftover step process(es)"
        if row.cancel_request == "cancel":
            state = JobState.CANCELLED
        elif row.cancel_request == "shutdown":
            state = JobState.INTERRUPTED
        if self.db.finish(row.id, state, reason=reason):
            log.warning("job %s %s: %s", row.id, state, reason)

    def _finished(self, job_id: int) -> None:
        self._adopted.pop(job_id, None)
        self._running.pop(job_id, None)
        task = self._backstops.pop(job_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        event = self._events.pop(job_id, None)
        if event is not None:
            event.set()
        self.notify()

    async def _poll_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(POLL_INTERVAL)
            for job_id, pid in list(self._adopted.items()):
                if procwrap_alive(pid, job_id):
                    continue
                row = self.db.get(job_id)
                if row and not row.final:
                    self._record_dead(
                        row,
                        JobState.INTERRUPTED,
                        f"its procwrap (pid {pid}) ended without recording "
                        "a result (exit status unknown: adopted process)",
                    )
                self._finished(job_id)

    # --- waiting, cancel, shutdown ---------------------------------------------

    async def wait(self, job_id: int, timeout: float) -> None:
        """Return when the job is final (or unknown), or after ``timeout`` seconds."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            row = self.db.get(job_id)
            if row is None or row.final:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            event = self._events.setdefault(job_id, asyncio.Event())
            # Also re-read the row now and then: a procwrap records its state
            # before it exits, and rows change from other processes too.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), min(left, POLL_INTERVAL))

    async def cancel(self, job_id: int) -> JobRow | None:
        """Cancel a job; returns its row (as :meth:`JobDB.get`) after the change, or None.

        Queued: cancelled at once. Starting/running: ``cancel_request`` is
        set and the procwrap's group gets SIGTERM; the procwrap records
        ``cancelled``. A backstop SIGKILLs the procwrap's and the step's
        groups if it is still alive after ``cancel_grace + 2 s``. Final
        rows are returned unchanged (the HTTP layer answers 409).
        """
        row = self.db.get(job_id)
        if row is None:
            return None
        if row.state == JobState.QUEUED and self.db.cancel_queued(job_id):
            self._finished(job_id)
            return self.db.get(job_id)
        if row.final:
            return row
        updated = self.db.request_cancel(job_id, "cancel")
        if updated is None:  # became final meanwhile (or was cancelled while queued)
            return self.db.get(job_id)
        if updated.executor == "slurm" and self._slurm is not None:
            await self._slurm.cancel(updated)  # scancel: Slurm signals and kills
            return self.db.get(job_id)
        pid = updated.pid
        if updated.state == JobState.RUNNING and procwrap_alive(pid, job_id):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        if job_id not in self._backstops:
            self._backstops[job_id] = asyncio.create_task(self._backstop(job_id))
        return self.db.get(job_id)

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
                os.killpg(pid, signal.SIGKILL)
            await asyncio.sleep(0.1)
        row = self.db.get(job_id)
        if row and not row.final and not procwrap_alive(row.pid, job_id):
            # After a cancel: the request makes it cancelled.
            self._record_dead(
                row,
                JobState.FAILED,
                f"killed after not stopping within {self.grace + 2.0:g} s of the cancel",
            )
        self._backstops.pop(job_id, None)

    async def shutdown(self) -> None:
        """Stop dispatching; running jobs are interrupted and record it; queued stay queued."""
        self._stopping = True
        self.notify()
        for row in self.db.in_states((JobState.STARTING,)):
            if row.executor == "slurm":
                continue  # with Slurm: it runs on without us, found again by its Slurm id
            # Not yet claimed: give it back to the queue (the procwrap's claim then fails).
            self.db.unstart(row.id)
        waiting: list[int] = []
        for row in self.db.in_states((JobState.RUNNING,)):
            job_id = row.id
            if job_id not in self._running or row.executor != "local":
                continue
            self.db.request_cancel(job_id, "shutdown")
            if procwrap_alive(row.pid, job_id):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(row.pid, signal.SIGTERM)
                waiting.append(job_id)
        deadline = time.monotonic() + self.grace + 1.0
        while waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            waiting = [j for j in waiting if (r := self.db.get(j)) is not None and not r.final]
        if waiting:
            log.warning(
                "jobs %s did not record their end within %.1f s of the shutdown",
                waiting,
                self.grace + 1.0,
            )
        for task in [*self._tasks, *self._backstops.values()]:
            task.cancel()
        for task in [*self._tasks, *self._backstops.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._backstops.clear()
        for event in self._events.values():
            event.set()
