"""Jobs end to end: a real rayserver (supervisor, worker, fork server, procwraps) and real Radiance.

Every test talks HTTP to ``python -m rayserver -f`` started by the shared
``server``/``server_factory`` fixtures, which stop everything afterwards.
Radiance processes of a job are found through /proc: they carry this test's
RAYFRONT_HOME in their environment and run a program of the Radiance bin
directory.
"""

from __future__ import annotations

import http.client
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import RayHome, our_pids
from jobtools import (
    BIN,
    SCENE,
    get,
    make_project,
    rad_env,
    rpict,
    submit,
    wait_final,
    wait_until,
)

from rayserver.common import ambfile

# Tests that page through every job keep a server of their own.
pytestmark = pytest.mark.shared_server


def radiance_pids(home: RayHome) -> dict[int, str]:
    """pid -> program name of live Radiance processes started for this test's home."""
    found = {}
    for pid in our_pids(home.path):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if Path(argv0).parent == BIN:
            found[pid] = Path(argv0).name
    return found


def pixels(path: Path) -> str:
    out = subprocess.run(
        [str(BIN / "pvalue"), "-h", "-H", "-d", str(path)],
        capture_output=True,
        text=True,
        check=True,
        env=rad_env(),
        timeout=30,
    )
    return out.stdout


def job_log(srv: Any, job_id: int) -> str:
    status, text = srv.request("GET", f"/v1/jobs/{job_id}/log")
    assert status == 200 and isinstance(text, str)
    return text


