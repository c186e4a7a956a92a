"""procwrap: real Radiance jobs run by a real procwrap process against a real SQLite queue.

Helpers here (tiny scene, job submission, process-group checks) are reused by
the fork server and scheduler tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayserver.common.paths import Layout
from rayserver.common.radiance import bin_dir, simulation_env
from rayserver.common.settings import Settings
from rayserver.jobs import procwrap
from rayserver.jobs.jobdb import JobDB

SETTINGS = Settings()
BIN = bin_dir(SETTINGS)

SCENE = """\
void light bright
0
0
3 100 100 100

bright sphere lamp
0
0
4 0 0 1.5 0.3

void plastic grey
0
0
5 .5 .5 .5 0 0

grey polygon floor
0
0
12 -2 -2 -1  2 -2 -1  2 2 -1  -2 2 -1

grey polygon wall
0
0
12 -2 2 -1  2 2 -1  2 2 3  -2 2 3
"""
VIEW = ["-vp", "0", "-1.5", "0", "-vd", "0", "1", "-0.3", "-vh", "60", "-vv", "60"]
TINY = ["-x", "32", "-y", "32"]


def make_project(root: Path, name: str = "proj") -> Path:
    """A project folder with a tiny scene (two grey polygons and a light)."""
    proj = root / name
    proj.mkdir(parents=True, exist_ok=True)
    (proj / "scene.rad").write_text(SCENE)
    return proj


def sim_env(home: Path | None = None) -> dict[str, str]:
    env = simulation_env(SETTINGS)
    if home is not None:
        env["RAYFRONT_HOME"] = str(home)
    return env


def step(
    program: str, args: list[str], stdin: str | None = None, stdout: str | None = None
) -> dict:
    return {
        "program": program,
        "path": str(BIN / program),
        "args": args,
        "stdin": stdin,
        "stdout": stdout,
    }


def render_steps(extra: list[str] | None = None, out: str = "out.hdr") -> list[dict]:
    """oconv + rpict; the octree is named after the picture so jobs can run side by side."""
    octree = out.rsplit(".", 1)[0] + ".oct"
    return [
        step("oconv", ["scene.rad"], stdout=octree),
        step("rpict", [*VIEW, *TINY, *(extra or []), octree], stdout=out),
    ]


def submit(
    db: JobDB,
    proj: Path,
    steps: list[dict],
    home: Path | None = None,
    priority: int = 0,
    name: str | None = None,
) -> int:
    return db.submit(
        name=name,
        priority=priority,
        client="127.0.0.1",
        location="projects",
        project=proj.name,
        workdir=str(proj),
        steps=steps,
        env=sim_env(home),
    )


def run_procwrap(
    db_path: Path, job_id: int, home: Path, *extra: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, RAYFRONT_HOME=str(home))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "rayserver.procwrap",
            "--db",
            str(db_path),
            "--job",
            str(job_id),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def pvalue(path: Path) -> str:
    out = subprocess.run(
        [str(BIN / "pvalue"), "-h", "-H", "-d", str(path)],
        capture_output=True,
        text=True,
        env=sim_env(),
        check=True,
        timeout=30,
    )
    return out.stdout


def direct_render(proj: Path, out: str, extra: list[str] | None = None) -> Path:
    env = sim_env()
    with open(proj / "direct.oct", "wb") as fh:
        subprocess.run(
            [str(BIN / "oconv"), "scene.rad"], cwd=proj, env=env, stdout=fh, check=True, timeout=30
        )
    with open(proj / out, "wb") as fh:
        subprocess.run(
            [str(BIN / "rpict"), *VIEW, *TINY, *(extra or []), "direct.oct"],
            cwd=proj,
            env=env,
            stdout=fh,
            stderr=subprocess.DEVNULL,
            check=True,
            timeout=60,
        )
    return proj / out


def group_pids(pgid: int) -> list[int]:
    return [pid for pid, _ in procwrap.group_members(pgid)]


def wait_state(db: JobDB, job_id: int, states: tuple[str, ...], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = db.get(job_id)
        if row and row["state"] in states:
            return row
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {states}: {db.get(job_id)}")


@pytest.fixture
def home(rayhome) -> Path:
    return rayhome.path


@pytest.fixture
def db(home: Path) -> JobDB:
    return JobDB(Layout(home, "testhost").db_path)


def test_render_equals_direct_render(db: JobDB, home: Path, tmp_path: Path) -> None:
    proj = make_project(tmp_path)
    job = submit(db, proj, render_steps(), home)
    assert db.mark_starting(job)
    res = run_procwrap(db.path, job, home)
    row = db.get(job)
    log = db.log_path(job).read_text()
    assert res.returncode == procwrap.EXIT_DONE, (res.stderr, log)
    assert row["state"] == "done", row
    assert row["progress"] == 100.0
    assert row["exit_status"] == 0 and row["signal"] is None
    assert row["wall_time"] > 0 and row["cpu_time"] >= 0 and row["max_rss_kb"] > 0
    assert row["started_at"] <= row["ended_at"]
    assert "== step 1/2: oconv scene.rad > out.oct ==" in log
    assert "== step 2/2: rpict -vp" in log
    assert "== done: exit status 0, wall" in log and "max rss" in log
    assert pvalue(proj / "out.hdr") == pvalue(direct_render(proj, "direct.hdr"))
    assert db.public(row)["outputs"] == [
        {"path": "out.oct", "size": (proj / "out.oct").stat().st_size},
        {"path": "out.hdr", "size": (proj / "out.hdr").stat().st_size},
    ]


def test_failing_command_records_its_exit_status(db: JobDB, home: Path, tmp_path: Path) -> None:
    proj = make_project(tmp_path)
    # rpict on a missing octree: "rpict: system - cannot open", exit 2 (radiance-facts.md).
    job = submit(
        db,
        proj,
        [
            step("rpict", [*TINY, "missing.oct"], stdout="x.hdr"),
            step("oconv", ["scene.rad"], stdout="never.oct"),
        ],
        home,
    )
    assert db.mark_starting(job)
    res = run_procwrap(db.path, job, home)
    row = db.get(job)
    assert res.returncode == procwrap.EXIT_FAILED
    assert row["state"] == "failed"
    assert row["exit_status"] == 2 and row["signal"] is None
    assert "step 1/2 (rpict) exit status 2" in row["reason"]
    assert not (proj / "never.oct").exists(), "a step after a failed one must not run"
    assert "missing.oct" in db.log_path(job).read_text()


def test_symlinked_stdout_pointing_outside_is_refused(
    db: JobDB, home: Path, tmp_path: Path
) -> None:
    proj = make_project(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.oct"
    victim.write_text("keep me")
    (proj / "link.oct").symlink_to(victim)
    (proj / "sub").symlink_to(outside, target_is_directory=True)
    for target in ("link.oct", "sub/new.oct"):
        job = submit(db, proj, [step("oconv", ["scene.rad"], stdout=target)], home)
        assert db.mark_starting(job)
        res = run_procwrap(db.path, job, home)
        row = db.get(job)
        assert res.returncode == procwrap.EXIT_FAILED, res.stderr
        assert row["state"] == "failed" and "symbolic link" in row["reason"], row
        assert "refused" in db.log_path(job).read_text()
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.oct"]


def test_confined_open_rejects_escapes(tmp_path: Path) -> None:
    proj = make_project(tmp_path)
    for bad in ("../x", "/etc/passwd", "", "a/../../x"):
        with pytest.raises(procwrap.ConfinementError):
            procwrap.open_confined(str(proj), bad, write=True)
    (tmp_path / "outside.txt").write_text("x")
    os.link(tmp_path / "outside.txt", proj / "hard.txt")
    with pytest.raises(procwrap.ConfinementError, match="hard links"):
        procwrap.open_confined(str(proj), "hard.txt", write=True)
    os.mkfifo(proj / "fifo")
    with pytest.raises(procwrap.ConfinementError):
        procwrap.open_confined(str(proj), "fifo", write=True)
    (proj / "d").mkdir()
    fd = procwrap.open_confined(str(proj), "d/./ok.txt", write=True)
    os.write(fd, b"ok")
    os.close(fd)
    assert (proj / "d" / "ok.txt").read_text() == "ok"


def test_cancel_mid_rpict_leaves_no_radiance_process(db: JobDB, home: Path, tmp_path: Path) -> None:
    proj = make_project(tmp_path)
    slow = ["-x", "800", "-y", "800", "-ab", "2", "-ad", "2048", "-as", "512"]
    steps = [
        step("oconv", ["scene.rad"], stdout="scene.oct"),
        step("rpict", [*VIEW, *slow, "scene.oct"], stdout="big.hdr"),
    ]
    job = submit(db, proj, steps, home)
    assert db.mark_starting(job)
    env = dict(os.environ, RAYFRONT_HOME=str(home))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rayserver.procwrap",
            "--db",
            str(db.path),
            "--job",
            str(job),
            "--grace",
            "2",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        pgid = None
        while time.monotonic() < deadline:
            row = db.get(job)
            if row["current_step"] == 2 and row["pgid_children"]:
                pgid = row["pgid_children"]
                if group_pids(pgid):
                    break
            time.sleep(0.02)
        assert pgid and group_pids(pgid), f"rpict never ran: {db.get(job)}"
        time.sleep(0.3)
        assert db.request_cancel(job, "cancel") is not None
        os.killpg(proc.pid, signal.SIGTERM)  # procwrap leads its own session/group
        assert proc.wait(15) == procwrap.EXIT_CANCELLED, proc.stderr.read()
        row = db.get(job)
        assert row["state"] == "cancelled", row
        assert row["reason"] == "cancelled by request"
        assert group_pids(pgid) == [], "a Radiance process of the step survived the cancel"
        assert "SIGTERM received" in db.log_path(job).read_text()
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_sigterm_without_request_is_interrupted(db: JobDB, home: Path, tmp_path: Path) -> None:
    proj = make_project(tmp_path)
    # rtrace reading a FIFO-less stdin that never ends would hang; use a slow rpict instead.
    slow = ["-x", "600", "-y", "600", "-ab", "2", "-ad", "2048"]
    job = submit(
        db,
        proj,
        [
            step("oconv", ["scene.rad"], stdout="scene.oct"),
            step("rpict", [*VIEW, *slow, "scene.oct"], stdout="o.hdr"),
        ],
        home,
    )
    assert db.mark_starting(job)
    env = dict(os.environ, RAYFRONT_HOME=str(home))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rayserver.procwrap",
            "--db",
            str(db.path),
            "--job",
            str(job),
            "--grace",
            "1",
        ],
        env=env,
    )
    try:
        wait_state(db, job, ("running",))
        deadline = time.monotonic() + 20
        while db.get(job)["current_step"] != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGTERM)
        # Interrupted, so queued again to resume at its rpict step (resume_interrupted).
        assert proc.wait(15) == procwrap.EXIT_RESUMED
        row = db.get(job)
        assert row["state"] == "queued" and "SIGTERM" in row["reason"], row
        assert row.resumes == 1 and row.resume_step == 2 and row.pid is None, row
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_claim_lost_runs_nothing(db: JobDB, home: Path, tmp_path: Path) -> None:
    proj = make_project(tmp_path)
    job = submit(db, proj, [step("oconv", ["scene.rad"], stdout="scene.oct")], home)
    # Still 'queued': a plain procwrap claims only 'starting' rows.
    res = run_procwrap(db.path, job, home)
    assert res.returncode == procwrap.EXIT_CLAIM_LOST
    assert "not ours" in res.stderr
    assert not (proj / "scene.oct").exists()
    assert db.get(job)["state"] == "queued"
    # --claim-queued (Slurm/CLI) takes a queued row.
    res = run_procwrap(db.path, job, home, "--claim-queued")
    assert res.returncode == 0, res.stderr
    assert db.get(job)["state"] == "done"


def test_exactly_once_claim_under_a_race(db: JobDB, home: Path, tmp_path: Path) -> None:
    proj = make_project(tmp_path)
    # Each run appends one line to count.txt... via a real Radiance program: rcalc
    # writing to stdout; several runs of the same job would leave several outputs.
    job = submit(db, proj, render_steps(), home)
    assert db.mark_starting(job)
    env = dict(os.environ, RAYFRONT_HOME=str(home))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "rayserver.procwrap", "--db", str(db.path), "--job", str(job)],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(6)
    ]
    codes = sorted(p.wait(60) for p in procs)
    assert codes == [procwrap.EXIT_DONE] + [procwrap.EXIT_CLAIM_LOST] * 5
    log = db.log_path(job).read_text()
    assert log.count("== step 1/2") == 1
    assert db.get(job)["state"] == "done"


def test_rad_job_progress_and_outputs(db: JobDB, home: Path, tmp_path: Path) -> None:
    proj = make_project(tmp_path)
    (proj / "room.rif").write_text(
        "scene = scene.rad\nZONE = I -2 2 -2 2 -1 3\n"
        "view = a -vp 0 -1.5 0 -vd 0 1 0\nview = b -vp 0 -1.5 0 -vd 1 1 0\n"
        "RESOLUTION = 32\nQUALITY = low\n"
    )
    job = submit(db, proj, [step("rad", ["room.rif"])], home)
    assert db.mark_starting(job)
    res = run_procwrap(db.path, job, home)
    log = db.log_path(job).read_text()
    assert res.returncode == 0, log
    assert "2 render(s)" in log
    assert "REPORT=0.05" in log.splitlines()[2]  # the step header shows the real command
    assert "rpict: " in log and "100.00%" in log  # -t 3 made rpict report
    row = db.get(job)
    assert row["state"] == "done" and row["progress"] == 100.0
    # Found by the scans, with their sizes: both pictures, the octree, rad's other files.
    outs = {o["path"]: o["size"] for o in db.public(row)["outputs"]}
    for name in ("room_a.hdr", "room_b.hdr", "room.oct"):
        assert outs[name] == (proj / name).stat().st_size > 0, outs
    assert "scene.rad" not in outs and "room.rif" not in outs  # read, not written


def test_rtrace_with_stdin_and_stdout(db: JobDB, home: Path, tmp_path: Path) -> None:
    proj = make_project(tmp_path)
    rays = "".join(f"0 -1.5 0 {x / 1000:.3f} 1 -0.2\n" for x in range(-1000, 1000))
    (proj / "rays.txt").write_text(rays)
    job = submit(
        db,
        proj,
        [
            step("oconv", ["scene.rad"], stdout="scene.oct"),
            step("rtrace", ["-h-", "-ov", "scene.oct"], stdin="rays.txt", stdout="values.txt"),
        ],
        home,
    )
    assert db.mark_starting(job)
    res = run_procwrap(db.path, job, home)
    assert res.returncode == 0, db.log_path(job).read_text()
    assert db.get(job)["progress"] == 100.0
    assert len((proj / "values.txt").read_text().splitlines()) == 2000
    assert (
        "== step 2/2: rtrace -h- -ov scene.oct < rays.txt > values.txt =="
        in db.log_path(job).read_text()
    )


def test_cli_rejects_bad_input(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "rayserver.procwrap",
            "--db",
            str(tmp_path / "nope.sqlite3"),
            "--job",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == procwrap.EXIT_USAGE
    assert "no job database" in res.stderr


def test_project_gone_before_the_job_runs_is_named(db: JobDB, home: Path, tmp_path: Path) -> None:
    # A queued job whose project was moved, deleted or unmounted meanwhile:
    # the failure names the folder, not "cannot start oconv" or a traceback.
    proj = make_project(tmp_path)
    jobs = [
        submit(db, proj, [step("oconv", ["scene.rad"], stdout="x.oct")], home),
        submit(db, proj, [step("oconv", ["scene.rad"])], home),
    ]
    shutil.rmtree(proj)
    for job in jobs:
        assert db.mark_starting(job)
        res = run_procwrap(db.path, job, home)
        row = db.get(job)
        log = db.log_path(job).read_text()
        assert res.returncode == procwrap.EXIT_FAILED, (res.stderr, log)
        assert row["state"] == "failed", row
        assert f"project directory {proj} is missing" in row["reason"], row["reason"]
        assert "Traceback" not in log and "cannot start" not in log, log
        assert f"project directory {proj} is missing" in log
        assert "== failed:" in log and "exit status None" not in log, log


CLAIM_PROBE = """
import sys
from rayserver.jobs.jobdb import JobDB
from rayserver.jobs.procwrap.entry import main
from rayserver.jobs.executors.local import procwrap_alive

