"""Shared ambient files (-af): the integrity check, the creation by one writer, the rounds.

Radiance creates a missing ambient file with ``fopen("w+")`` before it locks
it, so first writers that start together can truncate each other's records
(docs/operations.md, "Shared ambient files"). The procwrap creates the file
itself before such a step; these tests run real Radiance through real servers
on 127.0.0.1, and the same rounds directly, where Radiance alone may damage the
file (that side is counted and printed, not asserted).
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from ambtools import AMB_ARGS, check, direct_round, rays, writers_in_round
from conftest import RayHome, our_pids
from jobtools import (
    BIN,
    get,
    make_project,
    rad_env,
    rayfront,
    submit,
    wait_final,
    wait_until,
)
from splittools import api, as_json, jobs_of, make_cluster, write_scene

from rayserver.common import ambfile
from rayserver.common.paths import Layout
from rayserver.jobs.jobdb import JobDB
from rayserver.jobs.procwrap import ambguard, ambient
from rayserver.jobs.procwrap import receipt as procwrap_receipt
from rayserver.jobs.procwrap.confine import ConfinementError
from rayserver.jobs.procwrap.progress import parse_rad_plan
from supervisor.util import proc_stat

ROUNDS = 100


def answering(srv: Any) -> bool:
    try:
        return srv.request("GET", "/v1/info", timeout=2)[0] == 200
    except OSError:
        return False


def rtrace_step(amb: str, rays_file: str, out: str) -> dict[str, Any]:
    return {
        "program": "rtrace",
        "args": [*AMB_ARGS, "-af", amb, "scene.oct"],
        "stdin": rays_file,
        "stdout": out,
    }


def radiance_file(proj: Path, name: str, rays_text: str) -> Path:
    """An ambient file written by one rtrace run (Radiance's own header)."""
    subprocess.run(
        [str(BIN / "rtrace"), *AMB_ARGS, "-af", name, "scene.oct"],
        cwd=proj,
        env=rad_env(),
        input=rays_text.encode(),
        stdout=subprocess.DEVNULL,
        check=True,
        timeout=60,
    )
    return proj / name


# ---------------------------------------------------------------- the check


def test_check_passes_radiance_files_and_agrees_with_lookamb(rayhome: RayHome) -> None:
    proj = make_project(rayhome)
    path = radiance_file(proj, "one.amb", rays(1))
    result = ambfile.check_file(path)
    assert result.ok and result.ncomp == 3 and result.records > 50, result
    assert ambfile.lookamb_count(path, BIN / "lookamb", rad_env()) == result.records
    assert (path.stat().st_size - result.data_offset) == result.records * 67


def test_check_finds_every_kind_of_damage(rayhome: RayHome) -> None:
    proj = make_project(rayhome)
    good = radiance_file(proj, "one.amb", rays(2)).read_bytes()
    start = ambfile.check_bytes(good).data_offset
    cases = {
        "no Radiance header": b"",
        "expected '#?RADIANCE'": b"junk" + good,
        "header never ends": good[: good.index(b"\n\n")],
        "format is 'x'": good.replace(b"FORMAT=Radiance_ambval", b"FORMAT=x"),
        "bad magic number": good[: start - 2] + b"\x00\x00" + good[start:],
        # a stretch of zeros, as a truncation under another writer's lock leaves it
        "record 5 of": good[: start + 5 * 67] + bytes(3 * 67) + good[start + 5 * 67 :],
        # a record cut short: everything after it starts mid-record
        "record 2 of": good[: start + 2 * 67 + 30] + good[start + 3 * 67 :],
        "not a multiple of the record size 67": good + good[start : start + 20],
    }
    for expected, data in cases.items():
        result = ambfile.check_bytes(data)
        assert not result.ok and expected in (result.problem or ""), (expected, result)
    zeros = ambfile.check_bytes(cases["record 5 of"])
    assert zeros.records == 5 and f"at byte {start + 5 * 67}" in (zeros.problem or "")
    assert "all zero bytes" in (zeros.problem or "")


def test_check_reads_the_record_size_from_ncomp(rayhome: RayHome) -> None:
    proj = make_project(rayhome)
    subprocess.run(
        [str(BIN / "rtrace"), *AMB_ARGS, "-cs", "5", "-af", "spec.amb", "scene.oct"],
        cwd=proj,
        env=rad_env(),
        input=rays(3).encode(),
        stdout=subprocess.DEVNULL,
        check=True,
        timeout=60,
    )
    result = ambfile.check_file(proj / "spec.amb")
    assert result.ok and result.ncomp == 5 and result.record_size == 69, result
    assert ambfile.lookamb_count(proj / "spec.amb", BIN / "lookamb", rad_env()) == result.records


# ---------------------------------------------------------------- the creation


def test_the_steps_that_write_an_ambient_file(tmp_path: Path) -> None:
    (tmp_path / "opts").write_text("-ab 1 -af fromfile.amb\n")
    use = ambient.use_of
    assert use("rpict", ["-af", "a.amb", "-af", "b.amb", "x.oct"], str(tmp_path)).rel == "b.amb"
    assert use("rtrace", ["-af", "a.amb", "-aa", "0", "x.oct"], str(tmp_path)) is None
    assert use("rcontrib", ["-af", "a.amb", "x.oct"], str(tmp_path)) is None
    assert use("oconv", ["-af", "a.amb"], str(tmp_path)) is None
    assert use("rtrace", ["@opts", "x.oct"], str(tmp_path)).rel == "fromfile.amb"
    spectral = use("rtrace", ["-cs", "7", "-af", "s.amb", "x.oct"], str(tmp_path))
    assert spectral.ncomp == 7 and not spectral.rgb
    plan = parse_rad_plan(
        "\toconv -f sky.rad > scene.oct\n"
        "\trpict -vf v.vf -ab 1 -af room.amb -x 64 -y 64 scene.oct > /dev/null\n"
        "\trpict -vf v.vf -ab 1 -af room.amb -x 64 -y 64 scene.oct > v.hdr\n"
    )
    uses = ambient.uses_of_step("rad", ["demo.rif"], str(tmp_path), plan)
    assert [u.rel for u in uses] == ["room.amb"]
    # shell steps (sh -x -c TEXT, sh -x SCRIPT): the simple commands, line by line
    text = 'oconv a.rad > s.oct && X=1 rpict -af p.amb s.oct > p.hdr; rtrace -af "$n.amb" s'
    uses = ambient.uses_of_step("sh", ["-x", "-c", text], str(tmp_path))
    assert [u.rel for u in uses] == ["p.amb"]  # (a name the shell builds is left out)
    (tmp_path / "run.sh").write_text(
        "for v in a b; do\n  rtrace -ab 1 \\\n  -af s.amb x.oct\ndone\n"
    )
    uses = ambient.uses_of_step("sh", ["-x", "run.sh"], str(tmp_path))
    assert [u.rel for u in uses] == ["s.amb"]


def _create(args: tuple[str, str]) -> bool:
    workdir, rel = args
    use = ambient.use_of("rtrace", ["-ab", "1", "-af", rel, "scene.oct"], workdir)
    assert use is not None
    return ambient.create_missing(workdir, use)


def test_of_concurrent_creators_exactly_one_creates_a_file_radiance_uses(rayhome: RayHome) -> None:
    proj = make_project(rayhome)
    (proj / "sub").mkdir()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(6) as pool:
        made = pool.map(_create, [(str(proj), "sub/new.amb")] * 12)
    assert made.count(True) == 1, made
    assert sorted(p.name for p in (proj / "sub").iterdir()) == ["new.amb"]  # no temporary left
    empty = ambfile.check_file(proj / "sub" / "new.amb")
    assert empty.ok and empty.records == 0
    # Radiance takes it as its own: no warning, records appended after the header.
    run = subprocess.run(
        [str(BIN / "rtrace"), *AMB_ARGS, "-af", "sub/new.amb", "scene.oct"],
        cwd=proj,
        env=rad_env(),
        input=rays(4).encode(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=True,
        timeout=60,
    )
    assert run.stderr == b""
    result = ambfile.check_file(proj / "sub" / "new.amb")
    assert result.ok and result.records > 50 and result.data_offset == empty.data_offset
    info = subprocess.run(
        [str(BIN / "getinfo"), "sub/new.amb"], cwd=proj, env=rad_env(), capture_output=True
    )
    assert b"rtrace -ab 1 -af sub/new.amb scene.oct" in info.stdout


def test_creation_stays_in_the_project(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "link").symlink_to(outside)
    use = ambient.use_of("rtrace", ["-af", "link/x.amb", "s.oct"], str(proj))
    with pytest.raises(ConfinementError, match="symbolic link"):
        ambient.create_missing(str(proj), use)
    (proj / "dangling.amb").symlink_to(outside / "y.amb")
    use = ambient.use_of("rtrace", ["-af", "dangling.amb", "s.oct"], str(proj))
    assert ambient.create_missing(str(proj), use) is False  # the name exists: left alone
    assert list(outside.iterdir()) == []


def job_log(srv: Any, job_id: int) -> str:
    status, text = srv.request("GET", f"/v1/jobs/{job_id}/log")
    assert status == 200 and isinstance(text, str), text
    return text


# ---------------------------------------------------------------- the rounds


def _write_rays(proj: Path) -> None:
    for i in range(8):
        (proj / f"rays{i}.txt").write_text(rays(100 + i))


def _server_round(srv: Any, k: int, prefix: str = "srv") -> tuple[str, list[dict[str, Any]]]:
    """N jobs, submitted back to back, each an rtrace that names the new file."""
    name = f"{prefix}{k}.amb"
    ids = [
        submit(srv, [rtrace_step(name, f"rays{i}.txt", f"o{i}.dat")])["id"]
        for i in range(writers_in_round(k))
    ]
    return name, [wait_final(srv, i, timeout=120) for i in ids]


def _overlapped(jobs: list[dict[str, Any]]) -> bool:
    """Did at least two of the jobs run at the same time (server-side times)?"""
    spans = sorted((j["started_at"], j["ended_at"]) for j in jobs)
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))


