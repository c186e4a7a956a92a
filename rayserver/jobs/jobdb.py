"""The job database: the queue and every job's state, in SQLite (WAL).

One file, ``<home>/srvstate/jobs.sqlite3``, shared by the worker (HTTP layer
and scheduler) and by every procwrap. Each process opens its own connection
(a connection is never carried across ``fork``: :class:`JobDB` notices a new
pid and reconnects). Every state change that two processes may race for is
one guarded ``UPDATE ... WHERE state=...`` so exactly one side wins (see
docs/internals.md, "Job database").

A database that is locked at open or fails ``PRAGMA quick_check`` stops the
server with :class:`JobDBError`: the queue is never silently lost or
recreated. A corrupt file is left where it is, untouched, and a copy is put
aside as ``<db>.corrupt-<time>`` for inspection.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from rayserver.common.paths import JOBS_FOLDER, job_folder
from rayserver.common.states import ACTIVE_STATES, API_STATES, FINAL_STATES, JobState
from rayserver.jobs.rows import JobRow, StepSpec

BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT,
    priority INTEGER NOT NULL DEFAULT 0,
    client TEXT NOT NULL DEFAULT '',
    location TEXT NOT NULL DEFAULT '',
    project TEXT NOT NULL DEFAULT '',
    workdir TEXT NOT NULL,
    steps TEXT NOT NULL,
    env TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    submitted_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    pid INTEGER,
    pgid_children INTEGER,
    progress REAL NOT NULL DEFAULT 0,
    current_step INTEGER NOT NULL DEFAULT 0,
    step_count INTEGER NOT NULL DEFAULT 0,
    exit_status INTEGER,
    signal INTEGER,
    reason TEXT,
    wall_time REAL,
    cpu_time REAL,
    max_rss_kb INTEGER,
    cancel_request TEXT,
    executor TEXT NOT NULL DEFAULT 'local',
    external_id TEXT,
    outputs TEXT,
    after_ids TEXT,
    project_dir TEXT,
    cpus INTEGER NOT NULL DEFAULT 1,
    warnings TEXT
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(state, priority DESC, id);
CREATE INDEX IF NOT EXISTS jobs_state_id ON jobs(state, id);
"""

# Columns added to the table after databases were in use: a worker's open adds
# the missing ones (ALTER TABLE ... ADD COLUMN keeps every row; new columns are NULL).
_ADDED_COLUMNS = (
    ("after_ids", "TEXT"),
    ("project_dir", "TEXT"),
    ("cpus", "INTEGER NOT NULL DEFAULT 1"),
    # Who submitted the job (a named token's user); NULL: the shared token's.
    ("user", "TEXT"),
    # Sandbox and limit events of the job, a JSON list of names (add_event).
    ("events", "TEXT"),
    # What went wrong without failing the job, a JSON list of texts (a damaged ambient file).
    ("warnings", "TEXT"),
    # Times the job was queued again after an interruption (resume_interrupted), and the
    # step (1-based) it was in then: the next run skips the steps before it.
    ("resumes", "INTEGER NOT NULL DEFAULT 0"),
    ("resume_step", "INTEGER"),
)

# Partial indexes that keep GET /metrics' histogram and event counts off the
# table itself (10,000 jobs: 25 ms and 10 ms of table scan without them).
_ADDED_INDEXES = (
    (
        "jobs_wall_time",
        "CREATE INDEX IF NOT EXISTS jobs_wall_time ON jobs(wall_time) WHERE wall_time IS NOT NULL",
    ),
    (
        "jobs_events",
        "CREATE INDEX IF NOT EXISTS jobs_events ON jobs(events) WHERE events IS NOT NULL",
    ),
)

