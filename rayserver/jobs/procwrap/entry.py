"""Procwrap entry points: the fork server's spare, a direct run, and ``python -m rayserver.procwrap``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from rayserver.common.states import JobState
from rayserver.jobs.jobdb import JobDB
from rayserver.jobs.procwrap import jobbox, warm
from rayserver.jobs.procwrap.exits import EXIT_CLAIM_LOST, EXIT_INTERNAL, EXIT_RESUMED, EXIT_USAGE
from rayserver.jobs.procwrap.job import Job
from rayserver.jobs.procwrap.procs import set_subreaper
from rayserver.jobs.rows import JobRow
from supervisor.util import libc


def _home_of(db_path: Path) -> Path:
    return Path(db_path).resolve().parent.parent


def procwrap_title(db_path: Path, job_id: int, row: JobRow | None) -> str:
    """``rfcore -O <home>/procwrap.pyo job=<id> <name or program>`` (home = db's grandparent)."""
    home = _home_of(Path(db_path))
    what = ""
    if row:
        what = row.name or (row.steps[0]["program"] if row.steps else "")
    return f"rfcore -O {home}/procwrap.pyo job={job_id} {what}".rstrip()


def preload(db_path: Path) -> None:
    """Work every procwrap would repeat, done once in the fork server before it forks:
    the libc handle (a dlopen), the installation's real path, the sandbox's modules."""
    with contextlib.suppress(OSError, AttributeError):
        libc()
    _home_of(Path(db_path).absolute())
    from rayserver.jobs.procwrap import landlock, sandbox

    with contextlib.suppress(OSError):
        landlock.abi_version()
        sandbox.netns_available()


def run_spare(
    intake: socket.socket,
    db_path: Path,
    title: str,
    *,
    grace: float,
    on_final: Callable[[int], None] | None = None,
    on_change: Callable[[int], None] | None = None,
) -> int:
    """A procwrap started before its job: get ready, wait for a job id, run it; and again.

    Everything that does not depend on the job is done while waiting: the
    database connection (and its schema), the subreaper flag, the title
    ``<title> spare`` (no ``job=``: nothing adopts a spare). The fork server
    sends each job id as one packet on ``intake``; EOF (the fork server is
    gone, or it has spares enough) ends the spare. After a job that ended
    cleanly (see :mod:`rayserver.jobs.procwrap.warm`) it reports
    ``done <job> <exit code>`` on ``intake`` and waits for the next job
    instead of exiting; otherwise it exits with the job's code.
    """
    _set_title(f"{title} spare")
    set_subreaper()
    db = JobDB(Path(db_path), check=False, prepared=True)
    with contextlib.suppress(sqlite3.Error):
        _warm_statements(db)
    turns = warm.Turns()
    while True:
        raw = intake.recv(64)
        if not raw.isdigit():
            return 0  # EOF: the fork server went away, or let this spare go
        job_id = int(raw)
        # Final title (with the job's name) is set by run_job; this one
        # already lets an adopting worker recognise us.
        _set_title(f"{title} job={job_id}")
        code, job = _run_job(db_path, job_id, grace=grace, db=db, on_change=on_change)
        again = turns.another(code, job)
        warm.between_jobs(job)
        if again:
            _set_title(f"{title} spare")
            again = warm.report_done(intake, job_id, code)
        if on_final is not None and _final(code):
            on_final(job_id)
        if not again:
            intake.close()
            return code


def _warm_statements(db: JobDB) -> None:
    """Run each statement a job needs once, on job id 0 (ids start at 1: no row changes).

    Opens the connection, reads the schema and leaves the statements
    compiled in the connection's cache, so the claim and the writes of the
    first step cost a real job ~0.5 ms less. The writes change nothing, so
    they commit without writing to the database.
    """
    db.get(0)
    db.claim_row(0, 0)
    db.update_progress(0, current_step=1, pgid_children=1, progress=0.0)
    db.finish(
        0,
        JobState.DONE,
        exit_status=0,
        signal=None,
        reason=None,
        wall_time=0.0,
        cpu_time=0.0,
        max_rss_kb=0,
        progress=100.0,
        outputs=[],
        from_states=(JobState.RUNNING,),
    )


def _set_title(title: str) -> None:
    with contextlib.suppress(ImportError):
        import setproctitle

        setproctitle.setproctitle(title)


def run_job(
    db_path: Path,
    job_id: int,
    *,
    log_dir: Path | None = None,
    grace: float = 5.0,
    claim_queued: bool = False,
    on_final: Callable[[int], None] | None = None,
    db: JobDB | None = None,
    on_change: Callable[[int], None] | None = None,
) -> int:
    """Claim job ``job_id``, run its steps, record the result; returns the exit code.

    ``on_final(job_id)`` is called once the final state is committed (the
    fork server uses it to tell the worker at once, before this process
    has even exited); it must not raise. ``on_change(job_id)`` likewise after
    the claim and each progress write. ``db``: an already open JobDB of
    ``db_path`` (a spare's).
    """
    code, _job = _run_job(
        db_path,
        job_id,
        log_dir=log_dir,
        grace=grace,
        claim_queued=claim_queued,
        db=db,
        on_change=on_change,
    )
    if on_final is not None and _final(code):
        on_final(job_id)
    return code


def _final(code: int) -> bool:
    """Did the run record a final state? Not when its claim was lost, nor for a job
    queued again to resume: its slot is freed by the exit report, so it cannot start
    again while this process still runs."""
    return code not in (EXIT_CLAIM_LOST, EXIT_RESUMED)


def _run_job(
    db_path: Path,
    job_id: int,
    *,
    log_dir: Path | None = None,
    grace: float = 5.0,
    claim_queued: bool = False,
    db: JobDB | None = None,
    on_change: Callable[[int], None] | None = None,
) -> tuple[int, Job]:
    """:func:`run_job` without ``on_final``; the exit code and the job's state."""
    db_path = Path(db_path).absolute()  # steps run with their project as our cwd
    if db is None:
        db = JobDB(db_path, check=False, prepared=True)
    log_path = (Path(log_dir) / "log") if log_dir else db.log_path(job_id)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    job = Job(db, job_id, log_fd, grace)
    job.on_change = on_change
    job.job_dir = log_path.parent
    # Handlers before the claim: a SIGTERM from here on is recorded, not fatal.
    job.install_signals()
    # The title before the claim too: a cancel that finds the row running signals the
    # procwrap only once its title names the job (the pid-reuse guard); in the gap
    # between claim and title the cancel was lost and the job ran on.
    _set_title(procwrap_title(db_path, job_id, None))
    states = (JobState.QUEUED, JobState.STARTING) if claim_queued else (JobState.STARTING,)
    try:
        row = db.claim_row(job_id, os.getpid(), from_states=states)
    except BaseException:
        os.close(log_fd)
        raise
    if row is None:
        os.close(log_fd)
        if db.get(job_id) is None:
            print(f"procwrap: job {job_id} is not in {db_path}", file=sys.stderr)
        return EXIT_CLAIM_LOST, job
    if on_change is not None:
        on_change(job_id)
    try:
        _set_title(procwrap_title(db_path, job_id, row))
        code = _run_claimed(job, row, db_path, log_path.parent)
    finally:
        os.close(log_fd)
    return code, job


def _run_claimed(job: Job, row: JobRow, db_path: Path, job_dir: Path) -> int:
    """Run the job this procwrap claimed; any failure of ours is recorded as ``failed``."""
    try:
        set_subreaper()
        _load(job, row, db_path, job_dir)
        if row.cancel_request == "cancel":
            job.term_signal = signal.SIGTERM
        return job.run()
    except Exception as exc:  # noqa: BLE001 - record any failure instead of dying silently
        with contextlib.suppress(Exception):
            job.log("rayserver: internal error in the procwrap:\n" + traceback.format_exc())
        with contextlib.suppress(Exception):
            job.db.finish(
                job.id,
                JobState.FAILED,
                reason=f"internal error in the procwrap: {exc}",
                from_states=(JobState.RUNNING,),
            )
        return EXIT_INTERNAL


def _load(job: Job, row: JobRow, db_path: Path, job_dir: Path) -> None:
    """The job's row and the installation's settings, read now: its box is built from them."""
    home = _home_of(db_path)
    settings, note = jobbox.job_settings(home)
    job.load(row, settings, home, job_dir)
    if note:
        job.log(note)


def main(argv: list[str] | None = None) -> int:
    """``python -m rayserver.procwrap --db DB --job ID [--grace S] [--claim-queued]``."""
    import argparse  # here: the fork server, which imports this module, never parses

    parser = argparse.ArgumentParser(
        prog="python -m rayserver.procwrap",
        description="Run one rayserver job and record its result.",
    )
    parser.add_argument("--db", required=True, type=Path, help="the job database file")
    parser.add_argument("--job", required=True, type=int, help="the job id")
    parser.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds between SIGTERM and SIGKILL on cancel (default 5)",
    )
    parser.add_argument(
        "--claim-queued",
        action="store_true",
        help="claim a queued job (Slurm/CLI), not only a starting one",
    )
    parser.add_argument("--log-dir", type=Path, default=None)
    ns = parser.parse_args(argv)
    if not ns.db.is_file():
        print(f"procwrap: no job database at {ns.db}", file=sys.stderr)
        return EXIT_USAGE
    if ns.grace < 0:
        print(f"procwrap: --grace must be >= 0 seconds, got {ns.grace}", file=sys.stderr)
        return EXIT_USAGE
    # Our own session, like a fork-server child (fails harmlessly if we lead one).
    with contextlib.suppress(PermissionError):
        os.setsid()
    code = run_job(ns.db, ns.job, log_dir=ns.log_dir, grace=ns.grace, claim_queued=ns.claim_queued)
    if code == EXIT_CLAIM_LOST:
        print(
            f"procwrap: job {ns.job} was not ours to run (already claimed, finished or unknown)",
            file=sys.stderr,
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