@pytest.mark.slow
def test_rounds_of_concurrent_first_writers(server_factory: Any, rayhome: RayHome) -> None:
    rayhome.write_hosts(f'testhost 8 projects="{rayhome.projects}"\n')
    proj = make_project(rayhome)
    _write_rays(proj)
    srv = server_factory("-f")
    wait_until(lambda: answering(srv), 20, "server answering")
    t0 = time.monotonic()
    damaged, overlapping = [], 0
    for k in range(ROUNDS):
        name, jobs = _server_round(srv, k)
        assert [j["state"] for j in jobs] == ["done"] * len(jobs), jobs
        logs = [job_log(srv, j["id"]) for j in jobs]
        assert all(not j["warnings"] for j in jobs), "\n".join(logs)
        assert sum(f"created the ambient file {name} " in log for log in logs) == 1, logs
        overlapping += _overlapped(jobs)
        problem = check(proj / name, BIN / "lookamb", rad_env())
        if problem:
            damaged.append((name, problem))
    server_time = time.monotonic() - t0
    t0 = time.monotonic()
    # Four rounds at a time: a writer that opens the file before another has written
    # its header sleeps 2 s in Radiance (ambient.c), so rounds mostly wait.
    with ThreadPoolExecutor(4) as pool:
        direct = list(pool.map(lambda k: direct_round(proj, k, BIN, rad_env()), range(ROUNDS)))
    direct_time = time.monotonic() - t0
    direct_damaged = [r for r in direct if r.problem]
    waited = sum(r.seconds > 1.9 for r in direct)
    print(
        f"\n{ROUNDS} rounds of 4-8 first writers: through rayserver {len(damaged)} damaged "
        f"({overlapping} rounds with overlapping jobs, {server_time:.1f} s); "
        f"Radiance alone {len(direct_damaged)} damaged, {waited} rounds with a writer that "
        f"waited 2 s for another's header ({direct_time:.1f} s, 4 rounds at a time)"
    )
    for r in direct_damaged:
        print(f"  direct {r.name} ({r.writers} writers): {r.problem}")
    assert damaged == []


