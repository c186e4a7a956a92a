"""Job database: real SQLite files, real processes racing for the same rows."""

from __future__ import annotations

import multiprocessing
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayserver.jobs import jobdb
from rayserver.jobs.jobdb import JobDB, JobDBError

STEP = {
    "program": "rpict",
    "path": "/abs/bin/rpict",
    "args": ["-vf", "v.vf", "s.oct"],
    "stdin": None,
    "stdout": "out.hdr",
}


def submit(db: JobDB, priority: int = 0, name: str | None = None) -> int:
    return db.submit(
        name=name,
        priority=priority,
        client="10.0.0.5",
        location="projects",
        project="office",
        workdir="/srv/projects/office",
        steps=[dict(STEP)],
        env={"RAYPATH": ".:/lib"},
    )


@pytest.fixture
def db(tmp_path: Path) -> JobDB:
    return JobDB(tmp_path / "srvstate" / "jobs.sqlite3")


def test_open_creates_wal_database_and_folders(tmp_path: Path) -> None:
    path = tmp_path / "srvstate" / "jobs.sqlite3"
    JobDB(path)
    assert (tmp_path / "srvstate" / "jobs").is_dir()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    JobDB(path)  # a second open of an existing file works too


def test_submit_get_public(db: JobDB) -> None:
    job = submit(db, name="office")
    row = db.get(job)
    assert row["state"] == "queued" and row["steps"][0]["path"] == "/abs/bin/rpict"
    assert row["env"] == {"RAYPATH": ".:/lib"} and row["step_count"] == 1
    pub = db.public(row)
    assert pub["steps"] == [
        {"program": "rpict", "args": ["-vf", "v.vf", "s.oct"], "stdin": None, "stdout": "out.hdr"}
    ]
    # Outputs are what the steps wrote, found once they ran: none yet.
    assert pub["outputs"] == [] and pub["outputs_count"] == 0 and pub["cancel_requested"] is False
    assert set(pub) == {
        "id",
        "name",
        "priority",
        "state",
        "location",
        "project",
        "user",
        "steps",
        "client",
        "submitted_at",
        "started_at",
        "ended_at",
        "progress",
        "current_step",
        "step_count",
        "exit_status",
        "signal",
        "reason",
        "wall_time",
        "cpu_time",
        "max_rss_kb",
        "cancel_requested",
        "outputs",
        "outputs_count",
        "pid",
        "after",
        "waiting_for",
        "warnings",
        "resumes",
    }
    assert pub["after"] == [] and pub["waiting_for"] == [] and pub["warnings"] == []
    assert pub["resumes"] == 0
    assert db.mark_starting(job)
    assert db.public(db.get(job))["state"] == "queued"  # 'starting' is internal
    assert db.get(12345) is None
    assert db.log_path(job) == db.path.parent / "jobs" / str(job) / "log"


def test_submit_rejects_bad_steps(db: JobDB) -> None:
    with pytest.raises(ValueError, match="at least one step"):
        db.submit(
            name=None, priority=0, client="", location="", project="", workdir="/", steps=[], env={}
        )
    with pytest.raises(ValueError, match="step 1 lacks path"):
        db.submit(
            name=None,
            priority=0,
            client="",
            location="",
            project="",
            workdir="/",
            steps=[{"program": "x", "args": []}],
            env={},
        )


def test_list_paging_counts_and_states(db: JobDB) -> None:
    ids = [submit(db) for _ in range(7)]
    assert [r["id"] for r in db.list(limit=3)] == ids[::-1][:3]
    assert [r["id"] for r in db.list(limit=3, before=ids[4])] == [ids[3], ids[2], ids[1]]
    assert db.mark_starting(ids[0]) and db.claim(ids[0], 4242)
    assert db.finish(ids[0], "done", exit_status=0, progress=100.0)
    assert db.cancel_queued(ids[1])
    assert not db.cancel_queued(ids[1])
    assert db.mark_starting(ids[2])
    assert {r["id"] for r in db.list(["queued"])} == set(ids[2:])
    assert [r["id"] for r in db.list(["done", "cancelled"])] == [ids[1], ids[0]]
    assert db.counts() == {
        "queued": 5,
        "running": 0,
        "done": 1,
        "failed": 0,
        "cancelled": 1,
        "interrupted": 0,
    }
    with pytest.raises(ValueError, match="unknown job state 'bogus'"):
        db.list(["bogus"])
    plan = (
        db._conn()
        .execute(
            "EXPLAIN QUERY PLAN SELECT * FROM jobs WHERE id < ? ORDER BY id DESC LIMIT 3", (5,)
        )
        .fetchall()
    )
    assert "USING INTEGER PRIMARY KEY" in " ".join(str(r[3]) for r in plan)


