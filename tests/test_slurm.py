"""The Slurm executor: parsers, the command layer against a real cluster, and a real
rayserver with ``executor = "slurm"`` rendering, cancelling, failing, capping and
surviving a restart.

The cluster is the one-node cluster ``.ci/start-slurm`` brings up; where Slurm
cannot run (``sinfo`` fails) the cluster tests skip and say why. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import problem

from rayserver.common.settings import Settings
from rayserver.jobs.executors.slurm import SlurmExecutor, batch_script
from rayserver.jobs.executors.slurmcli import (
    SlurmCommands,
    SlurmError,
    SlurmJob,
    base_state,
    cluster_info,
    final_state,
    job_from_scontrol,
    parse_exit_code,
    parse_scontrol_record,
)
from rayserver.jobs.jobdb import JobDB

# Needs the cluster: skips with sinfo's reason without one, fails under CI=true (services.py).
needs_slurm = pytest.mark.slurm


def run(coro):  # noqa: ANN001, ANN201 - tiny test helper
    return asyncio.run(coro)


# --- pure parsers ----------------------------------------------------------------

SCONTROL_LINE = (
    "JobId=17 JobName=rayserver-testhost-3 UserId=root(0) GroupId=root(0) MCS_label=N/A "
    "Priority=4294901759 Nice=0 Account=(null) QOS=(null) JobState=CANCELLED Reason=None "
    "Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:15 "
    "RunTime=00:00:02 AllocNode:Sid=localhost:4174 ReqB:S:C:T=0:0:*:* CPUs/Task=1 "
    "NodeList=vm BatchHost=vm WorkDir=/srv/my projects/room StdOut=/tmp/a b.log Power="
)


def test_scontrol_record_keeps_spaces_in_values() -> None:
    rec = parse_scontrol_record(SCONTROL_LINE)
    assert rec["JobId"] == "17"
    assert rec["AllocNode:Sid"] == "localhost:4174"
    assert rec["CPUs/Task"] == "1"
    assert rec["WorkDir"] == "/srv/my projects/room"
    assert rec["StdOut"] == "/tmp/a b.log"
    assert rec["Power"] == ""


def test_job_from_scontrol_carries_exit_code_and_signal() -> None:
    job = job_from_scontrol(SCONTROL_LINE)
    assert (job.job_id, job.state, job.exit_status, job.signal) == ("17", "CANCELLED", 0, 15)
    assert job.final and not job.active
    assert job.reason == "" and job.nodes == "vm"
    with pytest.raises(SlurmError, match="no JobId"):
        job_from_scontrol("Nothing=here")


def test_exit_code_and_states() -> None:
    assert parse_exit_code("3:0") == (3, None)
    assert parse_exit_code("0:9") == (0, 9)
    assert parse_exit_code("garbage") == (None, None)
    assert base_state("CANCELLED by 0") == "CANCELLED"
    assert final_state("COMPLETED") == ("done", "")
    assert final_state("CANCELLED by 0")[0] == "cancelled"
    assert final_state("NODE_FAIL")[0] == "interrupted"
    assert final_state("TIMEOUT")[0] == "failed"
    assert final_state("SOMETHING_NEW")[0] == "failed"
    with pytest.raises(ValueError, match="not final"):
        final_state("PENDING")


@pytest.mark.parametrize("resume", [True, False])
def test_a_job_slurm_lost_is_queued_again_to_resume(tmp_path: Path, resume: bool) -> None:
    """The record the poll writes for a job Slurm no longer knows (real JobDB; no Slurm
    command runs here: the SlurmCommands object is never called on this path)."""
    db = JobDB(tmp_path / "srvstate" / "jobs.sqlite3")
    job = db.submit(
        name=None, priority=0, client="c", location="l", project="p", workdir=str(tmp_path),
        steps=[{"program": "rpict", "path": "/bin/true", "args": []}], env={},
        executor="slurm",
    )  # fmt: skip
    assert db.mark_starting(job) and db.claim(job, 4242, from_states=("starting",))
    db.set_external_id(job, "77")
    ex = SlurmExecutor(db, Settings(resume_interrupted=resume), commands=SlurmCommands(""))
    assert ex._record_from_slurm(db.get(job), None)
    row = db.get(job)
    assert "Slurm no longer knows job 77" in row.reason
    if resume:
        assert row.state == "queued" and row.resumes == 1 and row.events == ["resumed"], row
    else:
        assert row.state == "interrupted" and row.resumes == 0, row
    # Node failures are interruptions too.
    if resume:
        assert db.mark_starting(job) and db.claim(job, 4243)
        assert ex._record_from_slurm(db.get(job), SlurmJob("77", "NODE_FAIL"))
        assert db.get(job).state == "queued" and db.get(job).resumes == 2


def test_batch_script_execs_the_procwrap(tmp_path: Path) -> None:
    db = tmp_path / "my state" / "jobs.sqlite3"
    script = batch_script(db, 42, python="/opt/venv/bin/python", grace=2.5)
    assert script.startswith("#!/bin/sh\n")
    assert (
        f"exec /opt/venv/bin/python -m rayserver.procwrap --db '{db}' --job 42 "
        "--grace 2.5 --claim-queued"
    ) in script


def test_missing_commands_are_named(tmp_path: Path) -> None:
    cmds = SlurmCommands(str(tmp_path))
    with pytest.raises(SlurmError, match=r"sbatch not found in slurm_bin"):
        cmds.path("sbatch")
    info = run(cluster_info(Settings(slurm_bin=str(tmp_path))))
    assert info["available"] is False and "sinfo not found" in info["error"]


# --- the command layer against the real cluster ------------------------------------


@needs_slurm
def test_sbatch_squeue_scontrol_scancel(tmp_path: Path) -> None:
    cmds = SlurmCommands()

    async def scenario() -> None:
        out = tmp_path / "out.log"
        failing = await cmds.sbatch(
            "#!/bin/sh\necho hello from $(pwd)\nexit 3\n",
            [f"--chdir={tmp_path}", f"--output={out}", "--job-name=rs-t"],
        )
        sleeper = await cmds.sbatch(
            "#!/bin/sh\nsleep 60\n", [f"--chdir={tmp_path}", "--output=/dev/null"]
        )
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                jobs = await cmds.squeue([failing, sleeper, "999999"])
                if jobs.get(failing) and jobs[failing].final and jobs[sleeper].state == "RUNNING":
                    break
                await asyncio.sleep(0.2)
            assert "999999" not in jobs
            assert jobs[failing].state == "FAILED"
            shown = await cmds.show_job(failing)
            assert shown is not None and (shown.exit_status, shown.signal) == (3, None)
            assert out.read_text() == f"hello from {tmp_path}\n"
            await cmds.scancel(sleeper)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                shown = await cmds.show_job(sleeper)
                if shown and shown.final:
                    break
                await asyncio.sleep(0.2)
            assert shown is not None and shown.state == "CANCELLED" and shown.signal == 15
            assert await cmds.squeue(["999998"]) == {}
            assert await cmds.show_job("999998") is None
            await cmds.scancel("999998")  # gone already: not an error
        finally:
            await cmds.scancel(sleeper)

    run(scenario())


@needs_slurm
def test_sbatch_refusal_is_an_error_with_slurms_message() -> None:
    with pytest.raises(SlurmError, match=r"sbatch .*failed.*(partition|Partition)"):
        run(SlurmCommands().sbatch("#!/bin/sh\ntrue\n", ["--partition=no-such-partition"]))


@needs_slurm
def test_cluster_info_counts_nodes_and_free_cpus() -> None:
    info = run(cluster_info(Settings()))
    assert info["available"] is True, info
    assert info["nodes"] and info["cpus"] >= 1
    assert 0 <= info["free_cpus"] <= info["cpus"]
    node = info["nodes"][0]
    assert set(node) >= {"name", "state", "cpus", "free_cpus", "partitions"}
    bad = run(cluster_info(Settings(slurm_partition="no-such-partition")))
    assert bad["available"] is False and "no-such-partition" in bad["error"]


# --- the executor with a real job database and the real cluster ---------------------
# The batch script normally execs the procwrap. Here a tiny shell script stands in
# for a procwrap that dies without recording anything (what scancel before start, a
# SIGKILL or a node failure leave behind): the executor must record Slurm's verdict.


def _fake_procwrap(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-procwrap"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def _queued_job(tmp_path: Path):  # noqa: ANN202
    from rayserver.jobs.jobdb import JobDB

    db = JobDB(tmp_path / "state" / "jobs.sqlite3")
    job_id = db.submit(
        name="t",
        priority=0,
        client="127.0.0.1",
        location="projects",
        project="p",
        workdir=str(tmp_path),
        steps=[{"program": "true", "path": "/bin/true", "args": []}],
        env={},
        executor="slurm",
    )
    assert db.mark_starting(job_id)
    return db, job_id


async def _poll_until_final(executor, db, job_id: int, timeout: float = 20.0) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await executor.poll_once()
        row = db.get(job_id)
        if row["state"] not in ("queued", "starting", "running"):
            return row
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} not final after {timeout} s: {db.get(job_id)}")


@needs_slurm
def test_executor_records_exit_status_from_slurm(tmp_path: Path) -> None:
    from rayserver.jobs.executors.slurm import SlurmExecutor

    db, job_id = _queued_job(tmp_path)
    fake = _fake_procwrap(tmp_path, 'echo "batch ran in $(pwd)"; exit 7')
    changes: list[int] = []
    ex = SlurmExecutor(
        db,
        Settings(executor="slurm", slurm_poll_interval=0.2),
        python=fake,
        on_change=lambda: changes.append(1),
    )

    async def scenario() -> dict:
        assert await ex.launch(db.get(job_id))
        return await _poll_until_final(ex, db, job_id)

    row = run(scenario())
    assert row["external_id"] and row["external_id"].isdigit()
    assert (row["state"], row["exit_status"], row["signal"]) == ("failed", 7, None)
    assert f"Slurm job {row['external_id']}" in row["reason"]
    assert changes, "the scheduler was never told a slot became free"
    # --chdir is the project directory and Slurm's output goes to the job's log.
    assert f"batch ran in {tmp_path}" in db.log_path(job_id).read_text()


@needs_slurm
def test_executor_cancel_records_cancelled_with_signal(tmp_path: Path) -> None:
    from rayserver.jobs.executors.slurm import SlurmExecutor

    db, job_id = _queued_job(tmp_path)
    fake = _fake_procwrap(tmp_path, "exec sleep 60")
    ex = SlurmExecutor(db, Settings(executor="slurm", slurm_poll_interval=0.2), python=fake)

    async def scenario() -> dict:
        assert await ex.launch(db.get(job_id))
        sid = db.get(job_id)["external_id"]
        deadline = time.monotonic() + 20
        while (await ex.commands.squeue([sid]))[sid].state != "RUNNING":
            assert time.monotonic() < deadline, "Slurm never started the job"
            await asyncio.sleep(0.1)
        assert db.request_cancel(job_id, "cancel")
        await ex.cancel(db.get(job_id))
        return await _poll_until_final(ex, db, job_id)

    row = run(scenario())
    assert (row["state"], row["signal"]) == ("cancelled", 15), row


@needs_slurm
def test_executor_refused_submission_fails_the_job_with_slurms_words(tmp_path: Path) -> None:
    from rayserver.jobs.executors.slurm import SlurmExecutor

    db, job_id = _queued_job(tmp_path)
    ex = SlurmExecutor(db, Settings(executor="slurm", slurm_partition="no-such-partition"))
    assert run(ex.launch(db.get(job_id))) is False
    row = db.get(job_id)
    assert row["state"] == "failed"
    assert "Slurm refused the job" in row["reason"] and "partition" in row["reason"]


@needs_slurm
def test_executor_adopts_jobs_after_a_restart(tmp_path: Path) -> None:
    """A new worker resets 'starting' rows; adopt() finds them in Slurm again, no resubmit."""
    from rayserver.jobs.executors.slurm import SlurmExecutor

    db, job_id = _queued_job(tmp_path)
    fake = _fake_procwrap(tmp_path, "exec sleep 60")
    settings = Settings(executor="slurm", slurm_poll_interval=0.2)
    first = SlurmExecutor(db, settings, python=fake)
    second = SlurmExecutor(db, settings, python=fake)

    async def scenario() -> None:
        assert await first.launch(db.get(job_id))
        sid = db.get(job_id)["external_id"]
        try:
            db.reset_starting()
            assert db.get(job_id)["state"] == "queued"
            await second.adopt()
            row = db.get(job_id)
            assert (row["state"], row["external_id"]) == ("starting", sid)
            # Launching it again must not submit a second Slurm job.
            assert await second.launch(row)
            assert db.get(job_id)["external_id"] == sid
            _, out, _ = await second.commands.run(
                "squeue", ["-h", "-t", "all", f"--name=rayserver-{job_id}", "-o", "%i|%k"]
            )
            mine = [ln for ln in out.splitlines() if ln.endswith(f"db {db.path.absolute()}")]
            assert mine == [f"{sid}|rayserver job {job_id} db {db.path.absolute()}"]
        finally:
            await second.commands.scancel(sid)

    run(scenario())


# --- a real rayserver with executor = "slurm" ------------------------------------

SCENE = """\
void plastic red 0 0 5 .7 .1 .1 0 0
red sphere ball 0 0 4 0 0 0 1
void light bright 0 0 3 100 100 100
bright sphere lamp 0 0 4 3 -3 3 0.5
void plastic grey 0 0 5 .5 .5 .5 0 0
grey polygon floor 0 0 12 -5 -5 -1  5 -5 -1  5 5 -1  -5 5 -1
"""
VIEW = ["-vp", "0", "-6", "1", "-vd", "0", "1", "-0.1"]


def _slow(size: int) -> list[str]:
    # No ambient cache (-aa 0): every pixel pays full ambient sampling. 200x200 took
    # ~1.5 s on one core here; time grows with the pixel count.
    return [*VIEW, "-x", str(size), "-y", str(size), "-ab", "2", "-ad", "256", "-aa", "0"]


def _slurm_home(rayhome, cpus: int = 2) -> Path:  # noqa: ANN001
    """Switch the test home to the Slurm executor; returns the project folder."""
    settings = rayhome.path / "config" / "rayserver.toml"
    settings.write_text(
        settings.read_text() + 'executor = "slurm"\nslurm_poll_interval = 0.3\ncancel_grace = 2\n'
    )
    hosts = rayhome.path / "config" / "hosts"
    hosts.write_text(hosts.read_text().replace("testhost 2 ", f"testhost {cpus} "))
    room = rayhome.projects / "room"
    room.mkdir()
    (room / "scene.rad").write_text(SCENE)
    return room


def _render_job(rpict_args: list[str], out: str = "out.hdr") -> dict:
    # The octree is named after the picture: jobs running side by side in one
    # project must not rewrite each other's octree while the other renders it.
    octree = out.rsplit(".", 1)[0] + ".oct"
    return {
        "location": "projects",
        "project": "room",
        "steps": [
            {"program": "oconv", "args": ["scene.rad"], "stdin": None, "stdout": octree},
            {"program": "rpict", "args": [*rpict_args, octree], "stdin": None, "stdout": out},
        ],
    }


def _submit(srv, body: dict) -> int:  # noqa: ANN001
    status, job = srv.request("POST", "/v1/jobs", body)
    assert status == 201, job
    return job["id"]


def _wait_final(srv, job_id: int, timeout: float = 60) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, job = srv.request("GET", f"/v1/jobs/{job_id}?wait=5")
        assert status == 200, job
        if job["state"] in ("done", "failed", "cancelled", "interrupted"):
            return job
    raise AssertionError(f"job {job_id} not final after {timeout} s: {job}")


def _wait_running(srv, job_id: int, timeout: float = 30) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, job = srv.request("GET", f"/v1/jobs/{job_id}")
        if job["state"] == "running":
            return job
        assert job["state"] in ("queued", "running"), job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never ran: {job}")


def _our_slurm_jobs(home_path: Path) -> list[tuple[str, str]]:
    """(Slurm id, state) of every job Slurm knows from this test's job database."""
    marker = f" db {home_path / 'srvstate' / 'jobs.sqlite3'}"
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-o", "%i|%T|%k"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return [
        (i, st) for i, st, k in (ln.split("|", 2) for ln in out.splitlines()) if k.endswith(marker)
    ]


