"""sh command lines and scripts as job steps (rayfront run --sh / --script).

The progress parser alone; then real /bin/sh with real Radiance run by a real
procwrap process from a real job database (the step as jobspec resolves it:
program sh, /bin/sh -c or /bin/sh SCRIPT); then a real server on 127.0.0.1,
which refuses shell steps with 403 when it runs without the job sandbox.
Radiance is compared byte for byte: rtrace -ab 1 with -u- (correlated
sampling, the same numbers in every run) or -ab 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import RayHome, make_home
from jobtools import BIN, make_project, rad_env, rayfront

from rayserver.common.paths import Layout
from rayserver.jobs.jobdb import JobDB
from rayserver.jobs.procwrap.shprogress import ShProgress, script_commands

pytestmark = pytest.mark.shared_server

MARK = "+rayserver-0123abcd+ "

# The daylight factor of a sensor grid under a uniform sky, as the recipes compute it.
ROOM = """\
void glow sky_glow 0 0 4 1 1 1 0
sky_glow source sky 0 0 4 0 0 1 180
void plastic grey 0 0 5 .5 .5 .5 0 0
grey polygon floor 0 0 12 0 0 0  4 0 0  4 4 0  0 4 0
grey polygon wall 0 0 12 0 4 0  4 4 0  4 4 3  0 4 3
"""
GRID = "".join(f"{0.5 + x} {0.5 + y} 0.8 0 0 1\n" for x in range(4) for y in range(4))
DF_PIPE = (
    "rtrace -h -I -ab 1 -ad 256 -aa 0 -u- room.oct < grid.pts "
    "| rcalc -e '$1=100*(.265*$1+.670*$2+.065*$3)/PI'"
)
SCRIPT = """\
#!/bin/sh
# two views of the grid, then a count with backticks
oconv room.rad > room.oct
for dz in 1 -1; do
  rcalc -e '$1=$1;$2=$2;$3=$3;$4=0;$5=0;$6='"$dz" grid.pts \\
    | rtrace -h -ab 0 room.oct > view_$dz.txt