SPLIT_ROUNDS = 10


def _creators(cluster: Any, name: str) -> int:
    """How many part jobs, on all servers, created the ambient file (their logs say)."""
    made = 0
    for srv in cluster.servers:
        for job in jobs_of(srv):
            if name in job["steps"][0]["args"]:
                status, log = api(srv, "GET", f"/v1/jobs/{job['id']}/log")
                assert status == 200 and isinstance(log, str), log
                made += f"created the ambient file {name} " in log
    return made


def test_split_parts_on_two_servers_share_a_new_ambient_file(tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path, 2, cpus=4)
    try:
        write_scene(cluster.project)
        (cluster.project / "rays.txt").write_text("".join(rays(200 + i, 150) for i in range(8)))
        t0 = time.monotonic()
        for k in range(SPLIT_ROUNDS):
            parts = writers_in_round(k)
            proc = cluster.rayfront(
                "run", "--json", "--hosts", "all", "--parts", str(parts),
                "--stdin", "rays.txt", "--stdout", f"split{k}.dat",
                "--", "rtrace", *AMB_ARGS, "-af", f"split{k}.amb", "scene.oct",
            )  # fmt: skip
            summary = as_json(proc)
            assert proc.returncode == 0, proc.stderr
            assert len(summary["parts"]) == parts
            assert {p["host"] for p in summary["parts"]} == set(cluster.names)
            problem = check(cluster.project / f"split{k}.amb", BIN / "lookamb", rad_env())
            assert problem is None, (k, problem)
            assert _creators(cluster, f"split{k}.amb") == 1
        elapsed = time.monotonic() - t0
        print(f"\n{SPLIT_ROUNDS} split rounds of 4-8 parts on 2 servers: intact ({elapsed:.1f} s)")
    finally:
        cluster.stop()