def worker_pid(srv: Any) -> int | None:
    """The supervisor's child whose title says it is the worker."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[-1].split()[1])
        if ppid == srv.proc.pid and "worker" in cmd:
            return int(entry.name)
    return None


def answering(srv: Any) -> bool:
    try:
        status, _ = srv.request("GET", "/v1/info", timeout=2)
        return status == 200
    except OSError:
        return False


# ------------------------------------------------------------------ tests


def test_render_through_server_gives_the_same_pixels(
    server: Any, rayhome: RayHome, tmp_path: Path
) -> None:
    make_project(rayhome)
    job = submit(
        server,
        [
            {"program": "oconv", "args": ["scene.rad"], "stdin": None, "stdout": "again.oct"},
            rpict(48, "-ab", "1", out="server.hdr"),
        ],
    )
    assert job["state"] in ("queued", "running") and job["step_count"] == 2
    done = wait_final(server, job["id"])
    assert done["state"] == "done" and done["exit_status"] == 0, job_log(server, job["id"])
    assert done["progress"] == 100

    direct = tmp_path / "direct"
    direct.mkdir()
    (direct / "scene.rad").write_text(SCENE)
    with open(direct / "scene.oct", "wb") as out:
        subprocess.run(
            [str(BIN / "oconv"), "scene.rad"], cwd=direct, stdout=out, check=True, env=rad_env()
        )
    step = rpict(48, "-ab", "1")
    with open(direct / "direct.hdr", "wb") as out:
        subprocess.run(
            [str(BIN / "rpict"), *step["args"]],
            cwd=direct,
            stdout=out,
            check=True,
            env=rad_env(),
            timeout=60,
        )
    ours, theirs = pixels(rayhome.projects / "room" / "server.hdr"), pixels(direct / "direct.hdr")
    assert len(ours.splitlines()) > 1000
    assert ours == theirs
    assert "server.hdr" in [o["path"] for o in done["outputs"]]


@pytest.mark.parametrize(
    "step, status, words",
    [
        (
            {"program": "rtrace", "args": ["scene.oct"], "stdin": None, "stdout": "../x"},
            403,
            "'..'",
        ),
        (
            {"program": "rtrace", "args": ["/etc/passwd"], "stdin": None, "stdout": None},
            403,
            "absolute path",
        ),
        (
            {"program": "rtrace", "args": ["escape/passwd"], "stdin": None, "stdout": None},
            403,
            "outside the project",
        ),
        (
            {"program": "rtrace", "args": ["scene.oct"], "stdin": None, "stdout": "escape/new"},
            403,
            "outside the project",
        ),
        (
            {"program": "bash", "args": ["-c", "touch pwned"], "stdin": None, "stdout": None},
            422,
            "not a Radiance program",
        ),
        (
            {"program": "python3", "args": [], "stdin": None, "stdout": None},
            422,
            "not a Radiance program",
        ),
    ],
)
def test_bad_jobs_are_refused_and_nothing_runs(
    server: Any, rayhome: RayHome, tmp_path: Path, step: dict[str, Any], status: int, words: str
) -> None:
    proj = make_project(rayhome)
    os.symlink("/etc", proj / "escape")
    code, body = server.request(
        "POST",
        "/v1/jobs",
        {
            "location": "projects",
            "project": "room",
            "steps": [
                {"program": "oconv", "args": ["scene.rad"], "stdin": None, "stdout": "first.oct"},
                step,
            ],
        },
    )
    assert code == status, body
    assert isinstance(body, dict) and body["status"] == status
    assert words in body["error"] and "steps[1]" in body["error"]
    code, listing = server.request("GET", "/v1/jobs")
    assert code == 200 and server.own(listing["jobs"]) == []
    assert not (proj / "first.oct").exists() and not (proj / "pwned").exists()
    assert not (rayhome.projects / "x").exists()
    assert radiance_pids(rayhome) == {}


def test_cancel_mid_render_leaves_no_radiance_process(server: Any, rayhome: RayHome) -> None:
    make_project(rayhome)
    job = submit(server, [rpict(1500, "-ab", "2", "-ad", "2048", "-t", "1")])
    wait_until(lambda: "rpict" in radiance_pids(rayhome).values(), 20, "rpict running")
    running = get(server, job["id"])
    assert running["state"] == "running" and running["pid"]
    status, body = server.request("DELETE", f"/v1/jobs/{job['id']}")
    assert status == 200, body
    assert body["cancel_requested"] is True and body["state"] in ("running", "cancelled")
    final = wait_final(server, job["id"], timeout=30)
    assert final["state"] == "cancelled", final
    assert final["ended_at"] is not None
    assert radiance_pids(rayhome) == {}
    # The procwrap tells the worker the moment its final state is committed, then exits
    # (a cancelled job ends its procwrap, warm or not): wait for that, bounded.
    wait_until(
        lambda: running["pid"] not in our_pids(rayhome.path), 10, "the cancelled procwrap gone"
    )
    status, body = server.request("DELETE", f"/v1/jobs/{job['id']}")
    assert status == 409 and "already ended" in body["error"]


def test_worker_killed_during_render(server: Any, rayhome: RayHome) -> None:
    make_project(rayhome)
    # -aa 0 (no ambient cache): ~3 s of cpu, longer than a worker restart takes
    job = submit(server, [rpict(300, "-ab", "2", "-ad", "512", "-aa", "0", "-t", "1")])
    wait_until(lambda: "rpict" in radiance_pids(rayhome).values(), 20, "rpict running")
    old = worker_pid(server)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    # The supervisor starts a new worker; the render goes on meanwhile.
    wait_until(
        lambda: (worker_pid(server) or old) != old and answering(server),
        30,
        "a new worker answering",
    )
    # The new worker adopted the procwrap that is still rendering.
    assert get(server, job["id"])["state"] == "running"
    assert "rpict" in radiance_pids(rayhome).values()
    final = wait_final(server, job["id"], timeout=120)
    assert final["state"] == "done" and final["exit_status"] == 0, final
    assert final["progress"] == 100
    text = job_log(server, job["id"])
    assert "100.00%" in text, text
    assert text.count(f"== job {job['id']}") == 1
    picture = rayhome.projects / "room" / "out.hdr"
    res = subprocess.run(
        [str(BIN / "getinfo"), "-d", str(picture)],
        capture_output=True,
        text=True,
        check=True,
        env=rad_env(),
    ).stdout.split()
    width, height = int(res[-1]), int(res[-3])
    assert width == 300 and len(pixels(picture).splitlines()) == width * height
    assert radiance_pids(rayhome) == {}


def _max_overlap(jobs: list[dict[str, Any]]) -> int:
    events = sorted([(j["started_at"], 1) for j in jobs] + [(j["ended_at"], -1) for j in jobs])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_more_jobs_than_cpus_queue_and_all_finish(server: Any, rayhome: RayHome) -> None:
    make_project(rayhome)  # the test home's host record has 2 cpus
    ids = [
        submit(server, [rpict(80, "-ab", "1", "-ad", "256", "-aa", "0", out=f"q{i}.hdr")])["id"]
        for i in range(6)
    ]
    jobs = [wait_final(server, i, timeout=120) for i in ids]
    assert [j["state"] for j in jobs] == ["done"] * 6, jobs
    assert _max_overlap(jobs) == 2
    for i in range(6):
        assert (rayhome.projects / "room" / f"q{i}.hdr").stat().st_size > 0


def test_restart_with_jobs_queued(server_factory: Any, rayhome: RayHome) -> None:
    rayhome.write_hosts(f'testhost 1 projects="{rayhome.projects}"\n')
    # As before resume: the interrupted job stays interrupted (tests/test_resume.py resumes).
    conf = rayhome.path / "config" / "rayserver.toml"
    conf.write_text(conf.read_text() + "resume_interrupted = false\n")
    make_project(rayhome)
    srv = server_factory("-f")
    wait_until(lambda: answering(srv), 20, "server answering")
    first = submit(srv, [rpict(600, "-ab", "2", "-ad", "1024")])["id"]
    queued = [submit(srv, [rpict(40, out=f"r{i}.hdr")])["id"] for i in range(3)]
    wait_until(lambda: get(srv, first)["state"] == "running", 20, "first job running")
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0, srv.output
    wait_until(lambda: not radiance_pids(rayhome), 15, "renders ended")

    restarted = time.time()
    again = server_factory("-f")
    wait_until(lambda: answering(again), 20, "restarted server answering")
    assert get(again, first)["state"] == "interrupted"
    for job_id in queued:
        job = wait_final(again, job_id, timeout=60)
        assert job["state"] == "done", job
        assert job["started_at"] >= restarted
        assert job_log(again, job_id).count(f"== job {job_id}:") == 1


def check_ambient(path: Path) -> int:
    """Number of records; fails unless the file is whole (rayserver.common.ambfile's check,
    then lookamb's count as a second opinion)."""
    result = ambfile.check_file(path)
    assert result.ok, result.problem
    assert ambfile.lookamb_count(path, BIN / "lookamb", rad_env()) == result.records
    return result.records


def test_four_jobs_share_one_ambient_file(server_factory: Any, rayhome: RayHome) -> None:
    rayhome.write_hosts(f'testhost 4 projects="{rayhome.projects}"\n')
    make_project(rayhome)
    srv = server_factory("-f")
    wait_until(lambda: answering(srv), 20, "server answering")
    views = [
        ["-vp", "2", "-1", "2"],
        ["-vp", "1", "-1", "1.5"],
        ["-vp", "3", "-1", "1.5"],
        ["-vp", "2", "-0.5", "2.5"],
    ]
    ids = []
    for i, vp in enumerate(views):
        step = {
            "program": "rpict",
            "stdin": None,
            "stdout": f"amb{i}.hdr",
            "args": [
                *vp,
                "-vd",
                "0",
                "1",
                "-0.5",
                "-x",
                "96",
                "-y",
                "96",
                "-ab",
                "2",
                "-ad",
                "256",
                "-as",
                "64",
                "-aa",
                "0.1",
                "-af",
                "shared.amb",
                "scene.oct",
            ],
        }
        ids.append(submit(srv, [step])["id"])
    jobs = [wait_final(srv, i, timeout=120) for i in ids]
    assert [j["state"] for j in jobs] == ["done"] * 4, [job_log(srv, i) for i in ids]
    assert [j["warnings"] for j in jobs] == [[]] * 4, [job_log(srv, i) for i in ids]
    assert _max_overlap(jobs) >= 2
    assert check_ambient(rayhome.projects / "room" / "shared.amb") > 10


def _stream(home: RayHome, path: str) -> tuple[list[tuple[float, bytes]], http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", home.port, timeout=60)
    conn.request("GET", path, headers={"Authorization": f"Bearer {home.token()}"})
    resp = conn.getresponse()
    chunks = []
    while True:
        data = resp.read1(65536)
        if not data:
            break
        chunks.append((time.time(), data))
    conn.close()
    return chunks, resp


def test_log_follow_streams_until_the_job_ends(server: Any, rayhome: RayHome) -> None:
    make_project(rayhome)
    job = submit(server, [rpict(200, "-ab", "2", "-ad", "256", "-aa", "0", "-t", "1")])
    chunks, resp = _stream(rayhome, f"/v1/jobs/{job['id']}/log?follow=1")
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/plain")
    assert resp.getheader("Transfer-Encoding") == "chunked"
    final = get(server, job["id"])
    assert final["state"] == "done"
    text = b"".join(c for _, c in chunks).decode()
    assert text == job_log(server, job["id"])
    assert "100.00%" in text
    # streamed: the first bytes came well before the job ended (same host, same clock)
    assert len(chunks) > 1 and final["ended_at"] - chunks[0][0] > 0.3, final
    # following a finished job answers at once with the rest from offset
    chunks, _ = _stream(rayhome, f"/v1/jobs/{job['id']}/log?follow=1&offset=10")
    assert b"".join(c for _, c in chunks).decode() == text[10:]


@pytest.mark.shared_server(False)
def test_wait_returns_promptly_and_list_pages(server: Any, rayhome: RayHome) -> None:
    make_project(rayhome)
    job = submit(server, [rpict(100, "-ab", "1", "-ad", "512")])
    t0 = time.monotonic()
    final = get(server, job["id"], wait=60)
    waited = time.monotonic() - t0
    assert final["state"] == "done" and final["ended_at"] is not None
    assert waited < 30
    # promptly: the answer came soon after the job's own end
    assert time.time() - final["ended_at"] < 1.0
    ids = [job["id"]] + [submit(server, [rpict(8, out=f"p{i}.hdr")])["id"] for i in range(4)]
    for i in ids:
        wait_final(server, i)
    seen, before, pages = [], None, 0
    while True:
        path = "/v1/jobs?limit=2" + (f"&before={before}" if before else "")
        status, page = server.request("GET", path)
        assert status == 200 and len(page["jobs"]) <= 2
        seen += [j["id"] for j in page["jobs"]]
        pages += 1
        before = page["next"]
        if before is None:
            break
    assert seen == sorted(ids, reverse=True) and pages == 3


def _percentile_report(name: str, values: list[float]) -> str:
    return (
        f"{name}: median {statistics.median(values) * 1000:.1f} ms "
        f"(min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f})"
    )


def test_measure_latency_and_tiny_job_overhead(
    server: Any, rayhome: RayHome, capsys: pytest.CaptureFixture[str]
) -> None:
    """Numbers for the report; the asserts only catch an order-of-magnitude regression."""
    proj = make_project(rayhome)
    (proj / "point.txt").write_text("2 2 0.5 0 0 1\n")
    step = {
        "program": "rtrace",
        "args": ["-h", "-ab", "0", "scene.oct"],
        "stdin": "point.txt",
        "stdout": "point.out",
    }
    direct, through, start_latency = [], [], []
    for _ in range(10):
        t0 = time.perf_counter()
        with open(proj / "point.txt", "rb") as inp, open(proj / "direct.out", "wb") as out:
            subprocess.run(
                [str(BIN / "rtrace"), *step["args"]],
                cwd=proj,
                stdin=inp,
                stdout=out,
                check=True,
                env=rad_env(),
            )
        direct.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        wall0 = time.time()
        job = submit(server, [step])
        final = get(server, job["id"], wait=30)
        through.append(time.perf_counter() - t0)
        assert final["state"] == "done", final
        start_latency.append(final["started_at"] - wall0)
    assert (proj / "point.out").read_bytes() == (proj / "direct.out").read_bytes()
    ratio = statistics.median(through) / statistics.median(direct)
    with capsys.disabled():
        print("\n" + _percentile_report("submit to process start", start_latency))
        print(_percentile_report("tiny rtrace direct", direct))
        print(_percentile_report("tiny rtrace through the server (submit + GET ?wait)", through))
        print(f"ratio server/direct (medians of 10): {ratio:.1f}")
    assert statistics.median(start_latency) < 1.0
    assert statistics.median(through) < 2.0


def _nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def test_worker_yields_the_cpu_to_simulations(server: Any) -> None:
    """server_nice (default 5) applies to the worker only, not to procwraps and Radiance."""
    make_project(server.home)
    status, info = server.request("GET", "/v1/info")
    assert status == 200
    assert _nice(info["pid"]) == os.nice(0) + 5
    job = submit(server, [rpict(200, "-ab", "2")])
    running = wait_until(
        lambda: (j := get(server, job["id"]))["state"] == "running" and j.get("pid") and j,
        20,
        "job running",
    )
    assert _nice(running["pid"]) == os.nice(0)
    server.request("DELETE", f"/v1/jobs/{job['id']}")
