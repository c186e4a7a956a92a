"""Resume instead of restart (issue 18 item 4): real server on 127.0.0.1, real Radiance.

A render whose procwrap is SIGKILLed at about half-way is queued again and
rpict recovers its picture (-ro): the resumed run takes clearly less than an
uninterrupted render measured in the same test, and the pixels (everything
after the resolution line) match the uninterrupted picture byte for byte. The
headers differ by design: the resumed one names ``rpict -ro FILE ...`` and
its own dates. Byte equality needs a render without any random numbers:
Radiance 6.0a's -u- seeds random() once per process, so after a resume the
sequence would be off (-ab, jitter, -dt's probabilistic source tests all draw
from it); here -ab 0 -pj 0 -dj 0 -ds 0 -dt 0 -ps 1 draw none, and many light
sources give rpict enough work.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import RayHome
from jobtools import BIN, VIEW, get, rad_env, submit, wait_final, wait_until

from rayserver.common.states import is_final

# The renders killed half-way run on the shared server; the shutdown tests start their own.
pytestmark = pytest.mark.shared_server

# No random numbers at all (see the module docstring); -t 1: a progress report a second.
EXACT = ["-u-", "-ab", "0", "-pj", "0", "-ps", "1", "-dj", "0", "-ds", "0", "-dt", "0"]
SIZE = "500"


def _lamps() -> str:
    """A floor, a wall, a ball and 64 small lamps: each pixel tests 64 sources."""
    text = (
        "void light bright 0 0 3 100 100 100\n"
        "void plastic grey 0 0 5 .6 .6 .6 0 0\n"
        "grey polygon floor 0 0 12 0 0 0  4 0 0  4 4 0  0 4 0\n"
        "grey polygon wall 0 0 12 0 4 0  4 4 0  4 4 3  0 4 3\n"
        "grey sphere ball 0 0 4 2 2 0.5 0.5\n"
    )
    for i in range(8):
        for j in range(8):
            text += (
                f"bright sphere l{i}{j} 0 0 4 {0.3 + i * 0.45:.2f} {0.3 + j * 0.45:.2f} 2.9 .04\n"
            )
    return text


def make_lamps(home: RayHome, name: str = "lamps") -> Path:
    proj = home.projects / name
    proj.mkdir()
    (proj / "scene.rad").write_text(_lamps())
    with open(proj / "scene.oct", "wb") as out:
        subprocess.run(
            [str(BIN / "oconv"), "scene.rad"], cwd=proj, stdout=out, env=rad_env(), check=True
        )
    return proj


def render(out: str) -> dict[str, Any]:
    args = [*VIEW, "-x", SIZE, "-y", SIZE, *EXACT, "-t", "1", "scene.oct"]
    return {"program": "rpict", "args": args, "stdin": None, "stdout": out}


def pixels(path: Path) -> bytes:
    """A picture's data after its header and resolution line."""
    data = path.read_bytes()
    end = data.index(b"\n\n") + 2
    return data[data.index(b"\n", end) + 1 :]


def kill_at_half(
    srv: Any, job_id: int, how: int | None = signal.SIGKILL, half: float | None = None
) -> dict[str, Any]:
    """SIGKILL the job's procwrap (its process group) once it is about half-way (``how``
    None: only wait for that).

    Half-way is a progress report of 50 % or more, or, with ``half`` (half the
    wall time of the uninterrupted render measured in the test), that long
    running: rpict's ``-t 1`` reports come when the whole-second clock has
    passed the last one by more than a second, so a render of 2-3 s may report
    43 % and then only its end (seen in a quiet CI run).
    """
    running_since: list[float] = []

    def halfway() -> dict[str, Any] | None:
        job = get(srv, job_id)
        if is_final(job["state"]):
            raise AssertionError(f"the job ended before it was seen half-way: {job}")
        if job["state"] != "running":
            return None
        if not running_since:
            running_since.append(time.monotonic())
        if job["progress"] >= 50:
            return job
        if half is not None and time.monotonic() - running_since[0] >= half:
            return job
        return None

    row = wait_until(halfway, 120, "the render half-way", interval=0.1)
    if how is not None:
        os.killpg(row["pid"], how)
    return row