def _rtrace_pids(home: RayHome) -> list[int]:
    pids = []
    for pid in our_pids(home.path):
        with contextlib.suppress(OSError):
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            if argv0 == str(BIN / "rtrace").encode():
                pids.append(pid)
    return pids


def test_a_file_damaged_during_a_step_is_a_warning_on_the_job(
    server_factory: Any, rayhome: RayHome
) -> None:
    proj = make_project(rayhome)
    (proj / "many.txt").write_text(rays(9, 20000))
    srv = server_factory("-f")
    wait_until(lambda: answering(srv), 20, "server answering")
    job = submit(srv, [rtrace_step("hurt.amb", "many.txt", "many.dat")])
    amb = proj / "hurt.amb"
    header = len(ambfile.empty_file(""))  # about the procwrap's header: records follow it
    # Radiance has written its first records (it is past opening the file)...
    wait_until(lambda: amb.exists() and amb.stat().st_size > header + 4 * 67, 60, "records")
    pids = wait_until(lambda: _rtrace_pids(rayhome), 10, "the rtrace of the job")
    # ...and is frozen while another "writer" (this test) zeroes its second record,
    # which Radiance never reads again (it reads only what others append).
    os.kill(pids[0], signal.SIGSTOP)
    try:
        start = ambfile.check_file(amb).data_offset
        with open(amb, "r+b") as f:
            f.seek(start + 67)
            f.write(bytes(67))
    finally:
        os.kill(pids[0], signal.SIGCONT)
    final = wait_final(srv, job["id"], timeout=120)
    assert final["state"] == "done" and final["exit_status"] == 0, final
    assert len(final["warnings"]) == 1, final
    assert "the ambient file hurt.amb is damaged: record 1 of" in final["warnings"][0]
    assert f"at byte {start + 67} is damaged (all zero bytes)" in final["warnings"][0]
    assert f"rayserver: warning: {final['warnings'][0]}" in job_log(srv, job["id"])
    shown = rayfront(rayhome, "status", str(job["id"]), cwd=proj)
    assert (
        shown.returncode == 0 and "warnings: the ambient file hurt.amb is damaged" in shown.stdout
    )