def test_queue_order_and_state_guards(db: JobDB) -> None:
    low = submit(db, priority=-1)
    a = submit(db)
    b = submit(db)
    high = submit(db, priority=9)
    order = []
    while (row := db.next_queued()) is not None:
        assert db.mark_starting(row["id"])
        order.append(row["id"])
    assert order == [high, a, b, low]
    assert db.reset_starting() == sorted(order)
    assert db.claim(a, 1, from_states=("queued",))
    assert not db.claim(a, 2, from_states=("queued", "starting"))
    assert db.request_cancel(a, "shutdown")["cancel_request"] == "shutdown"
    assert db.request_cancel(a, "cancel")["cancel_request"] == "cancel"
    assert db.request_cancel(a, "shutdown")["cancel_request"] == "cancel"  # never downgraded
    assert db.request_cancel(b, "cancel") is None  # queued: not running
    with pytest.raises(ValueError):
        db.request_cancel(a, "later")
    db.update_progress(a, progress=42.0, current_step=1)
    assert db.get(a)["progress"] == 42.0
    assert db.finish(a, "cancelled", reason="cancelled by request", warnings=["amb damaged"])
    assert db.public(db.get(a))["warnings"] == ["amb damaged"]
    assert not db.finish(a, "failed")  # final states are final
    db.update_progress(a, progress=1.0)
    assert db.get(a)["progress"] == 42.0
    with pytest.raises(ValueError, match="final state"):
        db.finish(b, "running")


def _claimer(path: str, job: int, start: float, out: multiprocessing.Queue) -> None:
    db = JobDB(Path(path), check=False)
    while time.time() < start:
        pass
    out.put(db.claim(job, multiprocessing.current_process().pid or 0))


