"""The worker's memory of its jobs (rayserver.jobs.jobview) over a real SQLite job database.

Versions move only when a job's object changes; a touched job is read again
before it is answered; rows changed behind the view's back are caught once
the copy is older than its time to live; waiters wake at a touch and at
their timeout; the oldest final jobs are dropped and a ``since`` older than
them is refused (the client reloads).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from rayserver.jobs import jobview
from rayserver.jobs.jobdb import JobDB
from rayserver.jobs.jobview import JobView


@pytest.fixture
def db(tmp_path: Path) -> JobDB:
    folder = tmp_path / "srvstate"
    folder.mkdir()
    return JobDB(folder / "jobs.sqlite3")


def submit(db: JobDB, name: str = "j") -> int:
    step = {"program": "rtrace", "path": "/bin/true", "args": []}
    return db.submit(
        name=name, priority=0, client="c", location="l", project="p", workdir="/tmp",
        steps=[step], env={},
    )  # fmt: skip


def test_versions_follow_the_database(db: JobDB) -> None:
    view = JobView(db)
    job = submit(db)
    first = view.get(job)
    assert first is not None and first.job["state"] == "queued"
    assert view.get(job) is first  # from memory
    view.touch(job)  # nothing changed: read again, same version
    assert view.get(job).version == first.version  # type: ignore[union-attr]
    assert db.cancel_queued(job)
    assert view.get(job).version == first.version  # type: ignore[union-attr]  # not told yet
    view.touch(job)
    after = view.get(job)
    assert after is not None and after.version > first.version
    assert after.job == {**db.public(db.get(job)), "version": after.version}  # type: ignore[arg-type]
    assert view.get(10**6) is None


def test_a_change_nobody_told_is_caught_after_its_time_to_live(db: JobDB) -> None:
    now = [100.0]
    view = JobView(db, clock=lambda: now[0])
    job = submit(db)
    before = view.get(job)
    assert before is not None and db.mark_starting(job) and db.claim(job, 4242)
    now[0] += jobview.UNFED_TTL / 2
    assert view.get(job) is before  # fresh enough
    now[0] += jobview.UNFED_TTL
    seen = view.get(job)
    assert seen is not None and seen.job["state"] == "running" and seen.version > before.version
    view.feed(job)  # its procwrap reports: the copy lives longer
    db.update_progress(job, progress=50.0)
    now[0] += jobview.UNFED_TTL * 2
    assert view.get(job) is seen
    now[0] += jobview.FED_TTL
    assert view.get(job).job["progress"] == 50.0  # type: ignore[union-attr]


def test_wait_wakes_at_a_touch_and_at_its_timeout(db: JobDB) -> None:
    async def scenario() -> tuple[float, float, int, str]:
        view = JobView(db)
        job = submit(db)
        version = view.get(job).version  # type: ignore[union-attr]
        t0 = time.monotonic()
        same = await view.wait(job, version, 0.3)
        quiet = time.monotonic() - t0

        async def cancel_soon() -> None:
            await asyncio.sleep(0.1)
            db.cancel_queued(job)
            view.touch(job)

        task = asyncio.create_task(cancel_soon())
        t0 = time.monotonic()
        changed = await view.wait(job, version, 30)
        await task
        assert same is not None and changed is not None
        return quiet, time.monotonic() - t0, same.version, changed.job["state"]

    quiet, woke, same_version, state = asyncio.run(scenario())
    assert 0.25 <= quiet < 5 and woke < 5 and state == "cancelled"


def test_old_final_jobs_are_dropped_and_since_then_refused(
    db: JobDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobview, "KEEP_FINAL", 3)
    view = JobView(db)
    ids = [submit(db, f"j{i}") for i in range(6)]
    start = view.version
    for job in ids:
        view.get(job)
    assert view.sweep_interval() == jobview.UNFED_TTL  # queued jobs nobody reports on
    changed = view.changed_since(start)
    assert changed is not None and [e.row.id for e in changed] == ids
    for job in ids[:5]:
        db.cancel_queued(job)
        view.touch(job)
        view.get(job)
    assert len([e for e in view.changed_since(view.forgotten) or [] if e.final]) == 3
    assert view.changed_since(start) is None  # older than a dropped job: reload
    assert view.changed_since(view.version + 1) is None  # not one of ours
    assert view.get(ids[0]).job["state"] == "cancelled"  # type: ignore[union-attr]  # read again
