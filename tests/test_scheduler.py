"""Scheduler: real fork server, real procwraps, real Radiance, real SQLite.

Only the worker's live configuration is replaced by a plain object with the
two attributes the scheduler reads (record.cpus, settings.cancel_grace):
the real one belongs to the HTTP layer and needs a running app.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_procwrap import (
    BIN,
    VIEW,
    group_pids,
    make_project,
    render_steps,
    sim_env,
    step,
    submit,
)

from rayserver.common.paths import Layout
from rayserver.common.settings import Settings
from rayserver.common.states import FINAL_STATES
from rayserver.jobs.executors.forkserver import ForkServer
from rayserver.jobs.executors.local import procwrap_alive
from rayserver.jobs.jobdb import JobDB
from rayserver.jobs.scheduler import Scheduler

SLOW = ["-x", "800", "-y", "800", "-ab", "2", "-ad", "2048", "-as", "512"]


def live(cpus: int, grace: float = 1.0, resume: bool = False) -> SimpleNamespace:
    settings = Settings(cancel_grace=grace, resume_interrupted=resume)
    return SimpleNamespace(record=SimpleNamespace(cpus=cpus), settings=settings)


def set_resume(layout: Layout, resume: bool) -> None:
    """The procwraps read resume_interrupted from the home's settings file."""
    conf = layout.home / "config" / "rayserver.toml"
    text = "\n".join(
        line for line in conf.read_text().splitlines() if "resume_interrupted" not in line
    )
    conf.write_text(f"{text}\nresume_interrupted = {'true' if resume else 'false'}\n")


@pytest.fixture
def layout(rayhome) -> Layout:
    return Layout(rayhome.path, rayhome.host)


@pytest.fixture
def db(layout: Layout) -> Iterator[JobDB]:
    db = JobDB(layout.db_path)
    yield db
    # Whatever a failed test left running: its procwraps and their step groups.
    for row in db.in_states(("starting", "running")):
        for pgid in (row["pgid_children"], row["pid"]):
            if pgid and (group_pids(pgid) or procwrap_alive(pgid, row["id"])):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)


class Engine:
    """A fork server, its client and a scheduler, as the worker wires them."""

    def __init__(
        self, layout: Layout, db: JobDB, cpus: int, grace: float = 1.0, resume: bool = False
    ) -> None:
        # Without resume (the default here), as before resume_interrupted: interrupted.
        set_resume(layout, resume)
        self.handle = ForkServer.start(layout, db.path, Settings(cancel_grace=grace))
        self.sched = Scheduler(layout, db, live(cpus, grace, resume), self.handle)
        self.local = self.sched.executors["local"]
        self.client = self.local.fork  # the fork server client the local executor made

    async def __aenter__(self) -> Scheduler:
        await self.sched.start()
        return self.sched

    async def __aexit__(self, *exc: object) -> None:
        await self.sched.shutdown()
        self.client.close()