# Events a job may record (GET /metrics counts them; docs/operations.md).
EVENTS = (
    "log_capped",  # the log reached max_log_bytes (head and tail kept)
    "processes_limit",  # the job had more processes than max_job_processes
    "memory_limit",  # the job's memory cgroup ran out (OOM kill)
    "file_size_limit",  # a program exceeded max_output_bytes (SIGXFSZ)
    "sandbox_denied",  # the sandbox refused an access (Landlock, seccomp)
    "resumed",  # interrupted, the job was queued again to resume (resume_interrupted)
    "resume_restart",  # a resumed step could not continue its output: it started over
)

# Resumes a job gets at most; interrupted once more, it ends interrupted.
MAX_RESUMES = 3

# A job ended so: the jobs waiting for it (--after) are cancelled.
BLOCKING_STATES = (JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED)


# A queued row may start: none of its ``after`` jobs is anything but done.
_READY = (
    "(after_ids IS NULL OR NOT EXISTS (SELECT 1 FROM json_each(jobs.after_ids) d "
    "JOIN jobs p ON p.id = d.value WHERE p.state != ?))"
)
# Queued rows that never can: (job, the job it waits for, that one's state).
_BLOCKED = (
    "SELECT j.id, p.id, p.state FROM jobs j, json_each(j.after_ids) d "
    "JOIN jobs p ON p.id = d.value WHERE j.state = ? AND j.after_ids IS NOT NULL "
    f"AND p.state IN ({', '.join('?' * len(BLOCKING_STATES))}) ORDER BY j.id, p.id"
)