def test_exactly_once_claim_across_processes(db: JobDB) -> None:
    ctx = multiprocessing.get_context("spawn")
    for _ in range(2):
        job = submit(db)
        assert db.mark_starting(job)
        out = ctx.Queue()
        start = time.time() + 0.8  # all spawned and connected, then claim together
        procs = [
            ctx.Process(target=_claimer, args=(str(db.path), job, start, out)) for _ in range(6)
        ]
        for p in procs:
            p.start()
        results = [out.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(10)
        assert sorted(results) == [False] * 5 + [True]
        assert db.get(job)["pid"] in {p.pid for p in procs}


def test_connection_is_not_shared_across_fork(db: JobDB) -> None:
    job = submit(db)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()

    def child() -> None:
        out.put((id(db._conn()), db.get(job)["id"]))

    parent_conn = id(db._conn())
    p = ctx.Process(target=child)
    p.start()
    conn_id, got = out.get(timeout=10)
    p.join(10)
    assert got == job
    assert db._local.pid == __import__("os").getpid() and id(db._conn()) == parent_conn
    assert p.exitcode == 0


def test_corrupt_file_refuses_and_is_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "srvstate" / "jobs.sqlite3"
    path.parent.mkdir()
    garbage = b"this is not an SQLite database, just bytes\n" * 200
    path.write_bytes(garbage)
    with pytest.raises(JobDBError) as info:
        JobDB(path)
    msg = str(info.value)
    assert str(path) in msg and "corrupt" in msg and "refuses to start" in msg
    assert "left untouched" in msg
    assert path.read_bytes() == garbage
    copies = list(path.parent.glob("jobs.sqlite3.corrupt-*"))
    assert len(copies) == 1 and copies[0].read_bytes() == garbage
    assert str(copies[0]) in msg


def test_damaged_pages_fail_quick_check(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    db = JobDB(path)
    for _ in range(300):
        submit(db)
    db.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    raw = bytearray(path.read_bytes())
    page = 4096
    assert len(raw) > 6 * page
    for off in range(2 * page + 100, len(raw) - page, page):
        raw[off : off + 200] = b"\xff" * 200  # smash every page past the schema
    path.write_bytes(bytes(raw))
    before = path.read_bytes()
    with pytest.raises(JobDBError, match="corrupt.*refuses to start.*left untouched"):
        JobDB(path)
    assert path.read_bytes() == before


def test_locked_database_gives_a_clear_message(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "jobs.sqlite3"
    JobDB(path).close()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3,sys,time\n"
            f"c=sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "c.execute('PRAGMA locking_mode=EXCLUSIVE'); c.execute('BEGIN EXCLUSIVE')\n"
            "c.execute('UPDATE jobs SET name=name')\n"
            "print('held', flush=True); time.sleep(30)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(jobdb, "BUSY_TIMEOUT_MS", 300)
        with pytest.raises(JobDBError, match="locked by another process.*refuses to start"):
            JobDB(path)
    finally:
        holder.kill()
        holder.wait(10)
    JobDB(path)  # usable again once the holder is gone


def _submit_after(db: JobDB, after: list[int]) -> int:
    return db.submit(
        name=None,
        priority=0,
        client="",
        location="projects",
        project="office",
        workdir="/srv/projects/office",
        steps=[dict(STEP)],
        env={},
        after=after,
    )


def _run_to(db: JobDB, job: int, state: str) -> None:
    assert db.mark_starting(job) and db.claim(job, 4242)
    assert db.finish(job, state, exit_status=0 if state == "done" else None)


def test_after_waits_until_done_and_unknown_ids_are_refused(db: JobDB) -> None:
    first = submit(db, priority=-5)
    second = submit(db, priority=-5)
    waiting = _submit_after(db, [second, first, first])
    assert db.get(waiting)["after_ids"] == [first, second]
    pub = db.public(db.get(waiting))
    assert pub["after"] == [first, second] and pub["waiting_for"] == [first, second]
    # The dependent has the higher priority and still does not come first.
    assert db.next_queued()["id"] == first
    _run_to(db, first, "done")
    assert db.public(db.get(waiting))["waiting_for"] == [second]
    assert db.next_queued()["id"] == second
    _run_to(db, second, "done")
    assert db.next_queued()["id"] == waiting
    assert db.public(db.get(waiting))["waiting_for"] == []
    assert db.cancel_blocked() == []
    with pytest.raises(jobdb.UnknownJobsError, match=r"no job 777, 778 on this server"):
        _submit_after(db, [first, 778, 777])
    assert [r["id"] for r in db.list()] == [waiting, second, first]  # nothing was added


@pytest.mark.parametrize("how", ["failed", "cancelled", "interrupted"])
def test_after_a_job_that_did_not_succeed_cancels_the_chain(db: JobDB, how: str) -> None:
    first = submit(db)
    second = _submit_after(db, [first])
    third = _submit_after(db, [second])
    other = submit(db)
    _run_to(db, first, how)
    changed = db.cancel_blocked()
    assert changed == [(second, first, how), (third, second, "cancelled")]
    assert db.get(second)["reason"] == f"job {first}, which it was to run after, ended {how}"
    assert db.get(third)["reason"] == f"job {second}, which it was to run after, ended cancelled"
    assert db.get(third)["state"] == "cancelled" and db.get(other)["state"] == "queued"
    assert db.cancel_blocked() == []  # exactly once
    assert db.next_queued()["id"] == other


def test_an_older_database_gets_the_new_columns_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "srvstate" / "jobs.sqlite3"
    path.parent.mkdir()
    old_schema = jobdb._SCHEMA.replace(",\n    after_ids TEXT", "")
    assert "after_ids" not in old_schema
    conn = sqlite3.connect(path)
    conn.executescript(old_schema)
    conn.execute(
        "INSERT INTO jobs (workdir, steps, env, submitted_at) VALUES ('/w', '[]', '{}', 1.0)"
    )
    conn.commit()
    conn.close()
    db = JobDB(path)
    assert db.get(1)["after_ids"] == [] and db.next_queued()["id"] == 1
    # A job from before named tokens is the shared token's user's; no events yet.
    assert db.get(1).owner == "admin" and db.public(db.get(1))["user"] == "admin"
    assert db.get(1).events == [] and db.event_counts()["log_capped"] == 0
    assert _submit_after(db, [1]) == 2
    db.close()
    JobDB(path).close()  # a second open finds nothing to add


def test_job_events_counted(db: JobDB) -> None:
    first, second = submit(db), submit(db)
    db.add_event(first, "log_capped")
    db.add_event(first, "processes_limit")
    db.add_event(second, "log_capped")
    assert db.get(first).events == ["log_capped", "processes_limit"]
    counts = db.event_counts()
    assert counts["log_capped"] == 2 and counts["processes_limit"] == 1
    assert counts["memory_limit"] == 0
    with pytest.raises(ValueError, match="unknown job event 'oops'; expected one of log_capped"):
        db.add_event(first, "oops")


def test_outputs_are_listed_with_sizes_and_older_rows_still_read(db: JobDB) -> None:
    job = submit(db)
    assert db.mark_starting(job) and db.claim(job, 4242)
    many = [{"path": f"out/f{i}.dat", "size": i} for i in range(120)]
    assert db.finish(job, "done", exit_status=0, outputs=many)
    pub = db.public(db.get(job))
    assert pub["outputs"] == many and pub["outputs_count"] == 120
    short = db.public(db.get(job), outputs_limit=50)
    assert short["outputs"] == many[:50] and short["outputs_count"] == 120
    old = submit(db)
    assert db.mark_starting(old) and db.claim(old, 4243)
    db._conn().execute("UPDATE jobs SET outputs=? WHERE id=?", ('["x.oct", "x.hdr"]', old))
    assert db.public(db.get(old))["outputs"] == [
        {"path": "x.oct", "size": None},
        {"path": "x.hdr", "size": None},
    ]


def test_interrupt_queues_again_at_most_max_resumes_times(db: JobDB) -> None:
    job = submit(db)
    for n in range(1, jobdb.MAX_RESUMES + 1):
        assert db.mark_starting(job) and db.claim(job, 4242)
        db.update_progress(job, current_step=1 if n < 3 else 0, pgid_children=4243)
        assert db.interrupt(job, "the worker died", resume=True) == "queued"
        row = db.get(job)
        assert row.state == "queued" and row.resumes == n and row.resume_step == 1
        assert row.pid is None and row.pgid_children is None and row.cancel_request is None
        assert row.reason == "resuming: the worker died" and row.events == ["resumed"] * n
        # Exactly once: a second recorder (the executor after the procwrap) changes nothing.
        assert db.interrupt(job, "again", resume=True) is None
        assert db.get(job).resumes == n
    assert db.mark_starting(job) and db.claim(job, 4242)
    assert db.interrupt(job, "the worker died", resume=True) == "interrupted"
    row = db.get(job)
    assert row.state == "interrupted" and row.resumes == jobdb.MAX_RESUMES
    assert row.reason == "the worker died; not resumed again: it was resumed 3 times already"
    assert db.event_counts()["resumed"] == jobdb.MAX_RESUMES


def test_interrupt_without_resume_or_after_a_cancel_ends_interrupted(db: JobDB) -> None:
    plain, cancelled = submit(db), submit(db)
    for job in (plain, cancelled):
        assert db.mark_starting(job) and db.claim(job, 4242)
    assert db.interrupt(plain, "lost", resume=False) == "interrupted"
    assert db.get(plain).reason == "lost" and db.get(plain).resumes == 0
    db.request_cancel(cancelled, "cancel")
    assert db.interrupt(cancelled, "lost", resume=True) == "interrupted"
    assert db.get(cancelled).resumes == 0 and db.get(cancelled).events == []


def test_a_job_submitted_while_neighbours_are_read_is_still_a_neighbour(
    db: JobDB, tmp_path: Path
) -> None:
    """A procwrap reads its neighbours (jobs not final, and the highest id) before a step:
    a job submitted by another process between those two reads must be one of them.
    The submit is made to land between them with SQLite's trace callback."""
    mine = submit(db)
    other = JobDB(tmp_path / "srvstate" / "jobs.sqlite3")  # another connection, as the worker
    submitted: list[int] = []
    selects: list[str] = []

    def between(statement: str) -> None:
        # Called as each statement starts: at the second read, the submit lands after the
        # first read and before the second.
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)
            if len(selects) == 2:
                submitted.append(submit(other))

    conn = db._conn()
    conn.set_trace_callback(between)
    try:
        ids, top = db.neighbours(mine, "/srv/projects/office")
    finally:
        conn.set_trace_callback(None)
    (new,) = submitted
    assert new in ids or new > top, (new, ids, top)
    files = db.neighbours_files(mine, "/srv/projects/office", ids, top)
    assert files == ["/srv/projects/office/out.hdr"]