def _begin_append(path: Path, record: bytes) -> int:
    """A writer in mid-append, as Radiance's ambsync is: locked, part of a record written."""
    fd = os.open(path, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    os.lseek(fd, 0, os.SEEK_END)
    os.write(fd, record[:30])
    return fd


def _end_append(fd: int, record: bytes) -> None:
    os.write(fd, record[30:])
    fcntl.lockf(fd, fcntl.LOCK_UN)
    os.close(fd)


def test_a_step_reads_an_ambient_file_in_only_between_appends(
    server_factory: Any, rayhome: RayHome
) -> None:
    proj = make_project(rayhome)
    radiance_file(proj, "busy.amb", rays(5))
    shutil.copy(proj / "busy.amb", proj / "direct.amb")
    _write_rays(proj)
    start = ambfile.check_file(proj / "busy.amb").data_offset
    record = (proj / "busy.amb").read_bytes()[start : start + 67]
    # Radiance alone: its opening read takes no lock (its first F_RDLCK is a no-op), so it
    # sees the half record, truncates it under the writer, and the rest lands past the end.
    # (This asserts Radiance's own behaviour: it shows that the scene below is a real one.)
    fd = _begin_append(proj / "direct.amb", record)
    opener = subprocess.Popen(
        [str(BIN / "rtrace"), *AMB_ARGS, "-af", "direct.amb", "scene.oct"],
        cwd=proj, env=rad_env(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:

        def opener_read() -> bool:  # (the size after its truncation, if any)
            st = os.fstat(fd)
            return ambguard.read_through(opener.pid, st.st_dev, st.st_ino, st.st_size)

        wait_until(opener_read, 30, "the opener read the file")
        _end_append(fd, record)
        _, err = opener.communicate(rays(6).encode(), timeout=60)
    finally:
        if opener.poll() is None:
            opener.kill()
            opener.wait()
    assert b"ignoring last 0 values in ambient file (corrupted)" in err
    assert not ambfile.check_file(proj / "direct.amb").ok
    # Through rayserver: the job's program starts only once the append is complete.
    srv = server_factory("-f")
    wait_until(lambda: answering(srv), 20, "server answering")
    fd = _begin_append(proj / "busy.amb", record)
    try:
        job = submit(srv, [rtrace_step("busy.amb", "rays0.txt", "busy.dat")])
        wait_until(lambda: get(srv, job["id"])["state"] == "running", 30, "job running")
        time.sleep(1.0)  # a bounded look for what must not happen: its rtrace started
        assert _rtrace_pids(rayhome) == []
    finally:
        _end_append(fd, record)
    final = wait_final(srv, job["id"], timeout=120)
    assert final["state"] == "done" and final["warnings"] == [], final
    assert "ignoring" not in job_log(srv, job["id"])
    result = ambfile.check_file(proj / "busy.amb")
    assert result.ok and result.records > 100, result


# A reader as Radiance's opening of an existing file is: it reads the file through, and
# then (here: stopped, as a preempted process is) has not yet compared its position
# with the file's end, which it truncates to without a lock when they differ.
_READ_THEN_STOP = """
import os, signal, sys
with open(sys.argv[1], "rb") as f:
    f.read()
    os.kill(os.getpid(), signal.SIGSTOP)
    sys.stdin.read()
"""


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, text: str) -> None:
        self.lines.append(text)


def _locked_by_another(path: Path) -> bool:
    """Would a writer (another process) have to wait for the file's lock?"""
    probe = (
        "import fcntl, sys; fcntl.lockf(open(sys.argv[1], 'r+b'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    )
    tried = subprocess.run(
        [sys.executable, "-c", probe, str(path)], capture_output=True, timeout=30
    )
    return tried.returncode != 0


def test_the_read_guard_holds_until_the_reader_is_past_its_length_check(
    tmp_path: Path,
) -> None:
    amb = tmp_path / "a.amb"
    amb.write_bytes(ambfile.empty_file("rtrace -af a.amb", ncomp=3, rgb=True))
    log = _Log()
    guard = ambguard.ReadGuard(log, str(tmp_path), ["a.amb"])
    reader = subprocess.Popen(
        [sys.executable, "-c", _READ_THEN_STOP, str(amb)], stdin=subprocess.PIPE
    )
    try:
        guard.started(reader.pid, whole_group=False)
        wait_until(lambda: proc_stat(reader.pid).state == "T", 30, "the reader read and stopped")
        time.sleep(0.3)  # a bounded look for what must not happen: the lock let go
        assert _locked_by_another(amb), "released while the reader had not checked the length"
        os.kill(reader.pid, signal.SIGCONT)  # it goes on and waits for its input (asleep)
        wait_until(lambda: not _locked_by_another(amb), 30, "the lock released")
        assert log.lines == []
    finally:
        guard.release()
        reader.kill()
        reader.communicate(timeout=30)


def test_the_read_guard_survives_the_receipt_reading_the_file(tmp_path: Path) -> None:
    # Just before a step starts, its receipt hashes the step's inputs, the ambient file
    # among them, through a descriptor of its own. Closing that must not drop the guard's
    # lock (a POSIX fcntl lock of the process would go with it).
    amb = tmp_path / "a.amb"
    amb.write_bytes(ambfile.empty_file("rtrace -af a.amb", ncomp=3, rgb=True))
    log = _Log()
    guard = ambguard.ReadGuard(log, str(tmp_path), ["a.amb"])
    try:
        assert _locked_by_another(amb), log.lines
        hashed = procwrap_receipt._project_hash(str(tmp_path), str(amb))
        assert hashed["size"] == amb.stat().st_size, hashed
        assert _locked_by_another(amb), "the guard's lock went with the receipt's descriptor"
    finally:
        guard.release()
    assert not _locked_by_another(amb)


def _procwrap_sh(home: Path, proj: Path, text: str) -> tuple[dict[str, Any], str]:
    """A shell step run by a real procwrap from a real job database (as jobspec resolves it)."""
    db = JobDB(Layout(home, "testhost").db_path)
    env = rad_env()
    job = db.submit(
        name=None, priority=0, client="127.0.0.1", location="projects", project=proj.name,
        workdir=str(proj),
        steps=[{"program": "sh", "path": "/bin/sh", "args": ["-c", text], "sh": text,
                "stdin": None, "stdout": None}],
        env={"RAYPATH": env["RAYPATH"], "PATH": env["PATH"]},
    )  # fmt: skip
    assert db.mark_starting(job)
    subprocess.run(
        [sys.executable, "-m", "rayserver.procwrap", "--db", str(db.path), "--job", str(job)],
        env={**os.environ, "RAYFRONT_HOME": str(home)},
        capture_output=True,
        timeout=120,
        check=False,
    )
    return db.public(db.get(job)), db.log_path(job).read_text()


def test_writers_started_by_one_shell_step_share_a_new_file(rayhome: RayHome) -> None:
    proj = make_project(rayhome)
    _write_rays(proj)
    for k in range(5):
        name = f"shell{k}.amb"
        writers = " ".join(
            f"rtrace {' '.join(AMB_ARGS)} -af {name} scene.oct < rays{i}.txt > o{i}.dat &"
            for i in range(writers_in_round(k))
        )
        job, log = _procwrap_sh(rayhome.path, proj, f"{writers} wait")
        assert job["state"] == "done" and job["warnings"] == [], log
        assert f"created the ambient file {name} " in log
        assert check(proj / name, BIN / "lookamb", rad_env()) is None