real = JobDB.claim_row


def claim_row(self, job_id, pid, **kw):
    row = real(self, job_id, pid, **kw)
    # What a cancel arriving right now would see: the row running, and this process?
    open(sys.argv[1], "w").write(f"{row['state']} {procwrap_alive(pid, job_id)}")
    return row


JobDB.claim_row = claim_row
sys.exit(main(sys.argv[2:]))
"""


def test_a_cancel_right_after_the_claim_finds_the_procwrap(
    db: JobDB, home: Path, tmp_path: Path
) -> None:
    """The moment the row says running, the procwrap is recognisable and can be signalled.

    A cancel signals a running job's procwrap only when its title names the job; a
    title set after the claim left a gap in which the cancel was lost (a split part
    then ran on after rayfront's Ctrl-C). The claim is wrapped in the procwrap
    process itself to look at that very moment.
    """
    proj = make_project(tmp_path)
    job = submit(db, proj, [step("oconv", ["scene.rad"], stdout="scene.oct")], home)
    seen = tmp_path / "seen"
    (tmp_path / "probe.py").write_text(CLAIM_PROBE)
    env = dict(os.environ, RAYFRONT_HOME=str(home))
    argv = ["--db", str(db.path), "--job", str(job), "--claim-queued"]
    res = subprocess.run(
        [sys.executable, str(tmp_path / "probe.py"), str(seen), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert seen.read_text() == "running True"
    assert db.get(job)["state"] == "done"
