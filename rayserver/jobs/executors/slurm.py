"""The Slurm executor: hand jobs to a Slurm cluster instead of running them here.

With ``executor = "slurm"`` the scheduler still decides *when* a job may
leave rayserver's queue (the host record's cpu count caps how many jobs are
with Slurm at once); this module decides *how*: one ``sbatch`` per job whose
batch script runs the same step runner as a local job
(``python -m rayserver.procwrap --db DB --job ID --claim-queued``), so log,
progress and result are written by the same code. Slurm queues, places and
kills; we never schedule nodes ourselves.

Two layers:

- :mod:`rayserver.jobs.executors.slurmcli`: thin asyncio wrappers over
  Slurm's commands and the parsers of their text.
- :class:`SlurmExecutor` (here): submission, a background poll every
  ``slurm_poll_interval`` (never per request) that records jobs Slurm
  finished but the procwrap did not (scancel before it started, node
  failure, SIGKILL), cancel via ``scancel``, and re-adoption after a
  restart by the Slurm id stored in the job's ``external_id``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from rayserver.common import states
from rayserver.common.settings import Settings
from rayserver.common.states import JobState
from rayserver.jobs.executors.slurmcli import (
    SlurmCommands,
    SlurmError,
    SlurmJob,
    base_state,
    final_state,
)
from rayserver.jobs.rows import JobRow

log = logging.getLogger("rayserver.jobs.executors.slurm")


def batch_script(
    db_path: Path | str, job_id: int, python: str = sys.executable, grace: float = 5.0
) -> str:
    """The batch script of one job: exec the procwrap, so Slurm's signals reach it directly."""
    argv = [
        python,
        "-m",
        "rayserver.procwrap",
        "--db",
        str(db_path),
        "--job",
        str(job_id),
        "--grace",
        f"{grace:g}",
        "--claim-queued",
    ]
    return f"#!/bin/sh\n# rayserver job {job_id}\nexec {shlex.join(argv)}\n"


# --- the executor -------------------------------------------------------------------

# sbatch/squeue messages that mean "Slurm is not reachable right now", not "never".
_TRANSIENT = (
    "Unable to contact slurm controller",
    "did not answer",
    "Socket timed out",
    "Zero Bytes were transmitted",
    "Connection refused",
    "try again",
)


def job_name(job_id: int) -> str:
    return f"rayserver-{int(job_id)}"


def job_comment(db_path: Path | str, job_id: int) -> str:
    """Ties a Slurm job to one installation's job row (job ids repeat across homes)."""
    return f"rayserver job {int(job_id)} db {db_path}"