class UnknownJobsError(ValueError):
    """Jobs named in ``after`` that the database does not hold (``ids``)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.index: int | None = None  # which job of a batch (JobDB.submit_many)
        super().__init__(f"no job {', '.join(map(str, ids))} on this server")


class JobDBError(Exception):
    """The job database cannot be used; the message says which file and why."""


def _one(row: sqlite3.Row | None) -> JobRow | None:
    return None if row is None else JobRow.decode(row)


def _marks(values: tuple[object, ...] | list[int]) -> str:
    return ",".join("?" * len(values))


def _clean_steps(steps: list[dict[str, Any]]) -> list[StepSpec]:
    """The steps as stored: exactly the keys a step has; ValueError naming what lacks."""
    if not steps:
        raise ValueError("a job needs at least one step")
    for i, step in enumerate(steps, 1):
        missing = {"program", "path", "args"} - set(step)
        if missing:
            raise ValueError(f"step {i} lacks {', '.join(sorted(missing))}")
    clean: list[StepSpec] = []
    for s in steps:
        step: StepSpec = {
            "program": s["program"],
            "path": s["path"],
            "args": list(s["args"]),
            "stdin": s.get("stdin"),
            "stdout": s.get("stdout"),
        }
        for kind in ("sh", "script"):  # a shell step's command line or script
            if isinstance(s.get(kind), str):
                step[kind] = s[kind]
        clean.append(step)
    return clean


class JobDB:
    """Access to the job database from one process (reconnects after fork)."""

    def __init__(self, path: Path, *, check: bool = True, prepared: bool = False) -> None:
        """Open (and create if needed) the database at ``path``.

        ``check`` runs ``PRAGMA quick_check``; procwraps skip it because
        the worker already checked the file at start and a procwrap must
        start in milliseconds. ``prepared`` (procwraps) trusts that the
        worker created the folders, the schema and WAL mode (WAL is stored
        in the file): the connection is opened at the first query, with
        only the per-connection settings, saving a procwrap ~1 ms.
        """
        self.path = Path(path)
        self.state_dir = self.path.parent
        self._local = threading.local()
        self._prepared = prepared
        if prepared:
            return
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            (self.state_dir / JOBS_FOLDER).mkdir(exist_ok=True)
        except OSError as exc:
            raise JobDBError(
                f"cannot create the job state folder {self.state_dir}: {exc.strerror or exc}"
            ) from exc
        conn = self._conn()
        if check:
            self._quick_check(conn)
        try:
            if check:
                # In WAL mode readers pass another process's write lock, so only a
                # write shows it: take the write lock once (waiting up to the busy
                # timeout) rather than fail later, half-started, on the first write.
                with self._write(conn):
                    pass
            have = conn.execute(
                "SELECT COUNT(*) FROM sqlite_master WHERE type='index' AND name='jobs_state_id'"
            ).fetchone()[0]
            if not have:
                with self._write(conn):
                    # executescript would COMMIT our transaction; run statement by statement.
                    for stmt in _SCHEMA.split(";"):
                        if stmt.strip():
                            conn.execute(stmt)
            self._migrate(conn)
        except sqlite3.OperationalError as exc:
            raise self._locked_or_broken(exc) from exc

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        """Add the columns a database made by an older version lacks (see _ADDED_COLUMNS)."""

        def missing() -> list[tuple[str, str]]:
            have = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
            return [(name, decl) for name, decl in _ADDED_COLUMNS if name not in have]

        def missing_indexes() -> list[str]:
            have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
            return [sql for name, sql in _ADDED_INDEXES if name not in have]

        if not missing() and not missing_indexes():
            return
        with JobDB._Tx(conn):
            for name, decl in missing():  # again under the write lock: another open may race
                conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
            for sql in missing_indexes():
                conn.execute(sql)

    # --- connections -----------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        # A connection inherited across fork must not be used (or closed:
        # closing could touch the parent's locks); just drop the reference.
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=True,
            )
            conn.row_factory = sqlite3.Row
            # (connect's timeout already is the busy timeout.)
            if not self._prepared:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise JobDBError(
                        f"{self.path}: cannot switch the job database to WAL mode (got "
                        f"{mode!r}); is it on a file system without shared-memory support (NFS)?"
                    )
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as exc:
            raise self._locked_or_broken(exc) from exc
        self._local.conn = conn
        self._local.pid = os.getpid()
        return conn

    def _locked_or_broken(self, exc: sqlite3.Error) -> JobDBError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return JobDBError(
                f"{self.path}: the job database is locked by another process and stayed locked "
                f"for {BUSY_TIMEOUT_MS // 1000} s ({text}); the server refuses to start rather "
                "than lose the queue. Find the process holding it (fuser/lsof) and try again."
            )
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            return self._corrupt(text)
        return JobDBError(f"{self.path}: cannot open the job database: {text}")

    def _corrupt(self, detail: str) -> JobDBError:
        import shutil  # here: with bz2 and lzma, it is not for the fork server to load

        stamp = time.strftime("%Y%m%d-%H%M%S")
        copy = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            shutil.copy2(self.path, copy)
            for suffix in ("-wal", "-shm"):
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    shutil.copy2(side, copy.with_name(copy.name + suffix))
            copied = f"a copy for inspection is at {copy}"
        except OSError as exc:
            copied = f"copying it aside to {copy} failed too ({exc.strerror or exc})"
        return JobDBError(
            f"{self.path}: the job database is corrupt ({detail}); the server refuses to start, "
            f"and the file was left untouched; {copied}. Restore it from a backup, or move it "
            "away to start with an empty queue."
        )

    def _quick_check(self, conn: sqlite3.Connection) -> None:
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        except sqlite3.OperationalError as exc:
            raise self._locked_or_broken(exc) from exc
        except sqlite3.DatabaseError as exc:
            raise self._corrupt(str(exc)) from exc
        result = "; ".join(str(r[0]) for r in rows)
        if result != "ok":
            # quick_check lists many problems over many lines: keep the message one line.
            first = "; ".join(part.strip() for part in result.splitlines() if part.strip())
            raise self._corrupt(first[:300] + ("..." if len(first) > 300 else ""))

    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            # IMMEDIATE: take the write lock up front so a read-then-write
            # never fails half-way with SQLITE_BUSY.
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            if exc_type is None:
                self.conn.execute("COMMIT")
            else:
                self.conn.execute("ROLLBACK")

    def _write(self, conn: sqlite3.Connection | None = None) -> JobDB._Tx:
        return JobDB._Tx(conn or self._conn())

    def close(self) -> None:
        """Close this thread's connection (if it was opened by this process)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    # --- the pinned interface ---------------------------------------------

    def submit(
        self,
        *,
        name: str | None,
        priority: int,
        client: str,
        location: str,
        project: str,
        workdir: str,
        steps: list[dict[str, Any]],
        env: dict[str, str],
        executor: str = "local",
        after: list[int] | None = None,
        user: str | None = None,
        project_dir: str | None = None,
        cpus: int = 1,
    ) -> int:
        """Queue a resolved job; returns its id.

        ``user``: who submitted it (a named token's user; None for the shared token).
        ``after``: ids of jobs that must be ``done`` before this one starts;
        :class:`UnknownJobsError` when some are not in the database (checked
        in the inserting transaction, so the answer holds). ``project_dir``:
        the project's folder (the box's writable root; ``workdir`` may lie
        inside it); ``cpus``: the cpu slots the job takes (its -n / rad -N).
        """
        with self._write() as conn:
            return _insert_job(
                conn,
                name=name,
                priority=priority,
                client=client,
                location=location,
                project=project,
                workdir=workdir,
                steps=steps,
                env=env,
                executor=executor,
                after=after,
                user=user,
                project_dir=project_dir,
                cpus=cpus,
            )

    def submit_many(self, jobs: list[dict[str, Any]]) -> list[int]:
        """Queue several resolved jobs in one transaction: all or none; their ids in order.

        Each item holds :meth:`submit`'s keyword arguments. An
        :class:`UnknownJobsError` has ``index`` set to the item it is about,
        and nothing is queued.
        """
        ids: list[int] = []
        with self._write() as conn:
            for index, job in enumerate(jobs):
                try:
                    ids.append(_insert_job(conn, **job))
                except UnknownJobsError as exc:
                    exc.index = index
                    raise
        return ids

    def get(self, job_id: int) -> JobRow | None:
        """The job's full row, or None."""
        row = self._conn().execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _one(row)

    def public(self, row: JobRow, outputs_limit: int | None = None) -> dict[str, Any]:
        """The API job object of docs/api-contract.md for a row from :meth:`get`."""
        waiting = self.waiting_for(row) if row.state == JobState.QUEUED else []
        return row.to_api(waiting_for=waiting, outputs_limit=outputs_limit)

    def waiting_for(self, row: JobRow) -> list[int]:
        """The jobs of ``row``'s ``after`` that are not done yet (ascending ids)."""
        after = list(row.after_ids or [])
        if not after:
            return []
        sql = f"SELECT id FROM jobs WHERE id IN ({_marks(after)}) AND state != ? ORDER BY id"
        return [r[0] for r in self._conn().execute(sql, (*after, JobState.DONE))]

    def list(
        self, states: list[str] | None = None, limit: int = 100, before: int | None = None
    ) -> list[JobRow]:
        """Rows newest first; ``before`` pages on the id (index-backed)."""
        where, args = [], []  # type: ignore[var-annotated]
        if states:
            wanted = set()
            for st in states:
                if st not in API_STATES and st != JobState.STARTING:
                    raise ValueError(
                        f"unknown job state {st!r}; expected one of {', '.join(API_STATES)}"
                    )
                wanted.add(st)
                if st == JobState.QUEUED:
                    wanted.add(JobState.STARTING)
            where.append(f"state IN ({','.join('?' * len(wanted))})")
            args.extend(sorted(wanted))
        if before is not None:
            where.append("id < ?")
            args.append(int(before))
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(max(0, int(limit)))
        return [JobRow.decode(r) for r in self._conn().execute(sql, args).fetchall()]

    def counts(self) -> dict[str, int]:
        """Number of jobs per API state ('starting' counts as 'queued')."""
        out = {str(state): 0 for state in API_STATES}
        for state, n in self._conn().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            key = str(JobState(state).public)
            out[key] = out.get(key, 0) + n
        return out

    def add_event(self, job_id: int, event: str) -> None:
        """Record that ``event`` (one of :data:`EVENTS`) happened to the job.

        For the procwrap and the sandbox: one short UPDATE, safe from any
        process; GET /metrics counts the events of every job.
        """
        if event not in EVENTS:
            raise ValueError(f"unknown job event {event!r}; expected one of {', '.join(EVENTS)}")
        with self._write() as conn:
            conn.execute(
                "UPDATE jobs SET events = json_insert(COALESCE(events, '[]'), '$[#]', ?) "
                "WHERE id=?",
                (event, job_id),
            )

    def event_counts(self) -> dict[str, int]:
        """How often each event of :data:`EVENTS` happened, over all jobs."""
        out = dict.fromkeys(EVENTS, 0)
        sql = (
            "SELECT e.value, COUNT(*) FROM jobs, json_each(jobs.events) e "
            "WHERE jobs.events IS NOT NULL GROUP BY e.value"
        )
        for name, n in self._conn().execute(sql):
            out[str(name)] = out.get(str(name), 0) + n
        return out

    def wall_times(self, bounds: tuple[float, ...]) -> tuple[list[int], int, float]:
        """Finished jobs' wall times: (count at or below each bound, count, sum).

        One pass over the partial index jobs_wall_time, each time put in its
        first bucket by one CASE; the buckets are summed up here.
        """
        cases = " ".join(f"WHEN wall_time <= ? THEN {i}" for i in range(len(bounds)))
        sql = (
            f"SELECT CASE {cases} ELSE {len(bounds)} END, COUNT(*), TOTAL(wall_time) "
            "FROM jobs WHERE wall_time IS NOT NULL GROUP BY 1"
        )
        per_bucket = [0] * (len(bounds) + 1)
        total = 0.0
        for bucket, n, part in self._conn().execute(sql, bounds):
            per_bucket[int(bucket)] = int(n)
            total += float(part)
        below, running = [], 0
        for n in per_bucket[:-1]:
            running += n
            below.append(running)
        return below, sum(per_bucket), total

    def queued_count(self) -> int:
        """Jobs waiting to start (queued or starting); an index range, not a table scan."""
        return int(
            self._conn()
            .execute(
                "SELECT COUNT(*) FROM jobs WHERE state IN (?,?)",
                (JobState.QUEUED, JobState.STARTING),
            )
            .fetchone()[0]
        )

    def cancel_queued(self, job_id: int) -> bool:
        """Atomically queued -> cancelled; False when the job was not queued."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state=?, ended_at=?, cancel_request='cancel', "
                "reason='cancelled before it started' WHERE id=? AND state=?",
                (JobState.CANCELLED, time.time(), job_id, JobState.QUEUED),
            )
        return cur.rowcount == 1

    def request_cancel(self, job_id: int, reason: str) -> JobRow | None:
        """Mark a starting/running job for cancel ('cancel') or shutdown ('shutdown').

        Returns the row after the change, or None when the job was not
        starting or running. A 'cancel' is never downgraded to 'shutdown'.
        """
        if reason not in ("cancel", "shutdown"):
            raise ValueError(f"cancel reason must be 'cancel' or 'shutdown', got {reason!r}")
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET cancel_request=CASE WHEN cancel_request='cancel' THEN 'cancel' "
                "ELSE ? END WHERE id=? AND state IN (?,?)",
                (reason, job_id, *ACTIVE_STATES),
            )
        if cur.rowcount != 1:
            return None
        return self.get(job_id)

    def log_path(self, job_id: int) -> Path:
        """The job's log file: <state dir>/jobs/<id>/log."""
        return job_folder(self.state_dir, job_id) / "log"

    # --- used by the scheduler and the procwrap ------------------------------

    def next_queued(self, executor: str | None = None) -> JobRow | None:
        """The job that should start next: highest priority, then oldest.

        A job with ``after`` waits until every one of those jobs is done.
        """
        sql = f"SELECT * FROM jobs WHERE state=? AND {_READY}"
        args: list[Any] = [JobState.QUEUED, JobState.DONE]
        if executor:
            sql += " AND executor=?"
            args.append(executor)
        sql += " ORDER BY priority DESC, id LIMIT 1"
        return _one(self._conn().execute(sql, args).fetchone())

    def cancel_blocked(self) -> list[tuple[int, int, str]]:
        """Cancel queued jobs whose ``after`` job ended failed, cancelled or interrupted.

        Each is one guarded UPDATE (``state='queued'``), so a job that
        started or was cancelled meanwhile is left alone; a cancelled job
        blocks its own followers in turn (repeated until none is left).
        Returns (job, the job it waited for, that job's state) per change.
        """
        changed: list[tuple[int, int, str]] = []
        while True:
            first: dict[int, tuple[int, int, str]] = {}
            for job_id, pred, pred_state in self._conn().execute(
                _BLOCKED, (JobState.QUEUED, *BLOCKING_STATES)
            ):
                first.setdefault(job_id, (job_id, pred, pred_state))
            if not first:
                return changed
            done_now = []
            with self._write() as conn:
                for job_id, pred, pred_state in first.values():
                    cur = conn.execute(
                        "UPDATE jobs SET state=?, ended_at=?, reason=? WHERE id=? AND state=?",
                        (
                            JobState.CANCELLED,
                            time.time(),
                            f"job {pred}, which it was to run after, ended {pred_state}",
                            job_id,
                            JobState.QUEUED,
                        ),
                    )
                    if cur.rowcount == 1:
                        done_now.append((job_id, pred, pred_state))
            changed += done_now
            if not done_now:
                return changed

    def mark_starting(self, job_id: int) -> bool:
        """queued -> starting (the scheduler picked it); False if someone else did."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state=? WHERE id=? AND state=?",
                (JobState.STARTING, job_id, JobState.QUEUED),
            )
        return cur.rowcount == 1

    def unstart(self, job_id: int, reason: str | None = None) -> bool:
        """starting -> queued (a launch failed or a new worker found it half-started)."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state=?, pid=NULL, reason=? WHERE id=? AND state=?",
                (JobState.QUEUED, reason, job_id, JobState.STARTING),
            )
        return cur.rowcount == 1

    def reset_starting(self) -> list[int]:
        """Every starting row back to queued (a new worker starts); returns their ids."""
        with self._write() as conn:
            ids = [
                r[0]
                for r in conn.execute("SELECT id FROM jobs WHERE state=?", (JobState.STARTING,))
            ]
            conn.execute(
                "UPDATE jobs SET state=?, pid=NULL WHERE state=?",
                (JobState.QUEUED, JobState.STARTING),
            )
        return ids

    def claim(
        self, job_id: int, pid: int, *, from_states: tuple[str, ...] = (JobState.STARTING,)
    ) -> bool:
        """The procwrap's exactly-once claim: from_states -> running with its pid."""
        return self.claim_row(job_id, pid, from_states=from_states) is not None

    def claim_row(
        self, job_id: int, pid: int, *, from_states: tuple[str, ...] = (JobState.STARTING,)
    ) -> JobRow | None:
        """:meth:`claim` that returns the claimed row as :meth:`get` would (None: not ours).

        One statement claims and reads, so a procwrap needs no other query to start.
        """
        with self._write() as conn:
            row = conn.execute(
                f"UPDATE jobs SET state=?, pid=?, started_at=?, progress=0, "
                f"current_step=0 WHERE id=? AND state IN ({_marks(from_states)}) RETURNING *",
                (JobState.RUNNING, pid, time.time(), job_id, *from_states),
            ).fetchone()
        return _one(row)

    def update_progress(
        self,
        job_id: int,
        *,
        progress: float | None = None,
        current_step: int | None = None,
        step_count: int | None = None,
        pgid_children: int | None = None,
    ) -> None:
        """Progress of a running job (only while it is running)."""
        sets, args = [], []  # type: ignore[var-annotated]
        for col, val in (
            ("progress", progress),
            ("current_step", current_step),
            ("step_count", step_count),
            ("pgid_children", pgid_children),
        ):
            if val is not None:
                sets.append(f"{col}=?")
                args.append(val)
        if not sets:
            return
        with self._write() as conn:
            conn.execute(
                f"UPDATE jobs SET {', '.join(sets)} WHERE id=? AND state=?",
                (*args, job_id, JobState.RUNNING),
            )

    def finish(
        self,
        job_id: int,
        state: str,
        *,
        exit_status: int | None = None,
        signal: int | None = None,
        reason: str | None = None,
        wall_time: float | None = None,
        cpu_time: float | None = None,
        max_rss_kb: int | None = None,
        progress: float | None = None,
        outputs: list[dict[str, Any]] | None = None,
        warnings: list[str] | None = None,
        from_states: tuple[str, ...] = ACTIVE_STATES,
    ) -> bool:
        """Record a final state, once: False if the job was already final."""
        if state not in FINAL_STATES:
            raise ValueError(f"final state must be one of {', '.join(FINAL_STATES)}, got {state!r}")
        marks = _marks(from_states)
        with self._write() as conn:
            cur = conn.execute(
                f"UPDATE jobs SET state=?, ended_at=?, exit_status=?, signal=?, reason=?, "
                f"wall_time=COALESCE(?, wall_time), cpu_time=COALESCE(?, cpu_time), "
                f"max_rss_kb=COALESCE(?, max_rss_kb), progress=COALESCE(?, progress), "
                f"outputs=COALESCE(?, outputs), warnings=COALESCE(?, warnings), "
                f"pgid_children=NULL "
                f"WHERE id=? AND state IN ({marks})",
                (
                    state,
                    time.time(),
                    exit_status,
                    signal,
                    reason,
                    wall_time,
                    cpu_time,
                    max_rss_kb,
                    progress,
                    json.dumps(outputs) if outputs is not None else None,
                    json.dumps(warnings) if warnings else None,
                    job_id,
                    *from_states,
                ),
            )
        return cur.rowcount == 1

    def interrupt(
        self,
        job_id: int,
        reason: str,
        *,
        resume: bool,
        from_states: tuple[str, ...] = ACTIVE_STATES,
        **final: Any,
    ) -> JobState | None:
        """A job that would end interrupted: queued again to resume, or interrupted.

        ``resume`` (the setting resume_interrupted): one guarded UPDATE moves
        the row from ``from_states`` back to ``queued``, counts the resume,
        remembers the step it was in and records the ``resumed`` event, unless
        it was resumed :data:`MAX_RESUMES` times already or a cancel was asked
        for. Otherwise :meth:`finish` records it ``interrupted`` (``final``:
        finish's other fields). Returns the state written, or None when the
        row was not in ``from_states`` (someone else recorded it).
        """
        if resume:
            with self._write() as conn:
                cur = conn.execute(
                    "UPDATE jobs SET state=?, resumes=resumes+1, "
                    "resume_step=COALESCE(NULLIF(current_step, 0), resume_step), "
                    "pid=NULL, pgid_children=NULL, cancel_request=NULL, reason=?, "
                    "events=json_insert(COALESCE(events, '[]'), '$[#]', 'resumed') "
                    f"WHERE id=? AND state IN ({_marks(from_states)}) AND resumes < ? "
                    "AND COALESCE(cancel_request, '') != 'cancel'",
                    (JobState.QUEUED, f"resuming: {reason}", job_id, *from_states, MAX_RESUMES),
                )
            if cur.rowcount == 1:
                return JobState.QUEUED
            row = self.get(job_id)
            if row is not None and row.resumes >= MAX_RESUMES:
                reason += f"; not resumed again: it was resumed {row.resumes} times already"
        done = self.finish(
            job_id, JobState.INTERRUPTED, reason=reason, from_states=from_states, **final
        )
        return JobState.INTERRUPTED if done else None

    def in_states(self, states: tuple[str, ...]) -> list[JobRow]:
        """All rows in the given states, oldest first (small sets: running, starting)."""
        rows = (
            self._conn()
            .execute(f"SELECT * FROM jobs WHERE state IN ({_marks(states)}) ORDER BY id", states)
            .fetchall()
        )
        return [JobRow.decode(r) for r in rows]

    def neighbours(self, job_id: int, workdir: str) -> tuple[list[int], int]:
        """(ids of the other jobs of ``workdir`` not final yet, the highest job id now).

        With :meth:`neighbours_files` after a step: every job that can have
        run beside it is one of these or newer (index-backed, no table scan).
        """
        conn = self._conn()
        # The highest id first: a job submitted between the two reads is then newer than
        # it, or not final yet. The other way round, one submitted in between was neither
        # (seen: a neighbour's picture listed as a job's output).
        top = conn.execute("SELECT COALESCE(MAX(id), 0) FROM jobs").fetchone()[0]
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM jobs WHERE state IN (?, ?, ?) AND id != ? AND workdir = ?",
                (JobState.QUEUED, JobState.STARTING, JobState.RUNNING, job_id, workdir),
            )
        ]
        return ids, int(top)

    def neighbours_files(self, job_id: int, workdir: str, ids: list[int], top: int) -> list[str]:
        """Absolute stdout files of the jobs :meth:`neighbours` found, and of newer ones.

        A procwrap's scan of its project also sees what the jobs running
        beside it wrote; the files those jobs name as their stdout are
        theirs, not its own.
        """
        rows = (
            self._conn()
            .execute(
                f"SELECT workdir, steps FROM jobs WHERE (id > ? OR id IN ({_marks(ids)})) "
                "AND id != ? AND workdir = ?",
                (top, *ids, job_id, workdir),
            )
            .fetchall()
        )
        files = []
        for other_dir, steps in rows:
            for step in json.loads(steps):
                if isinstance(step.get("stdout"), str):
                    files.append(os.path.normpath(os.path.join(other_dir, step["stdout"])))
        return files

    def set_external_id(self, job_id: int, external_id: str) -> None:
        """Remember the Slurm job id of a job."""
        with self._write() as conn:
            conn.execute("UPDATE jobs SET external_id=? WHERE id=?", (external_id, job_id))


