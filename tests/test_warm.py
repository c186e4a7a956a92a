"""Warm procwraps: one process runs jobs in turn, each with its own record and nothing of the last.

Real fork server, real procwraps, real sh and Radiance steps in the real sandbox,
real SQLite; the kernel's own view (/proc) of the reused process is checked.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from test_procwrap import make_project, sim_env, step

from rayserver.common.paths import Layout
from rayserver.common.settings import Settings
from rayserver.jobs import procwrap
from rayserver.jobs.executors.forkclient import ForkServerClient
from rayserver.jobs.executors.forkserver import ForkServer
from rayserver.jobs.executors.local import procwrap_alive
from rayserver.jobs.jobdb import JobDB

# ~120 MB in one line that sort must hold: a peak the tiny job after it must not inherit.
BIG = "head -c 120000000 /dev/zero | sort > big.txt"
TINY = "echo $TMPDIR > tiny.txt; pwd >> tiny.txt; ls -A $TMPDIR >> tiny.txt"


@pytest.fixture
def layout(rayhome) -> Layout:
    return Layout(rayhome.path, rayhome.host)


@pytest.fixture
def db(layout: Layout) -> JobDB:
    return JobDB(layout.db_path)


@pytest.fixture
def fork_server(layout: Layout, db: JobDB):
    handle = ForkServer.start(layout, db.path, Settings(cancel_grace=1.0))
    yield handle
    handle.stop()


def sh_job(db: JobDB, proj: Path, home: Path, text: str) -> int:
    job = db.submit(
        name=None,
        priority=0,
        client="127.0.0.1",
        location="projects",
        project=proj.name,
        workdir=str(proj),
        steps=[{"program": "sh", "path": "/bin/sh", "args": ["-c", text], "sh": text}],
        env=sim_env(home),
    )
    assert db.mark_starting(job)
    return job


def run_in_turn(handle: ForkServer, jobs: list[int]) -> list[tuple[int, int, int]]:
    """Launch each job once the one before has ended; the (job, pid, status) exits."""
    exits: list[tuple[int, int, int]] = []

    async def go() -> None:
        ended: asyncio.Queue[None] = asyncio.Queue()

        def on_exit(job_id: int, pid: int, status: int) -> None:
            exits.append((job_id, pid, status))
            ended.put_nowait(None)

        client = ForkServerClient(handle, on_exit)
        for job in jobs:
            await client.launch(job)
            await asyncio.wait_for(ended.get(), 60)

    asyncio.run(go())
    return exits


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def test_jobs_in_turn_share_a_procwrap_not_their_record(
    fork_server: ForkServer, db: JobDB, layout: Layout, tmp_path: Path
) -> None:
    proj = make_project(tmp_path)
    big = sh_job(db, proj, layout.home, f"touch $TMPDIR/left-by-big; {BIG}")
    tiny = sh_job(db, proj, layout.home, TINY)
    exits = run_in_turn(fork_server, [big, tiny])
    assert [(j, st) for j, _, st in exits] == [(big, 0), (tiny, 0)], exits
    rows = {j: db.get(j) for j in (big, tiny)}
    assert all(r["state"] == "done" for r in rows.values()), rows
    pid = rows[big]["pid"]
    assert rows[tiny]["pid"] == pid, "the second job should have run in the warm procwrap"
    # Its own children only: the tiny job inherits neither the peak nor the cpu.
    assert rows[big]["max_rss_kb"] > 100_000, rows[big]
    assert rows[tiny]["max_rss_kb"] < rows[big]["max_rss_kb"] / 2, rows
    assert rows[tiny]["cpu_time"] < rows[big]["cpu_time"], rows
    # Its own TMPDIR (the last one's is gone), the steps' folder.
    tmpdir, cwd, *listing = (proj / "tiny.txt").read_text().splitlines()
    assert listing == [] and cwd == str(proj), (tmpdir, cwd, listing)
    assert tmpdir != str(db.log_path(big).parent / "tmp") and tmpdir.endswith(f"/{tiny}/tmp")
    assert not (db.log_path(big).parent / "tmp").exists()
    # Alive, idle, and as a spare: unconfined, in /, adopted by nobody.
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert status_field(pid, "Seccomp") == "0" and status_field(pid, "NoNewPrivs") == "0"
    assert status_field(pid, "Threads") == "1"
    assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
    assert not procwrap_alive(pid, tiny) and not procwrap_alive(pid, big)


def test_a_cancelled_job_ends_its_procwrap(
    fork_server: ForkServer, db: JobDB, layout: Layout, tmp_path: Path
) -> None:
    """A job ended by a signal (cancel, shutdown) ends its procwrap: the next gets a fresh one."""
    proj = make_project(tmp_path)
    slow = sh_job(db, proj, layout.home, "sleep 30")
    after = sh_job(db, proj, layout.home, "true")
    exits: list[tuple[int, int, int]] = []

    async def go() -> None:
        ended: asyncio.Queue[None] = asyncio.Queue()

        def on_exit(job_id: int, pid: int, status: int) -> None:
            exits.append((job_id, pid, status))
            ended.put_nowait(None)

        client = ForkServerClient(fork_server, on_exit)
        pid = await client.launch(slow)
        while db.get(slow)["state"] != "running" or not db.get(slow)["pgid_children"]:
            await asyncio.sleep(0.01)
        db.request_cancel(slow, "cancel")
        os.killpg(pid, signal.SIGTERM)
        await asyncio.wait_for(ended.get(), 30)
        await client.launch(after)
        await asyncio.wait_for(ended.get(), 30)

    asyncio.run(go())
    assert db.get(slow)["state"] == "cancelled" and db.get(after)["state"] == "done"
    (_, pid1, st1), (_, pid2, st2) = exits
    assert os.WEXITSTATUS(st1) == procwrap.EXIT_CANCELLED and st2 == 0, exits
    assert pid1 != pid2
    with pytest.raises(FileNotFoundError):
        Path(f"/proc/{pid1}/status").read_text()  # reaped: gone


def test_procwrap_of_a_failed_claim_is_reused(
    fork_server: ForkServer, db: JobDB, layout: Layout, tmp_path: Path
) -> None:
    proj = make_project(tmp_path)
    unclaimed = sh_job(db, proj, layout.home, "true")
    assert db.unstart(unclaimed)  # back to queued: the claim fails, nothing runs
    real = sh_job(db, proj, layout.home, "true")
    exits = run_in_turn(fork_server, [unclaimed, real])
    codes = [(j, os.WEXITSTATUS(st)) for j, _, st in exits]
    assert codes == [(unclaimed, procwrap.EXIT_CLAIM_LOST), (real, 0)], exits
    assert exits[0][1] == exits[1][1]
    assert db.get(unclaimed)["state"] == "queued" and db.get(real)["state"] == "done"


def test_rtrace_jobs_in_turn(
    fork_server: ForkServer, db: JobDB, layout: Layout, tmp_path: Path
) -> None:
    proj = make_project(tmp_path)
    (proj / "pt.txt").write_text("0 0 0 0 0 1\n")
    oct_job = db.submit(
        name=None,
        priority=0,
        client="127.0.0.1",
        location="projects",
        project=proj.name,
        workdir=str(proj),
        steps=[step("oconv", ["scene.rad"], stdout="scene.oct")],
        env=sim_env(layout.home),
    )
    jobs = [oct_job]
    for i in range(5):
        jobs.append(
            db.submit(
                name=None,
                priority=0,
                client="127.0.0.1",
                location="projects",
                project=proj.name,
                workdir=str(proj),
                steps=[step("rtrace", ["-h", "scene.oct"], stdin="pt.txt", stdout=f"p{i}.out")],
                env=sim_env(layout.home),
            )
        )
    for job in jobs:
        assert db.mark_starting(job)
    exits = run_in_turn(fork_server, jobs)
    assert all(st == 0 for _, _, st in exits), exits
    assert len({pid for _, pid, _ in exits}) == 1, exits
    outs = {(proj / f"p{i}.out").read_text() for i in range(5)}
    assert len(outs) == 1 and outs.pop().strip(), "same point, same -ab 0 answer"