done
n=`cat view_1.txt view_-1.txt | wc -l`
echo "rays: $n" > count.txt
"""


# ---------------------------------------------------------------- the progress parser


def test_the_commands_of_a_script_and_progress_through_them() -> None:
    assert script_commands(SCRIPT) == ["oconv", "rcalc", "rtrace", "n=", "cat", "wc", "echo"]
    progress = ShProgress(SCRIPT, MARK)
    seen = []
    for line in [
        MARK + "oconv room.rad",
        MARK + "rcalc -e $1=$1 grid.pts",
        MARK + "rtrace -h -ab 0 room.oct",
        "rtrace: warning - no light sources found",
        MARK + "rcalc -e ... grid.pts",  # the loop again: progress holds
        MARK + "rtrace -h -ab 0 room.oct",
        MARK + "cat view_1.txt view_-1.txt" + MARK + "wc -l",  # a pipeline, interleaved
        MARK + "n=32",
        MARK + "echo rays: 32",
    ]:
        value = progress.feed(line)
        if value is not None:
            seen.append(round(value * 7, 3))
    # Commands begun of 7 (those before are done): rcalc, rtrace, then wc (the pipeline's
    # last), echo; the loop's second round and the assignment move nothing.
    assert seen == [1, 2, 5, 6]
    assert progress.shown(MARK + "cat a" + MARK + "wc -l") == "+ cat a\n+ wc -l"
    assert progress.shown("rtrace: warning") == "rtrace: warning"


def test_rpict_reports_fill_in_its_command() -> None:
    progress = ShProgress("oconv s.rad > s.oct\nrpict -vf v.vf s.oct > v.hdr\n", MARK)
    assert progress.feed(MARK + "oconv s.rad") is None  # command 0 of 2 starts: 0 done
    assert progress.feed(MARK + "rpict -vf v.vf s.oct") == 0.5
    line = "rpict: 982530 rays, 50.00% after 0.000u 0.000s 0.001r hours on h (PID 1)"
    assert progress.feed(line) == 0.75


# ---------------------------------------------------------------- a procwrap runs them


def _run(home: Path, proj: Path, step: dict[str, Any]) -> tuple[dict[str, Any], str]:
    db = JobDB(Layout(home, "testhost").db_path)
    env = rad_env()
    job = db.submit(
        name=None,
        priority=0,
        client="127.0.0.1",
        location="projects",
        project=proj.name,
        workdir=str(proj),
        steps=[{"program": "sh", "path": "/bin/sh", "stdin": None, "stdout": None, **step}],
        env={"RAYPATH": env["RAYPATH"], "PATH": env["PATH"]},
    )
    assert db.mark_starting(job)
    subprocess.run(
        [sys.executable, "-m", "rayserver.procwrap", "--db", str(db.path), "--job", str(job)],
        env={**os.environ, "RAYFRONT_HOME": str(home)},
        capture_output=True,
        timeout=120,
        check=False,
    )
    row = db.public(db.get(job))
    return row, db.log_path(job).read_text()


def _direct_sh(proj: Path, *argv: str) -> None:
    subprocess.run(["/bin/sh", *argv], cwd=proj, env=rad_env(), check=True, timeout=120)


@pytest.fixture
def room(tmp_path: Path) -> tuple[Path, Path]:
    home = make_home(tmp_path).path
    proj = tmp_path / "projects" / "room"
    proj.mkdir()
    (proj / "room.rad").write_text(ROOM)
    (proj / "grid.pts").write_text(GRID)
    subprocess.run(
        [str(BIN / "oconv"), "room.rad"],
        cwd=proj,
        stdout=open(proj / "room.oct", "wb"),  # noqa: SIM115 - closed with the process
        env=rad_env(),
        check=True,
    )
    return home, proj


def test_the_daylight_factor_pipe_as_one_sh_step(room: tuple[Path, Path]) -> None:
    home, proj = room
    job, log = _run(
        home, proj, {"args": ["-c", f"{DF_PIPE} > df.txt"], "sh": f"{DF_PIPE} > df.txt"}
    )
    assert job["state"] == "done", log
    _direct_sh(proj, "-c", f"{DF_PIPE} > direct.txt")
    assert (proj / "df.txt").read_bytes() == (proj / "direct.txt").read_bytes()
    values = [float(v) for v in (proj / "df.txt").read_text().split()]
    assert len(values) == 16 and all(0 < v < 100 for v in values), values
    # The trace, readable: `+ COMMAND` lines, the marker gone. The two commands of the
    # pipe trace at once, and dash writes each word on its own, so their words may mix
    # (seen in CI: the rcalc words on a line of their own after rtrace's).
    assert "+ rtrace " in log or "+ rcalc " in log, log
    assert "+rayserver-" not in log, log
    assert job["progress"] == 100.0
    assert {o["path"] for o in job["outputs"]} == {"df.txt"}


def test_a_script_with_a_loop_and_backticks(room: tuple[Path, Path]) -> None:
    home, proj = room
    (proj / "views.sh").write_text(SCRIPT)
    job, log = _run(home, proj, {"args": ["views.sh"], "script": "views.sh"})
    assert job["state"] == "done", log
    made = {name: (proj / name).read_bytes() for name in ("view_1.txt", "view_-1.txt", "count.txt")}
    assert made["count.txt"] == b"rays: 32\n"
    for name in made:
        (proj / name).unlink()
    _direct_sh(proj, "views.sh")
    for name, data in made.items():
        assert (proj / name).read_bytes() == data, name
    outputs = {o["path"]: o["size"] for o in job["outputs"]}
    assert outputs == {
        "count.txt": 9,
        "room.oct": (proj / "room.oct").stat().st_size,
        "view_-1.txt": len(made["view_-1.txt"]),
        "view_1.txt": len(made["view_1.txt"]),
    }
    # Traced: the loop's rtrace and the count. Both rounds ran (the files above); their
    # traces are not counted: the two members of a pipeline trace themselves at once,
    # and on a busy machine one line was cut by the other's.
    assert "rtrace -h -ab 0 room.oct" in log and "+ n=32" in log


def test_progress_moves_with_the_commands_and_rpict_reports(room: tuple[Path, Path]) -> None:
    home, proj = room
    script = (
        "oconv room.rad > r.oct\n"
        "rpict -t 1 -vp 2 -1 1.5 -vd 0 1 0 -x 500 -y 500 -ab 1 -ad 512 -aa 0 r.oct > r.hdr\n"
        "pfilt -x /2 -y /2 r.hdr > small.hdr\n"
    )
    (proj / "render.sh").write_text(script)
    db = JobDB(Layout(home, "testhost").db_path)
    seen: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            for row in db.list(limit=1):
                if row.state == "running":
                    seen.append(row.progress)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        job, log = _run(home, proj, {"args": ["render.sh"], "script": "render.sh"})
    finally:
        stop.set()
        watcher.join(5)
    assert job["state"] == "done", log
    assert "rpict: " in log and "% after" in log  # its reports reach the log
    between = sorted({p for p in seen if 0 < p < 100})
    # Past oconv (1 of 3 commands), and inside the render from rpict's own reports.
    assert any(33.3 < p < 66.7 for p in between), (between, log[-2000:])


# ---------------------------------------------------------------- through a server


@pytest.fixture
def unboxed(tmp_path: Path, server_factory: Any) -> tuple[Any, RayHome]:
    """A server that runs jobs without the sandbox."""
    off = 'sandbox = "off"\n'
    home = make_home(tmp_path / "unboxed", settings_extra=off)
    return server_factory("-f", home=home), home


def test_shell_steps_are_refused_without_the_sandbox(unboxed: tuple[Any, RayHome]) -> None:
    srv, home = unboxed
    proj = make_project(home)
    (proj / "run.sh").write_text("echo hi\n")
    for step, field in (({"sh": "echo hi"}, "sh"), ({"script": "run.sh"}, "script")):
        body = {"location": "projects", "project": "room", "steps": [step]}
        status, answer = srv.request("POST", "/v1/jobs", body)
        assert status == 403, answer
        assert (
            f"steps[0].{field}: shell command lines and scripts run only inside" in answer["error"]
        )
        assert 'sandbox = "off"' in answer["error"]
    status, page = srv.request("GET", "/v1/jobs")
    assert status == 200 and page["jobs"] == []  # nothing was queued
    run = rayfront(home, "run", "--sh", "rtrace -h room.oct < pts | rcalc", cwd=proj)
    assert run.returncode == 1 and "HTTP 403" in run.stderr and "sandbox" in run.stderr


def test_shell_step_requests_are_checked(unboxed: tuple[Any, RayHome]) -> None:
    srv, home = unboxed
    proj = make_project(home)
    for step, text in (
        ({"program": "rtrace", "sh": "ls"}, "give exactly one of program"),
        ({}, "missing required field 'steps[0].program' (or 'sh'"),
        ({"sh": "ls", "args": ["-l"]}, "a sh step takes no args"),
        ({"sh": 5}, "steps[0].sh: expected a string"),
    ):
        body = {"location": "projects", "project": "room", "steps": [step]}
        status, answer = srv.request("POST", "/v1/jobs", body)
        assert status == 422 and text in answer["error"], (step, answer)
    for args, text in (
        (["run", "--sh", "ls", "--script", "x.sh"], "give --sh or --script, not both"),
        (["run", "--sh", "ls", "--", "x"], "nothing goes after '--'"),
        (["run", "--script", "missing.sh"], "no such file in the project directory"),
        (["run", "--hosts", "all", "--sh", "ls"], "--sh/--script run on one server"),
    ):
        proc = rayfront(home, *args, cwd=proj)
        assert proc.returncode == 2 and text in proc.stderr, (args, proc.stderr)


# ---------------------------------------------------------------- rayfront, a boxed server


def _room_project(home: RayHome) -> Path:
    proj = home.projects / "room"
    proj.mkdir()
    (proj / "room.rad").write_text(ROOM)
    (proj / "grid.pts").write_text(GRID)
    with open(proj / "room.oct", "wb") as out:
        subprocess.run(
            [str(BIN / "oconv"), "room.rad"], cwd=proj, stdout=out, env=rad_env(), check=True
        )
    return proj


def test_rayfront_run_sh_gives_the_pipes_bytes(server: Any, rayhome: RayHome) -> None:
    """The daylight-factor pipe as a designer types it, its result on rayfront's stdout."""
    proj = _room_project(rayhome)
    run = rayfront(rayhome, "run", "--sh", DF_PIPE, cwd=proj, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    direct = subprocess.run(
        ["/bin/sh", "-c", DF_PIPE], cwd=proj, env=rad_env(), capture_output=True, check=True
    ).stdout.decode()
    assert run.stdout == direct and len(direct.split()) == 16
    assert "+ rtrace -h -I" in run.stderr and "sandbox landlock" in run.stderr


def test_rayfront_run_script_lists_what_it_wrote(server: Any, rayhome: RayHome) -> None:
    proj = _room_project(rayhome)
    (proj / "views.sh").write_text(SCRIPT)
    run = rayfront(rayhome, "run", "--stdout", "views.log", "--script", "views.sh", cwd=proj)
    assert run.returncode == 0, run.stderr
    assert (proj / "count.txt").read_text() == "rays: 32\n"
    job = rayfront(rayhome, "status", str(server.jobs_before + 1), cwd=proj).stdout
    for name in ("count.txt", "view_1.txt", "view_-1.txt", "room.oct"):
        assert f"{name}  (" in job, job
    assert "step 1: sh views.sh" in job or "sh views.sh" in job, job
