"""The scheduler (in the worker): starts queued jobs when a cpu slot is free.

A job takes as many cpu slots as it runs processes at once (its ``-n`` or
``rad -N``, stored as ``cpus`` at submit); the jobs running at once take at
most the host record's cpus (a job wider than the host, after an edit of its
record, runs alone). The rest wait, highest priority first, then oldest. A job with ``after`` waits (queued)
until those jobs are done, and is cancelled, naming the job, when one of
them ends failed, cancelled or interrupted. Everything it knows is in the job
database, so a new worker picks up where a crashed one stopped:

- ``starting`` rows go back to ``queued`` (guarded: if the old worker's
  procwrap claims its row first, the reset loses, and the other way round);
- each executor then adopts what it left running (see
  :mod:`rayserver.jobs.executors.local`: a live procwrap is polled, a dead
  one's job is marked ``interrupted`` with the reason, or queued again to
  resume (``resume_interrupted``, :meth:`JobDB.interrupt`); Slurm jobs are
  found again by their Slurm id).

How a job runs is its executor's business (one protocol,
:class:`rayserver.jobs.executors.base.Executor`): every server has the local
one, and the one ``executor`` in the settings names (Slurm) if that is
another. A row goes to the executor its ``executor`` column names.

Latency: :meth:`Scheduler.notify` dispatches at once, in the caller's
turn of the event loop (no task switch, no polling), and a local launch does
not wait for the fork server's answer. A procwrap reports its committed final
state straight to the worker (see rayserver.jobs.executors.forkserver), which wakes the
job's waiters and reuses its cpu slot before the procwrap has even exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from rayserver.common.paths import Layout
from rayserver.common.states import JobState
from rayserver.jobs import executors
from rayserver.jobs.executors.base import LOCAL, Executor, ExecutorError
from rayserver.jobs.executors.forkserver import ForkServer
from rayserver.jobs.jobdb import JobDB
from rayserver.jobs.jobview import JobView
from rayserver.jobs.rows import JobRow

log = logging.getLogger("rayserver.jobs.scheduler")

IDLE_RESCAN = 1.0  # rows queued by another process are noticed this fast
LAUNCH_RETRY = 2.0  # after an executor failed to start jobs


class Scheduler:
    """Queue dispatch, adoption after a restart, cancel and shutdown (one per worker).

    ``fork_server``: the fork server the worker started before any thread
    (the local executor's way to start procwraps). ``view``: the worker's
    memory of its jobs, told of every change the scheduler and its executors
    make or hear of (one is made when none is given).
    """

    def __init__(
        self,
        layout: Layout,
        db: JobDB,
        live_config: Any,
        fork_server: ForkServer,
        view: JobView | None = None,
    ) -> None:
        self.layout = layout
        self.db = db
        self.live = live_config
        self.view = view if view is not None else JobView(db)
        self.executors: dict[str, Executor] = {
            name: executors.create(
                name, db=db, live=live_config, fork_server=fork_server, events=self
            )
            for name in dict.fromkeys((LOCAL, live_config.settings.executor))
        }
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # --- properties ---------------------------------------------------------

    @property
    def capacity(self) -> int:
        record = getattr(self.live, "record", None)
        return max(0, int(getattr(record, "cpus", 0) or 0))

    @property
    def running_count(self) -> int:
        return sum(ex.running_count for ex in self.executors.values())

    @property
    def used_cpus(self) -> int:
        """Cpu slots taken: a local job takes its ``cpus`` (its -n), a Slurm job one."""
        return sum(getattr(ex, "used_cpus", ex.running_count) for ex in self.executors.values())

    @property
    def grace(self) -> float:
        settings = getattr(self.live, "settings", None)
        return float(getattr(settings, "cancel_grace", 5.0))

    def executor_of(self, row: JobRow) -> Executor:
        """The executor a row names (the local one when that one is not configured now)."""
        return self.executors.get(row.executor) or self.executors[LOCAL]

    # --- start ------------------------------------------------------------------

    async def start(self) -> None:
        """Recover the state a previous worker left, then start dispatching."""
        self._wake = asyncio.Event()
        reset = self.db.reset_starting()
        if reset:
            log.info("jobs %s were being started by a previous worker; queued again", reset)
        for name, executor in self.executors.items():
            await executor.adopt()
            self._tasks.append(asyncio.create_task(executor.run(), name=f"{name}-watch"))
        self._tasks.append(asyncio.create_task(self._dispatch_loop(), name="dispatch"))
        self.notify()

    def notify(self) -> None:
        """A job was queued, or the cpu count changed, or a slot freed: start what can start.

        What can start without awaiting (local jobs: their launch is only
        sent) is dispatched right here; the dispatch task is woken too, for
        Slurm and retries.
        """
        if self._wake is None:
            return
        self._wake.set()
        try:
            self._dispatch_now()
        except ExecutorError as exc:
            log.error("cannot start jobs: %s", exc)
        except Exception:  # noqa: BLE001 - a caller (an HTTP handler) must not fail for it
            log.exception("dispatch failed; the dispatch task retries")

    def job_ended(self, job_id: int) -> None:
        """An executor's job is final: answer its waiters, start what its slot allows."""
        self.view.touch(job_id)
        self.notify()

    def job_changed(self, job_id: int, *, fed: bool | None = None) -> None:
        """A job's row changed (committed): its waiters and the event streams hear of it."""
        if fed is not None:
            self.view.feed(job_id, fed)
        self.view.touch(job_id)

    # --- dispatch ---------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_RESCAN)
            self._wake.clear()
            try:
                self._cancel_blocked()
                for executor in self.executors.values():
                    if not self._stopping:
                        await executor.dispatch(self.capacity)
            except ExecutorError as exc:
                log.error("cannot start jobs: %s", exc)
                await asyncio.sleep(LAUNCH_RETRY)
            except Exception:  # noqa: BLE001 - the loop must survive a bad row
                log.exception("dispatch failed; retrying")
                await asyncio.sleep(LAUNCH_RETRY)

    def _dispatch_now(self) -> None:
        """Start what can start without awaiting (synchronous; no awaits)."""
        self._cancel_blocked()
        for executor in self.executors.values():
            if not self._stopping:
                executor.dispatch_now(self.capacity)

    def _cancel_blocked(self) -> None:
        """Queued jobs whose ``after`` job ended otherwise than done will never start."""
        for job_id, pred, pred_state in self.db.cancel_blocked():
            log.info(
                "job %s cancelled: job %s, which it was to run after, ended %s",
                job_id,
                pred,
                pred_state,
            )
            self.view.touch(job_id)

    # --- waiting, cancel, shutdown ---------------------------------------------

    async def wait(self, job_id: int, timeout: float) -> None:
        """Return when the job is final (or unknown), or after ``timeout`` seconds.

        Woken by the changes the worker makes or hears of; rows changed by
        other processes are read again now and then (see JobView).
        """
        await self.view.wait(job_id, None, timeout)

    async def cancel(self, job_id: int) -> JobRow | None:
        """Cancel a job; returns its row (as :meth:`JobDB.get`) after the change, or None.

        Queued: cancelled at once. Starting/running: ``cancel_request`` is
        set and the job's executor stops it (the local one: SIGTERM to the
        procwrap's group, which records ``cancelled``, and a SIGKILL
        backstop; Slurm: scancel). Final rows are returned unchanged (the
        HTTP layer answers 409).
        """
        row = self.db.get(job_id)
        if row is None:
            return None
        if row.state == JobState.QUEUED and self.db.cancel_queued(job_id):
            self.job_ended(job_id)
            return self.db.get(job_id)
        if row.final:
            return row
        updated = self.db.request_cancel(job_id, "cancel")
        self.view.touch(job_id)
        if updated is None:  # became final meanwhile (or was cancelled while queued)
            return self.db.get(job_id)
        await self.executor_of(updated).cancel(updated)
        return self.db.get(job_id)

    async def shutdown(self) -> None:
        """Stop dispatching; running jobs are interrupted and record it; queued stay queued."""
        self._stopping = True
        self.notify()
        try:
            for executor in self.executors.values():
                await executor.shutdown()
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._tasks.clear()
            self.view.close()