async def wait_all(sched: Scheduler, db: JobDB, jobs: list[int], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for job in jobs:
        await sched.wait(job, max(0.0, deadline - time.monotonic()))
        assert db.get(job)["state"] in FINAL_STATES, db.get(job)


async def wait_for(pred, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def max_overlap(rows: list[dict]) -> int:
    events = sorted(
        [(r["started_at"], 1) for r in rows] + [(r["ended_at"], -1) for r in rows],
        key=lambda e: (e[0], e[1]),
    )
    best = cur = 0
    for _, delta in events:
        cur += delta
        best = max(best, cur)
    return best


def test_concurrency_limit_and_priority(layout: Layout, db: JobDB, tmp_path: Path) -> None:
    proj = make_project(tmp_path)
    medium = ["-x", "160", "-y", "160", "-ab", "1", "-ad", "256"]
    jobs = [submit(db, proj, render_steps(medium, out=f"o{i}.hdr"), layout.home) for i in range(5)]
    urgent = submit(db, proj, render_steps(medium, out="urgent.hdr"), layout.home, priority=50)

    async def go() -> None:
        async with Engine(layout, db, cpus=2) as sched:
            assert sched.capacity == 2
            # Both slots fill at once; the overlap of the recorded run times below is
            # the real check (a short job may already have ended by a later look).
            await wait_for(lambda: sched.running_count == 2, what="two running")
            await wait_all(sched, db, [*jobs, urgent])

    asyncio.run(go())
    rows = [db.get(j) for j in [*jobs, urgent]]
    assert all(r["state"] == "done" for r in rows), rows
    assert max_overlap(rows) <= 2
    assert max_overlap(rows) == 2, "two cpus but never two jobs at once"
    # The urgent job (submitted last) was among the first two to start.
    started = sorted(rows, key=lambda r: r["started_at"])
    assert urgent in (started[0]["id"], started[1]["id"])


def test_priority_then_fifo(layout: Layout, db: JobDB, tmp_path: Path) -> None:
    proj = make_project(tmp_path)
    low = submit(db, proj, render_steps(out="low.hdr"), layout.home, priority=-5)
    fifo = [submit(db, proj, render_steps(out=f"f{i}.hdr"), layout.home) for i in range(3)]
    high = submit(db, proj, render_steps(out="high.hdr"), layout.home, priority=10)

    async def go() -> None:
        async with Engine(layout, db, cpus=1) as sched:
            await wait_all(sched, db, [low, *fifo, high])

    asyncio.run(go())
    rows = sorted((db.get(j) for j in [low, *fifo, high]), key=lambda r: r["started_at"])
    assert [r["id"] for r in rows] == [high, *fifo, low]
    assert max_overlap(rows) == 1


def test_cancel_queued_and_running(layout: Layout, db: JobDB, tmp_path: Path) -> None:
    proj = make_project(tmp_path)
    running = submit(db, proj, render_steps(SLOW, out="slow.hdr"), layout.home)
    queued = submit(db, proj, render_steps(out="never.hdr"), layout.home)

    async def go() -> None:
        async with Engine(layout, db, cpus=1, grace=1.0) as sched:
            await wait_for(
                lambda: (
                    db.get(running)["current_step"] == 2
                    and bool(group_pids(db.get(running)["pgid_children"] or -1))
                ),
                what="rpict running",
            )
            row = await sched.cancel(queued)
            assert row["state"] == "cancelled"
            pgid = db.get(running)["pgid_children"]
            row = await sched.cancel(running)
            assert row["cancel_request"] == "cancel"
            await sched.wait(running, 10)
            assert db.get(running)["state"] == "cancelled"
            assert group_pids(pgid) == [], "a Radiance process survived the cancel"
            again = await sched.cancel(running)
            assert again["state"] == "cancelled"  # final: unchanged (HTTP answers 409)
            assert await sched.cancel(9999) is None

    asyncio.run(go())
    assert not (proj / "never.hdr").exists()
    assert db.public(db.get(running))["cancel_requested"] is True


@pytest.mark.parametrize("resume", [False, True])
def test_shutdown_interrupts_running_and_keeps_queued(
    layout: Layout, db: JobDB, tmp_path: Path, resume: bool
) -> None:
    proj = make_project(tmp_path)
    running = submit(db, proj, render_steps(SLOW, out="slow.hdr"), layout.home)
    queued = submit(db, proj, render_steps(out="later.hdr"), layout.home)

    async def go() -> None:
        async with Engine(layout, db, cpus=1, resume=resume):
            await wait_for(lambda: db.get(running)["current_step"] == 2, what="rpict")
        # __aexit__ ran shutdown()

    asyncio.run(go())
    row = db.get(running)
    if resume:  # queued again, to continue at its rpict step at the next start
        assert row.state == "queued" and row.resumes == 1 and row.resume_step == 2, row
        assert row.reason == "resuming: the server shut down while the job ran", row
        assert row.events == ["resumed"] and row.cancel_request is None
    else:
        assert row["state"] == "interrupted" and "shut down" in row["reason"], row
    assert db.get(queued)["state"] == "queued"


def test_restart_adopts_live_procwraps_and_marks_dead_ones(
    layout: Layout, db: JobDB, tmp_path: Path
) -> None:
    proj = make_project(tmp_path)
    medium = ["-x", "400", "-y", "400", "-ab", "1", "-ad", "1024"]
    live_job = submit(db, proj, render_steps(medium, out="live.hdr"), layout.home)
    # A row that claims to run, but its procwrap died with the old server.
    dead_job = submit(db, proj, render_steps(out="dead.hdr"), layout.home)
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert db.mark_starting(dead_job) and db.claim(dead_job, gone.pid)
    # A row the old worker had picked but not yet started.
    half = submit(db, proj, render_steps(out="half.hdr"), layout.home)

    async def old_worker() -> int:
        engine = Engine(layout, db, cpus=1)
        await engine.sched.start()
        await wait_for(lambda: db.get(live_job)["state"] == "running", what="live job running")
        assert db.mark_starting(half)  # as if the crash came right after this
        # The worker crashes: no shutdown; the fork server sees EOF and exits.
        for task in engine.sched._tasks:
            task.cancel()
        engine.client.close()
        return db.get(live_job)["pid"]

    pid = asyncio.run(old_worker())
    assert procwrap_alive(pid, live_job), "the procwrap must outlive the worker"
    assert db.get(half)["state"] == "starting"

    async def new_worker() -> None:
        async with Engine(layout, db, cpus=1) as sched:
            assert sched.executors["local"].adopted == {live_job: pid}
            dead = db.get(dead_job)
            assert dead["state"] == "interrupted" and "died with the server" in dead["reason"]
            await wait_all(sched, db, [live_job, half])

    asyncio.run(new_worker())
    assert db.get(live_job)["state"] == "done"
    assert db.get(half)["state"] == "done"
    assert (proj / "half.hdr").stat().st_size > 0


def test_procwrap_killed_without_recording_is_marked(
    layout: Layout, db: JobDB, tmp_path: Path
) -> None:
    proj = make_project(tmp_path)
    job = submit(db, proj, render_steps(SLOW, out="x.hdr"), layout.home)

    async def go() -> None:
        async with Engine(layout, db, cpus=1) as sched:
            await wait_for(lambda: db.get(job)["current_step"] == 2, what="rpict")
            pgid = db.get(job)["pgid_children"]
            os.kill(db.get(job)["pid"], signal.SIGKILL)  # no chance to record anything
            await sched.wait(job, 10)
            row = db.get(job)
            assert row["state"] == "interrupted", row
            assert "killed by signal 9 (SIGKILL)" in row["reason"]
            assert group_pids(pgid) == [], "the step's rpict outlived its procwrap"

    asyncio.run(go())


def read_ambient(path: Path) -> tuple[bytes, bytes, bytes]:
    raw = path.read_bytes()
    end = raw.index(b"\n\n") + 2
    return raw[:end], raw[end : end + 2], raw[end + 2 :]


def lookamb_count(path: Path) -> int:
    out = subprocess.run(
        [str(BIN / "lookamb"), "-h", "-d", str(path)],
        capture_output=True,
        text=True,
        env=sim_env(),
        check=True,
        timeout=30,
    )
    return sum(1 for line in out.stdout.splitlines() if line.strip())


def test_four_jobs_share_one_ambient_file(layout: Layout, db: JobDB, tmp_path: Path) -> None:
    proj = make_project(tmp_path)
    env = sim_env()
    with open(proj / "scene.oct", "wb") as fh:
        subprocess.run(
            [str(BIN / "oconv"), "scene.rad"], cwd=proj, env=env, stdout=fh, check=True, timeout=30
        )
    amb = ["-ab", "1", "-aa", "0.1", "-ad", "512", "-af", "shared.amb", "-x", "96", "-y", "96"]
    jobs = []
    for i, vd in enumerate(["0 1 0", "1 1 0", "-1 1 0", "0 1 -0.5"]):
        view = ["-vp", "0", "-1.5", "0", "-vd", *vd.split()]
        jobs.append(
            submit(
                db,
                proj,
                [step("rpict", [*view, *amb, "scene.oct"], stdout=f"v{i}.hdr")],
                layout.home,
            )
        )

    async def go() -> None:
        async with Engine(layout, db, cpus=4) as sched:
            await wait_all(sched, db, jobs)

    asyncio.run(go())
    rows = [db.get(j) for j in jobs]
    assert all(r["state"] == "done" for r in rows), rows
    assert max_overlap(rows) >= 2, "the jobs never ran at the same time"
    header, magic, data = read_ambient(proj / "shared.amb")
    assert header.startswith(b"#?RADIANCE\n") and b"FORMAT=Radiance_ambval\n" in header
    # Reference magic and record size from a file one rpict wrote alone.
    ref = tmp_path / "ref"
    ref.mkdir()
    subprocess.run(
        [
            str(BIN / "rpict"),
            *VIEW,
            "-ab",
            "1",
            "-af",
            str(ref / "one.amb"),
            "-x",
            "16",
            "-y",
            "16",
            "scene.oct",
        ],
        cwd=proj,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
        timeout=30,
    )
    _, ref_magic, ref_data = read_ambient(ref / "one.amb")
    record = 64 + 3  # 64 + NCOMP bytes (RGB), radiance-facts.md
    assert len(ref_data) % record == 0 and lookamb_count(ref / "one.amb") == len(ref_data) // record
    assert magic == ref_magic
    assert len(data) > 0 and len(data) % record == 0
    assert lookamb_count(proj / "shared.amb") == len(data) // record


def test_claim_lost_to_a_previous_workers_procwrap_is_adopted(
    layout: Layout, db: JobDB, tmp_path: Path
) -> None:
    """The previous worker died between 'starting' and its procwrap's claim; that procwrap
    then claimed the job after the new worker had queued it again. The new worker's own
    procwrap finds nothing to run; the job must still count and be watched to its end."""
    proj = make_project(tmp_path)
    job = submit(db, proj, render_steps(["-x", "16", "-y", "16"]), layout.home)
    # A stand-in for the old procwrap: a live process whose title names the job.
    old = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(60)",
            f"{layout.home}/procwrap.pyo",
            f"job={job}",
        ]
    )
    try:

        async def go() -> None:
            async with Engine(layout, db, cpus=0) as sched:  # cpus 0: nothing dispatches
                assert db.mark_starting(job)
                assert db.claim(job, old.pid)
                lost = 3 << 8  # exit status EXIT_CLAIM_LOST, as waitpid reports it
                sched.executors["local"]._on_fork_exit(job, old.pid + 100000, lost)
                assert sched.running_count == 1, "the job's slot still counts"
                waiter = asyncio.create_task(sched.wait(job, 20))
                await asyncio.sleep(0.3)
                assert not waiter.done(), "the job is still running"
                old.kill()
                old.wait()
                await asyncio.wait_for(waiter, 10)
                assert sched.running_count == 0

        asyncio.run(go())
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()
    row = db.get(job)
    assert row["state"] == "interrupted" and "ended without recording" in row["reason"]


