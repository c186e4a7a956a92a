"""The Slurm executor: hand jobs to a Slurm cluster instead of running them here.

With ``executor = "slurm"`` the scheduler still decides *when* a job may
leave rayserver's queue (the host record's cpu count caps how many jobs are
with Slurm at once); this module decides *how*: one ``sbatch`` per job whose
batch script runs the same step runner as a local job
(``python -m rayserver.procwrap --db DB --job ID --claim-queued``), so log,
progress and result are written by the same code. Slurm queues, places and
kills; we never schedule nodes ourselves.

Two layers:

- :class:`SlurmCommands`: thin asyncio wrappers over ``sbatch --parsable``,
  ``squeue -t all -o``, ``scontrol show job -o``, ``scancel`` and ``sinfo``,
  plus pure parsers (:func:`parse_scontrol_record`, :func:`parse_exit_code`,
  :func:`final_state`). Only stable text formats are used: ``squeue --json``
  changed shape between Slurm releases and ignores ``-j`` in 22.05.
- :class:`SlurmExecutor`: submission, a background poll every
  ``slurm_poll_interval`` (never per request) that records jobs Slurm
  finished but the procwrap did not (scancel before it started, node
  failure, SIGKILL), cancel via ``scancel``, and re-adoption after a
  restart by the Slurm id stored in the job's ``external_id``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayserver.common import states
from rayserver.common.settings import Settings
from rayserver.common.states import JobState
from rayserver.jobs.rows import JobRow

log = logging.getLogger("rayserver.jobs.executors.slurm")

COMMAND_TIMEOUT = 30.0

# Slurm job states (squeue -o %T, scontrol JobState) that are not final yet.
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "RESV_DEL_HOLD",
        "STOPPED",
    }
)

# Final Slurm states -> (our state, reason). Failures of the machinery (node,
# preemption) are "interrupted" like a local job whose server went away;
# failures of the job itself are "failed".
_FROM_SLURM: dict[str, tuple[JobState, str]] = {
    "COMPLETED": (JobState.DONE, ""),
    "FAILED": (JobState.FAILED, "the job's batch script failed in Slurm"),
    "CANCELLED": (JobState.CANCELLED, "cancelled in Slurm"),
    "TIMEOUT": (JobState.FAILED, "Slurm's time limit was reached"),
    "DEADLINE": (JobState.FAILED, "Slurm's deadline was reached"),
    "OUT_OF_MEMORY": (JobState.FAILED, "Slurm: out of memory"),
    "NODE_FAIL": (JobState.INTERRUPTED, "Slurm: the node failed"),
    "BOOT_FAIL": (JobState.INTERRUPTED, "Slurm: the node failed to boot"),
    "PREEMPTED": (JobState.INTERRUPTED, "Slurm preempted the job"),
    "REVOKED": (JobState.INTERRUPTED, "Slurm revoked the job (federation)"),
    "SPECIAL_EXIT": (JobState.FAILED, "Slurm: special exit"),
}


# Keys look like JobId, AllocNode:Sid, CPUs/Task, MCS_label.
_SCONTROL_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_:/]*$")


class SlurmError(Exception):
    """A Slurm command failed or said something we cannot use; the message says which."""


@dataclass(frozen=True)
class SlurmJob:
    """What Slurm says about one job."""

    job_id: str
    state: str  # Slurm's state, e.g. "RUNNING", "COMPLETED", "CANCELLED"
    reason: str = ""
    nodes: str = ""
    exit_status: int | None = None  # from ExitCode=N:S (scontrol only)
    signal: int | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def final(self) -> bool:
        return not self.active


def base_state(state: str) -> str:
    """'CANCELLED by 0' -> 'CANCELLED'; 'COMPLETING+' style suffixes are dropped too."""
    word = state.strip().split(" ", 1)[0]
    return word.rstrip("+*").upper()


def final_state(slurm_state: str) -> tuple[JobState, str]:
    """Map a final Slurm state onto (our state, reason).

    Raises ValueError for a state that is not final (the job is still with Slurm).
    """
    state = base_state(slurm_state)
    if state in ACTIVE_STATES:
        raise ValueError(f"Slurm state {state!r} is not final")
    return _FROM_SLURM.get(state, (JobState.FAILED, f"Slurm ended the job in state {state}"))


def parse_exit_code(text: str) -> tuple[int | None, int | None]:
    """scontrol's ``ExitCode=N:S`` value -> (exit status, signal); 0 signal means none."""
    try:
        status_text, _, signal_text = text.strip().partition(":")
        status = int(status_text)
        sig = int(signal_text) if signal_text else 0
    except ValueError:
        return None, None
    return status, (sig or None)