def _insert_job(
    conn: sqlite3.Connection,
    *,
    name: str | None,
    priority: int,
    client: str,
    location: str,
    project: str,
    workdir: str,
    steps: list[dict[str, Any]],
    env: dict[str, str],
    executor: str = "local",
    after: list[int] | None = None,
    user: str | None = None,
    project_dir: str | None = None,
    cpus: int = 1,
) -> int:
    """INSERT one queued job in the open transaction ``conn``; its id."""
    clean = _clean_steps(steps)
    after = sorted({int(i) for i in after or []})
    if after:
        known = {
            r[0] for r in conn.execute(f"SELECT id FROM jobs WHERE id IN ({_marks(after)})", after)
        }
        if unknown := [i for i in after if i not in known]:
            raise UnknownJobsError(unknown)
    cur = conn.execute(
        "INSERT INTO jobs (name, priority, client, location, project, workdir, steps, "
        "env, state, submitted_at, step_count, executor, after_ids, user, project_dir, cpus) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            name,
            int(priority),
            client,
            location,
            project,
            workdir,
            json.dumps(clean),
            json.dumps(env),
            JobState.QUEUED,
            time.time(),
            len(clean),
            executor,
            json.dumps(after) if after else None,
            user,
            project_dir,
            max(1, int(cpus)),
        ),
    )
    return int(cur.lastrowid or 0)
