"""The worker's memory of its jobs: status, lists and pushed changes without asking SQLite.

The database stays the truth. Every state transition is still one guarded
UPDATE there, made by the worker or by a procwrap; this view only holds rows
*read back* from the database after the worker made a change or heard of one
(its own writes, and the datagram a procwrap sends after its claim, each
progress write and its final record: see rayserver.jobs.executors.forkserver).
So it never shows a state the database did not have; at worst, for a moment,
the one before.

What nobody tells the worker (the procwraps a previous worker started, Slurm
jobs, a datagram dropped on a full socket) is caught by reading an active
job's row again once the copy is older than :data:`UNFED_TTL` (jobs the
worker hears nothing of) or :data:`FED_TTL` (jobs whose procwraps report to
it). Final rows do not change; a few thousand of them are kept.

Versions: every change the view sees takes the next number of one counter,
seeded from the clock at start so that numbers go on growing across worker
restarts. A client gives the version it has (the long poll's ``since``, the
event stream's ``Last-Event-ID``) and is answered what is newer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rayserver.jobs.jobdb import JobDB
from rayserver.jobs.rows import JobRow

FED_TTL = 2.0  # a job whose procwrap reports to us: re-read anyway after this (a lost datagram)
UNFED_TTL = 0.25  # a job nobody reports on: re-read this often while someone looks
FINAL_TTL = 10.0  # a final row (another process might still queue it again)
KEEP_FINAL = 2000  # final jobs kept in memory (older ones are read from the database)
IDLE_SWEEP = 15.0  # nothing active in memory: a sweep finds nothing to read
LIST_TTL = 0.5  # a job list answered from memory is computed again after this at the latest
LIST_KEYS = 64  # distinct list queries remembered
# A job list (and the event stream) shows this many outputs per job (a job may write
# thousands of files; GET /v1/jobs/{id} lists them all, outputs_count counts them).
LIST_OUTPUTS = 50


@dataclass
class Entry:
    """One job as last read from the database, with its version."""

    row: JobRow
    job: dict[str, Any]  # the API job object (all outputs), "version" included
    version: int
    read_at: float
    stale: bool = False
    _body: bytes | None = field(default=None, repr=False)
    _listed: bytes | None = field(default=None, repr=False)

    @property
    def final(self) -> bool:
        return self.row.final

    @property
    def body(self) -> bytes:
        """The job object as JSON (made once per version)."""
        if self._body is None:
            self._body = json.dumps(self.job).encode()
        return self._body

    @property
    def listed_body(self) -> bytes:
        """:meth:`listed` as JSON (made once per version, however many streams send it)."""
        if self._listed is None:
            self._listed = json.dumps(self.listed()).encode()
        return self._listed

    def listed(self) -> dict[str, Any]:
        """The job object as a list shows it (at most :data:`LIST_OUTPUTS` outputs)."""
        outputs = self.job["outputs"]
        if len(outputs) <= LIST_OUTPUTS:
            return self.job
        return {**self.job, "outputs": outputs[:LIST_OUTPUTS]}


class Listener:
    """Someone waiting for changes: the job ids touched since it last looked."""

    def __init__(self) -> None:
        self.pending: set[int] = set()
        self.event = asyncio.Event()

    def take(self) -> set[int]:
        ids, self.pending = self.pending, set()
        self.event.clear()
        return ids


class JobView:
    """The worker's copies of job rows (one per worker, used from its event loop only)."""

    def __init__(self, db: JobDB, clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.clock = clock
        self.first_version = int(time.time() * 1000)
        self.version = self.first_version
        self.changes = 0  # touches so far: a remembered list is valid while this stands
        self.forgotten = 0  # the highest version of an entry dropped from memory
        self.closed = False
        self._entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self._active: set[int] = set()  # entries of jobs not final (the sweeps look at these)
        self._fed: set[int] = set()
        self._waiters: dict[int, set[Listener]] = {}
        self._listeners: set[Listener] = set()
        self._lists: dict[Any, tuple[int, float, Any]] = {}

    # --- what the worker tells the view -------------------------------------------

    def feed(self, job_id: int, fed: bool = True) -> None:
        """Every change of this job will be told (our fork server's procwrap runs it), or not."""
        if fed:
            self._fed.add(job_id)
        else:
            self._fed.discard(job_id)

    def touch(self, job_id: int) -> None:
        """The job's row changed (the worker wrote it, or a procwrap said so): read it again."""
        self.changes += 1
        entry = self._entries.get(job_id)
        if entry is not None:
            entry.stale = True
        self._wake(job_id)

    def _wake(self, job_id: int) -> None:
        for listener in self._waiters.get(job_id, ()):
            listener.pending.add(job_id)
            listener.event.set()
        for listener in self._listeners:
            listener.pending.add(job_id)
            listener.event.set()

    def close(self) -> None:
        """The worker stops: every waiter and stream returns."""
        self.closed = True
        for listener in [*self._listeners, *(w for s in self._waiters.values() for w in s)]:
            listener.event.set()

    # --- reading ------------------------------------------------------------------

    def _due(self, entry: Entry, now: float) -> bool:
        if entry.stale:
            return True
        if entry.final:
            ttl = FINAL_TTL
        elif entry.row.id in self._fed and not entry.row.after_ids:
            ttl = FED_TTL
        else:  # queued jobs with ``after`` change when another job does
            ttl = UNFED_TTL
        return now - entry.read_at > ttl

    def get(self, job_id: int) -> Entry | None:
        """The job, from memory when the copy is fresh enough, else read now (None: no job)."""
        entry = self._entries.get(job_id)
        if entry is not None and not self._due(entry, self.clock()):
            if entry.final:
                self._entries.move_to_end(job_id)
            return entry
        row = self.db.get(job_id)
        if row is None:
            self._drop(job_id)
            return None
        return self.observe(row)

    def observe(self, row: JobRow) -> Entry:
        """An entry for a row just read from the database (a new version if it changed)."""
        job = self.db.public(row)
        old = self._entries.get(row.id)
        now = self.clock()
        announced = old is not None and old.stale
        if old is not None:
            job["version"] = old.version
            if job == old.job:
                old.row, old.read_at, old.stale = row, now, False
                return old
            self._drop(row.id)
        self.version += 1
        job["version"] = self.version
        entry = Entry(row, job, self.version, now)
        self._entries[row.id] = entry
        if entry.final:
            self._fed.discard(row.id)
            self._forget_old()
        else:
            self._active.add(row.id)
        if old is not None and not announced:
            self._wake(row.id)  # a change nobody had told us of (its listeners learn it)
        return entry

    def _drop(self, job_id: int) -> None:
        self._entries.pop(job_id, None)
        self._active.discard(job_id)

    def _forget_old(self) -> None:
        while len(self._entries) - len(self._active) > KEEP_FINAL:
            for job_id, entry in self._entries.items():
                if entry.final:
                    self.forgotten = max(self.forgotten, entry.version)
                    self._drop(job_id)
                    break
            else:  # pragma: no cover - the count says there is one
                return

    def sweep(self) -> None:
        """Read again every active job whose copy is due (their listeners hear of changes)."""
        now = self.clock()
        for job_id in list(self._active):
            entry = self._entries.get(job_id)
            if entry is not None and self._due(entry, now):
                self.get(job_id)

    def sweep_interval(self) -> float:
        """How soon :meth:`sweep` may have something to read (IDLE_SWEEP: no active job)."""
        interval = IDLE_SWEEP
        for job_id in self._active:
            entry = self._entries[job_id]
            if job_id not in self._fed or entry.row.after_ids:
                return UNFED_TTL
            interval = FED_TTL
        return interval

    def changed_since(self, since: int) -> list[Entry] | None:
        """Jobs changed after version ``since``, oldest change first; None: cannot tell.

        None when ``since`` is not one of this worker's versions (a previous
        worker's, a future one) or older than a job dropped from memory.
        """
        if not self.first_version <= since <= self.version or since < self.forgotten:
            return None
        for job_id in [i for i, e in self._entries.items() if e.stale]:
            self.get(job_id)
        return sorted((e for e in self._entries.values() if e.version > since), key=_version)

    # --- lists --------------------------------------------------------------------

    def cached_list(self, key: Any, compute: Callable[[], Any]) -> Any:
        """A job list's answer (or the job counts): remembered while no job changed (and for
        LIST_TTL at most)."""
        now = self.clock()
        hit = self._lists.get(key)
        if hit is not None and hit[0] == self.changes and now - hit[1] <= LIST_TTL:
            return hit[2]
        changes = self.changes
        body = compute()
        if len(self._lists) >= LIST_KEYS:
            self._lists.clear()
        self._lists[key] = (changes, now, body)
        return body

    # --- waiting ------------------------------------------------------------------

    async def wait(self, job_id: int, since: int | None, timeout: float) -> Entry | None:
        """The job once it is newer than version ``since`` (None: once final), or at timeout."""
        deadline = self.clock() + max(0.0, timeout)
        listener = Listener()
        self._waiters.setdefault(job_id, set()).add(listener)
        try:
            while True:
                listener.take()  # before the read: a touch from now on ends the wait below
                entry = self.get(job_id)
                if entry is None or entry.final or self.closed:
                    return entry
                if since is not None and (entry.version > since or since > self.version):
                    return entry  # newer, or ``since`` is not ours (another worker's): answer
                left = deadline - self.clock()
                if left <= 0:
                    return entry
                ttl = FED_TTL if job_id in self._fed and not entry.row.after_ids else UNFED_TTL
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(listener.event.wait(), min(left, ttl))
        finally:
            waiting = self._waiters.get(job_id)
            if waiting is not None:
                waiting.discard(listener)
                if not waiting:
                    del self._waiters[job_id]

    def listen(self) -> Listener:
        """A listener told of every touched job (the event stream); :meth:`unlisten` ends it."""
        listener = Listener()
        self._listeners.add(listener)
        return listener

    def unlisten(self, listener: Listener) -> None:
        self._listeners.discard(listener)


def _version(entry: Entry) -> int:
    return entry.version