def parse_scontrol_record(line: str) -> dict[str, str]:
    """One ``scontrol show ... -o`` line -> {Key: value}.

    Values may contain spaces (``Reason=Not responding [slurm@...]``,
    ``Command=/path with space``): a word without ``=`` belongs to the
    previous value, which is the only rule scontrol's output follows.
    """
    record: dict[str, str] = {}
    last: str | None = None
    for word in line.strip().split(" "):
        key, eq, value = word.partition("=")
        if eq and _SCONTROL_KEY.match(key):
            record[key] = value
            last = key
        elif last is not None:
            record[last] += " " + word
    return record


def job_from_scontrol(line: str) -> SlurmJob:
    rec = parse_scontrol_record(line)
    if "JobId" not in rec:
        raise SlurmError(f"scontrol show job gave no JobId in {line[:200]!r}")
    status, sig = parse_exit_code(rec.get("ExitCode", ""))
    nodes = rec.get("NodeList", "")
    return SlurmJob(
        job_id=rec["JobId"],
        state=base_state(rec.get("JobState", "UNKNOWN")),
        reason=rec.get("Reason", "") if rec.get("Reason") != "None" else "",
        nodes="" if nodes == "(null)" else nodes,
        exit_status=status,
        signal=sig,
    )


class SlurmCommands:
    """Runs Slurm's command-line tools (asyncio subprocesses, argument lists, no shell)."""

    def __init__(self, bin_dir: str = "", timeout: float = COMMAND_TIMEOUT) -> None:
        self.bin_dir = bin_dir
        self.timeout = timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> SlurmCommands:
        return cls(settings.slurm_bin)

    def path(self, name: str) -> str:
        """Absolute path of a Slurm command: slurm_bin if set, else PATH."""
        if self.bin_dir:
            candidate = Path(self.bin_dir).expanduser() / name
            if not (candidate.is_file() and os.access(candidate, os.X_OK)):
                raise SlurmError(
                    f"{name} not found in slurm_bin {self.bin_dir!r}: expected the directory "
                    "holding sbatch, squeue, scontrol, scancel and sinfo"
                )
            return str(candidate)
        found = shutil.which(name)
        if not found:
            raise SlurmError(
                f"{name} not found on PATH: install Slurm's client commands or set slurm_bin "
                "in rayserver.toml"
            )
        return found

    async def run(
        self, name: str, args: Sequence[str], stdin: bytes | None = None, check: bool = True
    ) -> tuple[int, str, str]:
        """Run one Slurm command; returns (exit code, stdout, stderr)."""
        argv = [self.path(name), *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise SlurmError(f"cannot run {name}: {exc.strerror or exc}") from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), self.timeout)
        except TimeoutError as exc:
            proc.kill()
            await proc.wait()
            raise SlurmError(
                f"{name} did not answer within {self.timeout:.0f} s (is slurmctld up?)"
            ) from exc
        code = proc.returncode if proc.returncode is not None else -1
        stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        if check and code != 0:
            raise SlurmError(
                f"{shlex.join([name, *args])} failed (exit {code}): "
                f"{stderr.strip() or stdout.strip() or 'no message'}"
            )
        return code, stdout, stderr

    async def sbatch(self, script: str, options: Sequence[str]) -> str:
        """Submit a batch script (given on stdin); returns the Slurm job id."""
        _, out, _ = await self.run("sbatch", ["--parsable", *options], stdin=script.encode())
        # --parsable prints "jobid" or "jobid;cluster".
        job_id = out.strip().splitlines()[-1].split(";", 1)[0] if out.strip() else ""
        if not job_id.isdigit():
            raise SlurmError(f"sbatch gave no job id (got {out.strip()[:200]!r})")
        return job_id

    async def squeue(self, job_ids: Iterable[str]) -> dict[str, SlurmJob]:
        """State of the given jobs, finished ones included while Slurm remembers them.

        A job Slurm has forgotten (older than MinJobAge, or never existed) is
        simply missing from the answer.
        """
        ids = sorted({str(j) for j in job_ids}, key=lambda s: (len(s), s))
        if not ids:
            return {}
        code, out, err = await self.run(
            "squeue",
            ["-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r|%N"],
            check=False,
        )
        if code != 0:
            # Every id unknown: squeue fails instead of printing nothing.
            if "Invalid job id" in err:
                return {}
            raise SlurmError(f"squeue failed (exit {code}): {err.strip() or 'no message'}")
        jobs: dict[str, SlurmJob] = {}
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) != 4:
                continue
            job_id, state, reason, nodes = parts
            jobs[job_id] = SlurmJob(
                job_id, base_state(state), "" if reason == "None" else reason, nodes
            )
        return jobs

    async def show_job(self, job_id: str) -> SlurmJob | None:
        """``scontrol show job -o ID`` (with exit code and signal), None if Slurm forgot it."""
        code, out, err = await self.run("scontrol", ["show", "job", "-o", str(job_id)], check=False)
        if code != 0:
            if "Invalid job id" in err:
                return None
            raise SlurmError(
                f"scontrol show job {job_id} failed (exit {code}): {err.strip() or 'no message'}"
            )
        lines = [ln for ln in out.splitlines() if ln.startswith("JobId=")]
        if not lines:
            return None
        return job_from_scontrol(lines[0])

    async def scancel(self, job_id: str, signal: str | None = None) -> None:
        """Cancel a job (or only signal it); a job already gone is not an error."""
        args = [f"--signal={signal}", "--full"] if signal else []
        code, out, err = await self.run("scancel", [*args, str(job_id)], check=False)
        if code != 0 and "Invalid job id" not in err and "already completing" not in err:
            raise SlurmError(
                f"scancel {job_id} failed (exit {code}): "
                f"{err.strip() or out.strip() or 'no message'}"
            )

    async def partition_nodes(self, partition: str = "") -> list[dict[str, Any]]:
        """One dict per node of the partition: name, state, cpus, free cpus."""
        args = ["-h", "-N", "-o", "%N|%T|%C|%P"]
        if partition:
            args += ["-p", partition]
        _, out, _ = await self.run("sinfo", args)
        nodes: dict[str, dict[str, Any]] = {}
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) != 4:
                continue
            name, state, cpus, part = parts
            # %C is allocated/idle/other/total.
            try:
                alloc, idle, _other, total = (int(x) for x in cpus.split("/"))
            except ValueError:
                alloc = idle = total = 0
            node = nodes.setdefault(
                name,
                {
                    "name": name,
                    "state": state.rstrip("*~#!%$@^-"),
                    "cpus": total,
                    "free_cpus": idle if state.rstrip("*~#!%$@^-") in ("idle", "mixed") else 0,
                    "allocated_cpus": alloc,
                    "partitions": [],
                },
            )
            node["partitions"].append(part.rstrip("*"))
        return list(nodes.values())