def saved(
    capsys: pytest.CaptureFixture[str],
    what: str,
    full: dict[str, Any],
    job: dict[str, Any],
    killed: dict[str, Any],
    after_kill: float,
) -> None:
    """The resumed run against the uninterrupted one: cpu time (the shared machine's load
    moves wall times between the two runs; both are printed)."""
    ratio = job["cpu_time"] / full["cpu_time"]
    with capsys.disabled():
        print(
            f"\nresume ({what}): uninterrupted {full['wall_time']:.2f} s wall, "
            f"{full['cpu_time']:.2f} s cpu; killed at {killed['progress']:.0f}%, the resumed "
            f"run took {job['wall_time']:.2f} s wall, {job['cpu_time']:.2f} s cpu ({ratio:.2f}; "
            f"{after_kill:.2f} s from the kill, or the restart, to done)"
        )
    assert ratio < 0.8, (job, full)


def db_row(home: RayHome, job_id: int) -> dict[str, Any]:
    """The job's row as the database holds it (also while no server runs)."""
    with sqlite3.connect(home.path / "srvstate" / "jobs.sqlite3") as conn:
        conn.row_factory = sqlite3.Row
        return dict(conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())


def events(home: RayHome, job_id: int) -> list[str]:
    raw = db_row(home, job_id)["events"]
    return [] if raw is None else json.loads(raw)


def test_render_killed_half_way_resumes_with_rpict_recover(
    server: Any, rayhome: RayHome, capsys: pytest.CaptureFixture[str]
) -> None:
    proj = make_lamps(rayhome)
    full = wait_final(server, submit(server, [render("full.hdr")], project="lamps")["id"], 180)
    assert full["state"] == "done", full
    cut_id = submit(server, [render("cut.hdr")], project="lamps")["id"]
    killed = kill_at_half(server, cut_id, half=full["wall_time"] / 2)
    at = time.monotonic()
    job = wait_final(server, cut_id, 180)
    after_kill = time.monotonic() - at
    log = (rayhome.path / "srvstate" / "jobs" / str(cut_id) / "log").read_text()
    shown = "\n".join(line for line in log.splitlines() if " rays, " not in line)
    assert job["state"] == "done" and job["resumes"] == 1, shown
    assert events(rayhome, cut_id) == ["resumed"], shown
    assert "rpict recovers cut.hdr" in log and "killed by signal 9" in log, shown
    assert pixels(proj / "cut.hdr") == pixels(proj / "full.hdr")
    assert b"rpict -r .cut.hdr.resume -vp" in (proj / "cut.hdr").read_bytes()[:2000]
    saved(capsys, "rpict", full, job, killed, after_kill)


def test_render_running_at_shutdown_resumes_at_the_next_start(
    server_factory: Any, rayhome: RayHome, capsys: pytest.CaptureFixture[str]
) -> None:
    proj = make_lamps(rayhome)
    srv = server_factory("-f")
    wait_until(lambda: _answers(srv), 20, "server answering")
    cut_id = submit(srv, [render("cut.hdr")], project="lamps")["id"]
    killed = kill_at_half(srv, cut_id, how=None)
    srv.proc.send_signal(signal.SIGTERM)  # a clean shutdown while the render runs
    assert srv.proc.wait(30) == 0, srv.output[-2000:]
    row = db_row(rayhome, cut_id)
    assert row["state"] == "queued" and row["resumes"] == 1, row
    assert row["reason"] == "resuming: the server shut down while the job ran", row
    again = server_factory("-f")
    at = time.monotonic()
    job = wait_final(again, cut_id, 180)
    after_start = time.monotonic() - at
    assert job["state"] == "done" and job["resumes"] == 1, _log(rayhome, cut_id)
    assert "rpict recovers cut.hdr" in _log(rayhome, cut_id)
    full = wait_final(again, submit(again, [render("full.hdr")], project="lamps")["id"], 180)
    assert full["state"] == "done", full
    assert pixels(proj / "cut.hdr") == pixels(proj / "full.hdr")
    saved(capsys, "rpict, shutdown", full, job, killed, after_start)