@pytest.fixture
def slurm_cleanup(rayhome) -> Iterator[None]:  # noqa: ANN001
    """scancel whatever this test left with Slurm (pending jobs have no process to kill)."""
    yield
    if problem("slurm") is None:
        for sid, state in _our_slurm_jobs(rayhome.path):
            if state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
                subprocess.run(["scancel", sid], timeout=10, check=False)


def _rpict_pids_in(folder: Path) -> list[int]:
    """Live rpict processes working in ``folder`` (found through /proc, ended by nobody)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "rpict":
                continue
            if Path(os.readlink(entry / "cwd")) != folder:
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


def _direct_render(room: Path, rpict_args: list[str], out: str, octree: str = "out.oct") -> None:
    from rayserver.common.radiance import bin_dir, simulation_env

    settings = Settings()
    env = simulation_env(settings)
    rpict = bin_dir(settings) / "rpict"
    with open(room / out, "wb") as fh:
        subprocess.run(
            [str(rpict), *rpict_args, octree], cwd=room, env=env, stdout=fh, check=True, timeout=60
        )


def _pvalue(path: Path) -> bytes:
    from rayserver.common.radiance import bin_dir, simulation_env

    settings = Settings()
    return subprocess.run(
        [str(bin_dir(settings) / "pvalue"), "-h", "-H", "-d", str(path)],
        capture_output=True,
        check=True,
        timeout=30,
        env=simulation_env(settings),
    ).stdout


@needs_slurm
def test_render_through_slurm_matches_direct_render(rayhome, server_factory, slurm_cleanup) -> None:  # noqa: ANN001
    room = _slurm_home(rayhome)
    srv = server_factory("-f")
    status, info = srv.request("GET", "/v1/info")
    assert status == 200 and info["executor"] == "slurm", info
    assert info["slurm"]["available"] is True and info["slurm"]["nodes"], info
    assert 0 <= info["slurm"]["free_cpus"] <= info["slurm"]["cpus"], info
    args = [*VIEW, "-x", "64", "-y", "64", "-ab", "1", "-ad", "64"]
    job = _wait_final(srv, _submit(srv, _render_job(args)))
    assert job["state"] == "done", job
    assert job["exit_status"] == 0 and job["progress"] == 100
    # The procwrap records done just before its batch script exits: Slurm says
    # COMPLETED a moment later (on a busy machine, some seconds).
    deadline = time.monotonic() + 60
    while (ours := _our_slurm_jobs(rayhome.path)) and ours[0][1] != "COMPLETED":
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(ours) == 1 and ours[0][1] == "COMPLETED", ours
    _direct_render(room, args, "direct.hdr")
    pixels = _pvalue(room / "out.hdr")
    assert len(pixels.splitlines()) == 64 * 64
    assert pixels == _pvalue(room / "direct.hdr")
    status, text = srv.request("GET", f"/v1/jobs/{job['id']}/log")
    assert status == 200 and "rpict" in text


@needs_slurm
def test_cancel_mid_render_leaves_no_rpict(rayhome, server_factory, slurm_cleanup) -> None:  # noqa: ANN001
    room = _slurm_home(rayhome)
    srv = server_factory("-f")
    job_id = _submit(srv, _render_job(_slow(1200)))
    _wait_running(srv, job_id)
    deadline = time.monotonic() + 20
    while not _rpict_pids_in(room):
        assert time.monotonic() < deadline, "rpict never started under Slurm"
        time.sleep(0.05)
    status, _ = srv.request("DELETE", f"/v1/jobs/{job_id}")
    assert status == 200
    job = _wait_final(srv, job_id, timeout=30)
    assert job["state"] == "cancelled", job
    deadline = time.monotonic() + 10
    while _rpict_pids_in(room) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _rpict_pids_in(room) == [], "an rpict survived the cancel"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        states = [st for _, st in _our_slurm_jobs(rayhome.path)]
        if states and all(st == "CANCELLED" for st in states):
            break
        time.sleep(0.2)
    assert states == ["CANCELLED"], states


@needs_slurm
def test_failing_radiance_command_reports_its_exit_status(
    rayhome, server_factory, slurm_cleanup
) -> None:  # noqa: ANN001
    _slurm_home(rayhome)
    srv = server_factory("-f")
    body = {
        "location": "projects",
        "project": "room",
        "steps": [
            {
                "program": "oconv",
                "args": ["no-such-scene.rad"],
                "stdin": None,
                "stdout": "broken.oct",
            }
        ],
    }
    job = _wait_final(srv, _submit(srv, body))
    assert job["state"] == "failed", job
    # oconv: "system - cannot open scene file" exits 2 (Radiance's convention).
    assert job["exit_status"] == 2, job
    status, text = srv.request("GET", f"/v1/jobs/{job['id']}/log")
    assert "no-such-scene.rad" in text


@needs_slurm
def test_three_jobs_with_a_cap_of_two(rayhome, server_factory, slurm_cleanup) -> None:  # noqa: ANN001
    """The host record's 2 cpus cap what is with Slurm at once; the third waits here.

    The Slurm node could hold more (a PENDING job in squeue would show it), so the
    check samples squeue: never more than two of our jobs with Slurm at a time.
    """
    _slurm_home(rayhome, cpus=2)
    srv = server_factory("-f")
    ids = [_submit(srv, _render_job(_slow(160), out=f"out{i}.hdr")) for i in range(3)]
    from rayserver.jobs.jobdb import JobDB

    db = JobDB(rayhome.path / "srvstate" / "jobs.sqlite3", check=False)
    most, samples = 0, 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        # A job rayserver has recorded as ended no longer holds a slot, though its
        # batch script may still be exiting in Slurm (RUNNING/COMPLETING for a moment,
        # seconds on a busy machine): counted are the ones still ours to run.
        # (Slurm first, our records second: a job that ends in between is not counted.)
        with_slurm = _our_slurm_jobs(rayhome.path)
        ended = {
            str(row["external_id"])
            for row in (db.get(i) for i in ids)
            if row and row["state"] in ("done", "failed", "cancelled", "interrupted")
        }
        active = [
            st
            for sid, st in with_slurm
            if st in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING") and sid not in ended
        ]
        most, samples = max(most, len(active)), samples + 1
        _, listing = srv.request("GET", "/v1/jobs?limit=10")
        if all(j["state"] not in ("queued", "running") for j in listing["jobs"]):
            break
        time.sleep(0.05)
    jobs = [_wait_final(srv, i) for i in ids]
    assert [j["state"] for j in jobs] == ["done"] * 3, jobs
    assert most == 2, f"at most {most} of our jobs with Slurm at once ({samples} samples)"
    assert len(_our_slurm_jobs(rayhome.path)) == 3
    # The third started only after one of the first two ended.
    first_end = min(j["ended_at"] for j in jobs[:2])
    assert jobs[2]["started_at"] >= first_end - 0.05, jobs


@needs_slurm
def test_server_restart_finds_the_slurm_job_again(rayhome, server_factory, slurm_cleanup) -> None:  # noqa: ANN001
    from rayserver.jobs.jobdb import JobDB

    room = _slurm_home(rayhome)
    srv = server_factory("-f")
    job_id = _submit(srv, _render_job(_slow(480)))
    _wait_running(srv, job_id)
    db = JobDB(rayhome.path / "srvstate" / "jobs.sqlite3", check=False)
    sid = db.get(job_id)["external_id"]
    assert sid, "no Slurm id recorded"
    os.killpg(srv.proc.pid, signal.SIGTERM)
    srv.proc.wait(20)
    # The Slurm job went on without its server.
    assert _rpict_pids_in(room), "the render did not survive the server's stop"
    assert dict(_our_slurm_jobs(rayhome.path))[sid] == "RUNNING"
    again = server_factory("-f")
    job = _wait_final(again, job_id, timeout=90)
    assert job["state"] == "done", job
    assert db.get(job_id)["external_id"] == sid
    assert [i for i, _ in _our_slurm_jobs(rayhome.path)] == [sid], "the job was submitted twice"
    assert len(_pvalue(room / "out.hdr").splitlines()) == 480 * 480


@needs_slurm
def test_executor_dispatch_respects_the_cap(tmp_path: Path) -> None:
    from rayserver.jobs.executors.slurm import SlurmExecutor

    db, first = _queued_job(tmp_path)
    db.unstart(first)
    more = [
        db.submit(
            name="t",
            priority=0,
            client="c",
            location="projects",
            project="p",
            workdir=str(tmp_path),
            steps=[{"program": "true", "path": "/bin/true", "args": []}],
            env={},
            executor="slurm",
        )
        for _ in range(2)
    ]
    fake = _fake_procwrap(tmp_path, "sleep 1")
    ex = SlurmExecutor(db, Settings(executor="slurm", slurm_poll_interval=0.2), python=fake)

    async def scenario() -> None:
        assert await ex.dispatch(2) == 2
        assert ex.active_count() == 2 and await ex.dispatch(2) == 0
        assert db.get(more[1])["state"] == "queued" and not db.get(more[1])["external_id"]
        await _poll_until_final(ex, db, first)
        assert await ex.dispatch(2) == 1
        assert db.get(more[1])["external_id"]
        for job_id in more:
            await _poll_until_final(ex, db, job_id)

    run(scenario())
    # The stand-in exits 0 without recording: never "done" on Slurm's word alone.
    row = db.get(first)
    assert row["state"] == "failed" and "procwrap did not claim it" in row["reason"], row


@needs_slurm
def test_adopt_finds_a_submission_whose_id_was_never_stored(tmp_path: Path) -> None:
    """A worker that died between sbatch and storing the id: found by the job's comment."""
    import sqlite3

    from rayserver.jobs.executors.slurm import SlurmExecutor

    db, job_id = _queued_job(tmp_path)
    fake = _fake_procwrap(tmp_path, "exec sleep 60")
    settings = Settings(executor="slurm", slurm_poll_interval=0.2)

    async def scenario() -> None:
        first = SlurmExecutor(db, settings, python=fake)
        assert await first.launch(db.get(job_id))
        sid = db.get(job_id)["external_id"]
        try:
            # What the dead worker left: the row 'starting', no Slurm id.
            with sqlite3.connect(db.path) as conn:
                conn.execute("UPDATE jobs SET external_id=NULL WHERE id=?", (job_id,))
            db.reset_starting()
            await SlurmExecutor(db, settings, python=fake).adopt()
            row = db.get(job_id)
            assert (row["state"], row["external_id"]) == ("starting", sid)
        finally:
            await first.commands.scancel(sid)

    run(scenario())