_INFO_CACHE: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}


async def cluster_info(settings: Settings) -> dict[str, Any]:
    """What GET /v1/info says about Slurm: partition, nodes, free cpus (or the error).

    Cached for ``slurm_poll_interval``: /v1/info is unauthenticated, and
    requests must never turn into a stream of sinfo calls on the controller.
    """
    key = (settings.slurm_bin, settings.slurm_partition)
    cached = _INFO_CACHE.get(key)
    if cached and time.monotonic() - cached[0] < max(0.5, settings.slurm_poll_interval):
        return dict(cached[1])
    info = await _cluster_info(settings)
    _INFO_CACHE[key] = (time.monotonic(), info)
    return dict(info)


async def _cluster_info(settings: Settings) -> dict[str, Any]:
    info: dict[str, Any] = {"partition": settings.slurm_partition or None}
    try:
        nodes = await SlurmCommands(settings.slurm_bin, timeout=10).partition_nodes(
            settings.slurm_partition
        )
    except SlurmError as exc:
        info.update(available=False, error=str(exc), nodes=[], cpus=0, free_cpus=0)
        return info
    if settings.slurm_partition and not nodes:
        info.update(
            available=False,
            nodes=[],
            cpus=0,
            free_cpus=0,
            error=f"Slurm partition {settings.slurm_partition!r} has no nodes "
            "(check slurm_partition in rayserver.toml)",
        )
        return info
    info.update(
        available=True,
        nodes=nodes,
        cpus=sum(n["cpus"] for n in nodes),
        free_cpus=sum(n["free_cpus"] for n in nodes),
    )
    return info


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
            return bool(
                self.db.finish(
                    row.id,
                    JobState.INTERRUPTED,
                    reason=f"Slurm no longer knows job {sid} and the job recorded no result "
                    "(finished longer ago than Slurm's MinJobAge, or the controller lost it)",
                )
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
        log.info("job %d: recorded %s from Slurm: %s", row.id, state, reason)
        return bool(
            self.db.finish(
                row.id, state, exit_status=job.exit_status, signal=job.signal, reason=reason
            )
        )

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