def test_a_job_that_died_with_the_server_is_resumed_by_the_next_worker(
    layout: Layout, db: JobDB, tmp_path: Path
) -> None:
    proj = make_project(tmp_path)
    job = submit(db, proj, render_steps(out="dead.hdr"), layout.home)
    gone = subprocess.Popen(["true"])  # its procwrap: died with the old server
    gone.wait()
    assert db.mark_starting(job) and db.claim(job, gone.pid)
    db.update_progress(job, current_step=2)  # it was rendering (step 2 of 2)
    with open(proj / "dead.oct", "wb") as out:  # what its step 1 (oconv) had made
        subprocess.run([str(BIN / "oconv"), "scene.rad"], cwd=proj, stdout=out, check=True)

    async def new_worker() -> None:
        async with Engine(layout, db, cpus=1, resume=True) as sched:
            row = db.get(job)
            assert row.resumes == 1 and "died with the server" in row.reason, row
            await wait_all(sched, db, [job])

    asyncio.run(new_worker())
    row = db.get(job)
    # Its picture had no header yet: rpict started that step over.
    assert row.state == "done" and row.resumes == 1, row
    assert row.events == ["resumed", "resume_restart"], row
    log = db.log_path(job).read_text()
    assert "step 1 was done; continuing with step 2" in log, log
    assert "dead.hdr holds no complete header yet: it starts over" in log, log
    assert (proj / "dead.hdr").stat().st_size > 0