def test_without_resume_the_job_ends_interrupted(server_factory: Any, rayhome: RayHome) -> None:
    settings = rayhome.path / "config" / "rayserver.toml"
    settings.write_text(settings.read_text() + "resume_interrupted = false\n")
    srv = server_factory("-f")
    wait_until(lambda: _answers(srv), 20, "server answering")
    make_lamps(rayhome)
    job_id = submit(srv, [render("cut.hdr")], project="lamps")["id"]
    wait_until(
        lambda: get(srv, job_id)["state"] == "running" and get(srv, job_id)["progress"] > 0,
        60,
        "the render running",
    )
    os.killpg(get(srv, job_id)["pid"], signal.SIGKILL)
    job = wait_final(srv, job_id, 60)
    assert job["state"] == "interrupted" and job["resumes"] == 0, job
    assert "killed by signal 9" in job["reason"], job
    assert events(rayhome, job_id) == []


def _answers(srv: Any) -> bool:
    try:
        return srv.request("GET", "/v1/info", timeout=2)[0] == 200
    except OSError:
        return False


def rif(picture: str) -> str:
    # PENUMBRAS with QUALITY HIGH: rad's -ps 1 (no adaptive sampling); EXACT after rad's own.
    return (
        "ZONE= I 0 4 0 4 0 3\nscene= scene.rad\nOCTREE= scene.oct\n"
        f"PICTURE= {picture}\nRESOLUTION= 110\nQUALITY= HIGH\nPENUMBRAS= True\n"
        f"render= {' '.join(EXACT)}\nview= a {' '.join(VIEW)}\nREPORT= 0.02\n"
    )


def rad_step(rif_name: str) -> dict[str, Any]:
    return {"program": "rad", "args": [rif_name], "stdin": None, "stdout": None}


def test_rad_killed_half_way_recovers_its_unf(
    server: Any, rayhome: RayHome, capsys: pytest.CaptureFixture[str]
) -> None:
    proj = make_lamps(rayhome)
    (proj / "full.rif").write_text(rif("full"))
    (proj / "cut.rif").write_text(rif("cut"))
    full = wait_final(server, submit(server, [rad_step("full.rif")], project="lamps")["id"], 240)
    assert full["state"] == "done", full
    cut_id = submit(server, [rad_step("cut.rif")], project="lamps")["id"]
    killed = kill_at_half(server, cut_id, half=full["wall_time"] / 2)
    at = time.monotonic()
    assert (proj / "cut_a.unf").stat().st_size > 0
    job = wait_final(server, cut_id, 240)
    after_kill = time.monotonic() - at
    log = (rayhome.path / "srvstate" / "jobs" / str(cut_id) / "log").read_text()
    shown = "\n".join(line for line in log.splitlines() if " rays, " not in line)
    assert job["state"] == "done" and job["resumes"] == 1, shown
    assert "rad's render of cut_a.unf is recovered" in log, shown
    assert "rpict -r .cut_a.unf.resume" in log, shown
    assert events(rayhome, cut_id) == ["resumed"], shown
    assert not (proj / "cut_a.unf").exists() and not (proj / ".cut_a.unf.resume").exists()
    assert pixels(proj / "cut_a.hdr") == pixels(proj / "full_a.hdr")
    saved(capsys, "rad", full, job, killed, after_kill)


def grid_step(out: str, fmt: str) -> dict[str, Any]:
    # Irradiance at sensor points; no random numbers (EXACT but rpict's -pj, -ps).
    args = [f"-fa{fmt}", "-I", "-u-", "-ab", "0", "-dj", "0", "-ds", "0", "-dt", "0"]
    return {"program": "rtrace", "args": [*args, "scene.oct"], "stdin": "points.txt", "stdout": out}