class SlurmExecutor:
    """Hands jobs to Slurm and keeps the job database in step with what Slurm says.

    The executor protocol of :mod:`rayserver.jobs.executors.base`: the
    scheduler owns the queue and the cpu cap; it calls :meth:`dispatch`
    (which moves rows to ``starting`` and :meth:`launch` es them), :meth:`cancel`
    for a running one, :meth:`adopt` at start, and runs :meth:`run` as a
    background task. ``on_change`` is called when a Slurm job ended, so the
    scheduler can start the next queued job.
    """

    name = "slurm"

    def __init__(
        self,
        db: Any,
        settings: Settings,
        *,
        python: str = sys.executable,
        commands: SlurmCommands | None = None,
        on_change: Any = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.python = python
        self.commands = commands or SlurmCommands.from_settings(settings)
        self.on_change = on_change
        self.interval = max(0.2, settings.slurm_poll_interval)
        self._launching: set[int] = set()
        self._cancel_after_launch: set[int] = set()
        self._last_error = ""
        self._retry_at = 0.0
        self._adopted = False

    @property
    def db_path(self) -> Path:
        return Path(self.db.path).absolute()

    def ready(self) -> bool:
        """False for a while after Slurm could not be reached (the scheduler waits)."""
        return time.monotonic() >= self._retry_at

    def sbatch_options(self, job: JobRow) -> list[str]:
        log_file = self.db.log_path(job.id)
        opts = [
            f"--job-name={job_name(job.id)}",
            f"--comment={job_comment(self.db_path, job.id)}",
            f"--chdir={job.workdir}",
            f"--output={log_file}",
            "--open-mode=append",
            # A requeued job would start a second procwrap for a row already
            # claimed; Slurm failures must end the job and be recorded instead.
            "--no-requeue",
            "--ntasks=1",
        ]
        if self.settings.slurm_partition:
            opts.append(f"--partition={self.settings.slurm_partition}")
        # Last, so a site's options can override ours.
        opts.extend(self.settings.slurm_options)
        return opts

    async def launch(self, job: JobRow) -> bool:
        """sbatch one job the scheduler moved to ``starting``; True when Slurm took it.

        A refusal (bad partition, bad option) fails the job with Slurm's
        message; an unreachable controller puts it back in the queue.
        """
        job_id = job.id
        if job.external_id:
            known = await self.commands.squeue([job.external_id])
            if job.external_id in known and known[job.external_id].active:
                return True  # already with Slurm (found again after a restart)
        self._launching.add(job_id)
        try:
            self.db.log_path(job_id).parent.mkdir(parents=True, exist_ok=True)
            slurm_id = await self.commands.sbatch(
                batch_script(self.db_path, job_id, self.python, self.settings.cancel_grace),
                self.sbatch_options(job),
            )
        except (SlurmError, OSError) as exc:
            self._launching.discard(job_id)
            text = str(exc)
            if any(t in text for t in _TRANSIENT):
                self._retry_at = time.monotonic() + self.interval * 5
                log.warning("job %d: Slurm unreachable, job stays queued: %s", job_id, text)
                self.db.unstart(job_id, f"waiting for Slurm: {text}")
            else:
                log.error("job %d: Slurm refused the job: %s", job_id, text)
                self.db.finish(job_id, JobState.FAILED, reason=f"Slurm refused the job: {text}")
            self._changed()
            return False
        self.db.set_external_id(job_id, slurm_id)
        self._launching.discard(job_id)
        log.info("job %d handed to Slurm as job %s", job_id, slurm_id)
        if job_id in self._cancel_after_launch:
            self._cancel_after_launch.discard(job_id)
            await self.commands.scancel(slurm_id)
        return True

    @property
    def running_count(self) -> int:
        return self.active_count()

    def dispatch_now(self, capacity: int) -> None:
        """Nothing: an sbatch is awaited, so Slurm jobs leave from :meth:`dispatch` only."""

    async def shutdown(self) -> None:
        """Nothing to stop: Slurm jobs run on without us, found again by their Slurm id."""

    def active_count(self) -> int:
        """Jobs with Slurm now (submitted or being submitted, not final): what the cap counts."""
        rows = self.db.in_states(states.ACTIVE_STATES)
        return sum(1 for r in rows if r.executor == "slurm" or r.external_id)

    async def dispatch(self, capacity: int) -> int:
        """Hand queued Slurm jobs to Slurm while fewer than ``capacity`` are with it.

        Called from the scheduler's dispatch loop (woken by submissions and by
        :meth:`run` when a job ended); returns how many were submitted.
        """
        submitted = 0
        while self.ready() and self.active_count() < capacity:
            row = self.db.next_queued(executor="slurm")
            if row is None:
                break
            if not self.db.mark_starting(row.id):
                continue  # cancelled or taken meanwhile
            if await self.launch(self.db.get(row.id) or row):
                submitted += 1
        return submitted

    async def cancel(self, job: JobRow) -> None:
        """scancel the job's Slurm job (the caller set cancel_request first).

        Slurm signals the batch script (the procwrap) with SIGTERM, which
        ends its steps and records ``cancelled``; a job still pending in
        Slurm never ran, and the poll records it.
        """
        job_id = job.id
        row = self.db.get(job_id) or job
        if row.external_id:
            await self.commands.scancel(row.external_id)
        elif job_id in self._launching:
            self._cancel_after_launch.add(job_id)

    async def adopt(self) -> None:
        """At worker start: find every job handed to Slurm again by its Slurm id.

        Rows that were put back to ``queued`` by the new worker but are still
        with Slurm go back to ``starting``, so they are not submitted twice
        and count against the cap. Rows without a Slurm id that a dead worker
        may have submitted are looked up by job name and comment.
        """
        try:
            await self._adopt()
            self._adopted = True
        except (SlurmError, OSError) as exc:
            # Slurm down while the worker starts: serve anyway, adopt from run().
            # Nothing is submitted twice meanwhile: launch() asks Slurm first.
            log.warning("cannot reach Slurm to find its jobs again (will retry): %s", exc)

    async def _adopt(self) -> None:
        rows = [
            r
            for r in self.db.in_states((JobState.QUEUED, JobState.STARTING))
            if r.executor == "slurm" or r.external_id
        ]
        if not rows:
            await self.poll_once()
            return
        # One listing of our user's Slurm jobs finds those a dying worker
        # submitted without storing the id (matched by the comment).
        mine = await self._our_jobs()
        for row in rows:
            sid = row.external_id
            seen = mine.get(job_comment(self.db_path, row.id))
            if not sid and row.id not in self._launching and seen is not None:
                sid = seen.job_id
                self.db.set_external_id(row.id, sid)
            if sid and seen is not None and seen.job_id == sid and seen.active:
                if row.state == JobState.QUEUED and self.db.mark_starting(row.id):
                    log.info("job %d found again in Slurm as job %s", row.id, sid)
            elif row.state == JobState.STARTING and row.id not in self._launching:
                # Started by a dead worker but never (or no longer) with Slurm.
                self.db.unstart(row.id, None)
        await self.poll_once()

    async def _our_jobs(self) -> dict[str, SlurmJob]:
        """Slurm jobs of this user that carry one of our comments: comment -> job."""
        _, out, _ = await self.commands.run(
            "squeue", ["-h", "-t", "all", "-u", str(os.getuid()), "-o", "%i|%T|%k"]
        )
        found: dict[str, SlurmJob] = {}
        for line in out.splitlines():
            sid, _, rest = line.partition("|")
            state, _, comment = rest.partition("|")
            if comment.startswith("rayserver job "):
                job = SlurmJob(sid.strip(), base_state(state))
                # The newest submission wins if a job id was somehow submitted twice.
                if comment not in found or found[comment].final:
                    found[comment] = job
        return found

    async def poll_once(self) -> list[int]:
        """One look at Slurm for every job with it; returns the ids recorded final here."""
        rows = [
            r
            for r in self.db.in_states(states.ACTIVE_STATES)
            if r.external_id and r.id not in self._launching
        ]
        if not rows:
            return []
        slurm = await self.commands.squeue([r.external_id for r in rows if r.external_id])
        recorded: list[int] = []
        changed = False
        for row in rows:
            assert row.external_id is not None
            seen = slurm.get(row.external_id)
            if seen is not None and seen.active:
                continue
            # Slurm is done with it; the procwrap normally recorded the result already.
            fresh = self.db.get(row.id)
            if fresh is None or fresh.state not in states.ACTIVE_STATES:
                changed = True
                continue
            detail = await self.commands.show_job(row.external_id)
            if self._record_from_slurm(fresh, detail or seen):
                recorded.append(row.id)
                changed = True
        if changed:
            self._changed()
        return recorded

    def _record_from_slurm(self, row: JobRow, job: SlurmJob | None) -> bool:
        sid = row.external_id
        if job is None:
            return self._interrupted(
                row,
                f"Slurm no longer knows job {sid} and the job recorded no result "
                "(finished longer ago than Slurm's MinJobAge, or the controller lost it)",
            )
        state, reason = final_state(job.state)
        if row.cancel_request == "cancel" and state in (JobState.CANCELLED, JobState.FAILED):
            state, reason = JobState.CANCELLED, "cancelled"
        elif state == JobState.DONE:
            # Slurm says the batch script succeeded, but the procwrap recorded nothing.
            state = JobState.FAILED
            reason = (
                "the Slurm job ended without running the job's steps (the procwrap did "
                "not claim it; see the job's log)"
                if row.state == JobState.STARTING
                else "the procwrap ended without recording a result (see the job's log)"
            )
        reason = f"{reason} (Slurm job {sid}, state {job.state}" + (
            f", {job.reason})" if job.reason else ")"
        )
        if state == JobState.INTERRUPTED and row.cancel_request != "cancel":
            return self._interrupted(row, reason)
        log.info("job %d: recorded %s from Slurm: %s", row.id, state, reason)
        return bool(
            self.db.finish(
                row.id, state, exit_status=job.exit_status, signal=job.signal, reason=reason
            )
        )

    def _interrupted(self, row: JobRow, reason: str) -> bool:
        """Slurm lost the job: queued again to resume (resume_interrupted), or interrupted."""
        resume = self.settings.resume_interrupted and row.resumable
        got = self.db.interrupt(row.id, reason, resume=resume)
        if got is not None:
            log.info("job %d: %s (from Slurm): %s", row.id, got, reason)
        return got is not None

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # the scheduler's wake-up must never stop the poll
                log.exception("scheduler notification failed")

    async def run(self) -> None:
        """Poll forever (a background task); errors are logged once, not raised."""
        while True:
            try:
                if not self._adopted:
                    await self._adopt()
                    self._adopted = True
                await self.poll_once()
                if self._last_error:
                    log.info("Slurm answers again")
                    self._last_error = ""
            except (SlurmError, OSError) as exc:
                if str(exc) != self._last_error:
                    log.warning("polling Slurm failed (will retry): %s", exc)
                    self._last_error = str(exc)
            await asyncio.sleep(self.interval)
