"""The Slurm executor: parsers, the command layer against a real cluster, and a real
rayserver with ``executor = "slurm"`` rendering, cancelling, failing, capping and
surviving a restart.

The cluster is the one-node cluster ``.ci/start-slurm`` brings up; where Slurm
cannot run (``sinfo`` fails) the cluster tests skip and say why. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from rayserver.settings import Settings
from rayserver.slurm import (
    SlurmCommands,
    SlurmError,
    base_state,
    batch_script,
    cluster_info,
    final_state,
    job_from_scontrol,
    parse_exit_code,
    parse_scontrol_record,
)


def _slurm_problem() -> str | None:
    if not shutil.which("sinfo"):
        return "Slurm's commands are not installed (run: bash .ci/start-slurm as root)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo did not run: {exc}"
    if out.returncode != 0:
        return f"sinfo fails, no Slurm cluster here: {out.stderr.strip()}"
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in out.stdout.split()):
        return f"no Slurm node takes jobs (sinfo states: {out.stdout.split()})"
    return None


SLURM_PROBLEM = _slurm_problem()
needs_slurm = pytest.mark.skipif(SLURM_PROBLEM is not None, reason=SLURM_PROBLEM or "")


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


def test_batch_script_execs_the_procwrap(tmp_path: Path) -> None:
    db = tmp_path / "my state" / "jobs.sqlite3"
    script = batch_script(db, 42, python="/opt/venv/bin/python", grace=2.5)
    assert script.startswith("#!/bin/sh\n")
    assert (f"exec /opt/venv/bin/python -m rayserver.procwrap --db '{db}' --job 42 "
            "--grace 2.5 --claim-queued") in script


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
        failing = await cmds.sbatch("#!/bin/sh\necho hello from $(pwd)\nexit 3\n",
                                    [f"--chdir={tmp_path}", f"--output={out}", "--job-name=rs-t"])
        sleeper = await cmds.sbatch("#!/bin/sh\nsleep 60\n",
                                    [f"--chdir={tmp_path}", "--output=/dev/null"])
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
    from rayserver.jobdb import JobDB

    db = JobDB(tmp_path / "state" / "jobs.sqlite3")
    job_id = db.submit(name="t", priority=0, client="127.0.0.1", location="projects",
                       project="p", workdir=str(tmp_path),
                       steps=[{"program": "true", "path": "/bin/true", "args": []}],
                       env={}, executor="slurm")
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
    from rayserver.slurm import SlurmExecutor

    db, job_id = _queued_job(tmp_path)
    fake = _fake_procwrap(tmp_path, 'echo "batch ran in $(pwd)"; exit 7')
    changes: list[int] = []
    ex = SlurmExecutor(db, Settings(executor="slurm", slurm_poll_interval=0.2), python=fake,
                       on_change=lambda: changes.append(1))

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
    from rayserver.slurm import SlurmExecutor

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
    from rayserver.slurm import SlurmExecutor

    db, job_id = _queued_job(tmp_path)
    ex = SlurmExecutor(db, Settings(executor="slurm", slurm_partition="no-such-partition"))
    assert run(ex.launch(db.get(job_id))) is False
    row = db.get(job_id)
    assert row["state"] == "failed"
    assert "Slurm refused the job" in row["reason"] and "partition" in row["reason"]


@needs_slurm
def test_executor_adopts_jobs_after_a_restart(tmp_path: Path) -> None:
    """A new worker resets 'starting' rows; adopt() finds them in Slurm again, no resubmit."""
    from rayserver.slurm import SlurmExecutor

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
                "squeue", ["-h", "-t", "all", f"--name=rayserver-{job_id}", "-o", "%i|%k"])
            mine = [ln for ln in out.splitlines() if ln.endswith(f"db {db.path.absolute()}")]
            assert mine == [f"{sid}|rayserver job {job_id} db {db.path.absolute()}"]
        finally:
            await second.commands.scancel(sid)

    run(scenario())