@pytest.mark.parametrize("fmt", ["a", "f"])  # ascii lines; float records NCOMP=3 long
def test_grid_killed_half_way_answers_only_the_missing_rays(
    server: Any, rayhome: RayHome, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    proj = make_lamps(rayhome)
    side = 220  # 48,400 sensor points on the floor, facing up
    with open(proj / "points.txt", "w") as fh:
        for i in range(side):
            fh.writelines(
                f"{0.1 + 3.8 * i / side:.4f} {0.1 + 3.8 * j / side:.4f} 0.01 0 0 1\n"
                for j in range(side)
            )
    full_id = submit(server, [grid_step("full.dat", fmt)], project="lamps")["id"]
    full = wait_final(server, full_id)
    assert full["state"] == "done", (full, _log(rayhome, full["id"]))
    whole = (proj / "full.dat").read_bytes()
    cut_id = submit(server, [grid_step("cut.dat", fmt)], project="lamps")["id"]
    # Half the records written (a binary grid reports no progress: its size tells).
    cut = proj / "cut.dat"
    wait_until(lambda: cut.exists() and cut.stat().st_size >= len(whole) // 2, 120, "half")
    killed = {**get(server, cut_id), "progress": 100 * cut.stat().st_size / len(whole)}
    os.killpg(killed["pid"], signal.SIGKILL)
    at = time.monotonic()
    job = wait_final(server, cut_id, 120)
    after_kill = time.monotonic() - at
    log = _log(rayhome, cut_id)
    assert job["state"] == "done" and job["resumes"] == 1, log
    assert "rtrace goes on after the " in log and "records already in cut.dat" in log, log
    assert events(rayhome, cut_id) == ["resumed"], log
    # One header (the first run's: its CAPDATE differs), then the same 48,400 records.
    ours = cut.read_bytes()
    assert ours.count(b"#?RADIANCE") == 1
    records = ours.split(b"\n\n", 1)[1]
    assert records == whole.split(b"\n\n", 1)[1]
    assert len(records) == side * side * 12 if fmt == "f" else records.count(b"\n") == side**2
    saved(capsys, f"rtrace grid -fa{fmt}", full, job, killed, after_kill)


def _log(home: RayHome, job_id: int) -> str:
    return (home.path / "srvstate" / "jobs" / str(job_id) / "log").read_text()


def test_which_grids_resume_and_where(tmp_path: Path) -> None:
    """gridresume's decisions on real files (no server): records counted, rays skipped."""
    from rayserver.jobs.procwrap import gridresume

    assert gridresume.unsafe("rtrace", ["-I", "-h", "x.oct"]) is None
    assert gridresume.unsafe("rtrace", ["-ffa", "x.oct"]) is None  # float rays, text records
    assert gridresume.unsafe("rtrace", ["-faf", "-ovN", "x.oct"]) is None  # NCOMP floats
    assert "no fixed size" in gridresume.unsafe("rtrace", ["-fad", "-ovm", "x.oct"])
    assert "no records of a known size" in gridresume.unsafe("rtrace", ["-fac", "x.oct"])
    assert "several lines" in gridresume.unsafe("rtrace", ["-ovt", "x.oct"])
    assert "picture" in gridresume.unsafe("rtrace", ["-x", "10", "x.oct"])
    assert gridresume.unsafe("rcontrib", ["-f", "klems.cal", "-m", "sky", "x.oct"]) is None
    assert "own files" in gridresume.unsafe("rcontrib", ["-o", "c_%s.dat", "-m", "s", "x.oct"])
    assert "accumulates" in gridresume.unsafe("rcontrib", ["-c", "100", "-m", "s", "x.oct"])
    assert "known size" in gridresume.unsafe("rcontrib", ["-fad", "-m", "s", "x.oct"])
    (tmp_path / "out.dat").write_bytes(b"#?RADIANCE\nFORMAT=ascii\n\n1 2 3\n4 5 6\n7 8")
    assert gridresume.done_records(str(tmp_path), "out.dat") == (2, 37)
    head = b"#?RADIANCE\nNCOMP=3\nFORMAT=float\n\n"
    (tmp_path / "out.bin").write_bytes(head + bytes(12 * 5 + 7))
    assert gridresume.done_records(str(tmp_path), "out.bin", "f") == (5, len(head) + 60)
    (tmp_path / "bare.bin").write_bytes(bytes(24))  # -h-: nothing says a record's size
    assert gridresume.done_records(str(tmp_path), "bare.bin", "f") is None
    (tmp_path / "rays.txt").write_text("0 0 0 0 0 1\n1 1 1\n 0 0 1\n2 2 2 0 0 1\n")
    assert gridresume.input_offset(str(tmp_path), "rays.txt", "a", 2) == 24
    assert gridresume.input_offset(str(tmp_path), "rays.txt", "a", 4) is None
    assert gridresume.input_offset(str(tmp_path), "rays.txt", "f", 1) == 24
