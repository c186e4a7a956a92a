"""The one protocol every executor follows, and what it may call back in the scheduler.

The scheduler owns the queue, the cpu cap and the waiters; an executor owns
how its jobs run (the ``executor`` column of a row names it). Kept free of
asyncio imports: the fork server process imports this package too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rayserver.jobs.rows import JobRow

LOCAL = "local"  # the executor every server has: procwraps on this host


class ExecutorError(Exception):
    """An executor cannot start jobs now; the message says why."""


class SchedulerEvents(Protocol):
    """What an executor tells the scheduler."""

    def job_ended(self, job_id: int) -> None:
        """The job is final (or will never run here): answer its waiters, reuse its slot."""

    def notify(self) -> None:
        """Something changed (a slot freed, a launch failed): start what can start."""

    def job_changed(self, job_id: int, *, fed: bool | None = None) -> None:
        """The job's row changed (committed): the worker's memory of it reads it again.

        ``fed=True``: every later change of the job will be told too (its procwrap
        reports to this worker); ``False``: not (an adopted procwrap).
        """


class Executor(Protocol):
    """Runs the jobs whose rows name it: dispatch, cancel, adopt after restart, shutdown."""

    name: str  # the rows' ``executor`` value

    @property
    def running_count(self) -> int:
        """Jobs it has started or adopted that are not final yet."""

    async def adopt(self) -> None:
        """At worker start: take back the jobs a previous worker left running."""

    async def run(self) -> None:
        """Background task until cancelled: watch the jobs it holds."""

    def dispatch_now(self, capacity: int) -> None:
        """Start queued jobs without awaiting (in the caller's turn of the loop), if it can.

        Raises ExecutorError when it cannot start jobs now.
        """

    async def dispatch(self, capacity: int) -> int:
        """Start queued jobs while fewer than ``capacity`` run; how many it started."""

    async def cancel(self, row: JobRow) -> None:
        """Stop a starting or running job whose ``cancel_request`` is set."""

    async def shutdown(self) -> None:
        """The worker stops: leave every job recorded or resumable by the next worker."""
