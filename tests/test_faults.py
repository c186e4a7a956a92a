"""Fault injection against a real rayserver: worker kills, shutdown under load, a full
log disk, a corrupt or locked job database, a hosts file deleted or broken while running.

Every test runs ``python -m rayserver -f`` (supervisor, worker, fork server,
procwraps) with real Radiance programs, real signals and real SQLite, through
the shared ``server_factory`` fixture, whose finalizer ends whatever is left.
Our processes are found by the test's unique RAYFRONT_HOME (environment or
title), never by name. The long tests carry ``@pytest.mark.faults``; CI runs
them too.

Counts for the closing note are printed (``pytest -s``) as ``faults:`` lines.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import HOSTNAME, RayHome, our_pids
from jobtools import BIN, SETTINGS, get, make_project, rpict, submit, wait_final, wait_until
from services import need_service

from rayserver.common import radiance

# Worker restarts in the kill test come quickly; the default backoff (doubling
# to 30 s) would make 20 kills take minutes (see rayserver/cli.py).
FAST_RESTART = {"RAYSERVER_RESTART_BACKOFF": "0.01,0.05"}


# ------------------------------------------------------------------ helpers


def info(srv: Any) -> dict[str, Any] | None:
    """/v1/info, or None while no worker answers."""
    try:
        status, body = srv.request("GET", "/v1/info", timeout=3)
    except OSError:
        return None
    return body if status == 200 and isinstance(body, dict) else None


def job_log(srv: Any, job_id: int) -> str:
    status, text = srv.request("GET", f"/v1/jobs/{job_id}/log")
    assert status == 200 and isinstance(text, str), text
    return text


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[-1].split()


def radiance_argv(home: RayHome) -> dict[int, list[str]]:
    """pid -> argv of live Radiance processes with this test's home in their environment."""
    found = {}
    for pid in our_pids(home.path):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        except OSError:
            continue
        if argv and Path(argv[0]).parent == BIN:
            found[pid] = argv
    return found


def radiance_pids(home: RayHome) -> dict[int, str]:
    """pid -> program name of live Radiance processes started for this test's home."""
    return {pid: Path(argv[0]).name for pid, argv in radiance_argv(home).items()}


def live_procwrap(pid: int) -> bool:
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return False
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().split()
    except OSError:
        return False
    return any(w.endswith("procwrap.pyo") for w in words) and any(
        w.startswith("job=") for w in words
    )


def stray_radiance(home: RayHome) -> list[str]:
    """Radiance processes that are not inside a live procwrap's session.

    A procwrap leads its own session and runs each step in a process group
    of that session; it exits only after the step group is empty. So a
    Radiance process whose session leader is not a live procwrap is an
    orphan. (Checked twice: one that exits between the reads is no orphan.)
    Not a simulation and so not counted: the worker's ``rpict -version``
    probe for /v1/info, which runs at each worker start in the worker's session.
    """
    stray = []
    for pid, argv in radiance_argv(home).items():
        if argv[1:] == ["-version"]:
            continue
        prog = " ".join([Path(argv[0]).name, *argv[1:]])
        fields = _stat_fields(pid)
        if fields is None:
            continue
        sid, start = int(fields[3]), fields[19]
        if live_procwrap(sid):
            continue
        again = _stat_fields(pid)
        if again is not None and again[19] == start and again[0] != "Z":
            stray.append(f"{prog} pid {pid} in session {sid} (no live procwrap leads it)")
    return stray


class StraySampler:
    """Looks for Radiance processes outside a live procwrap, every few ms, in a thread."""

    def __init__(self, home: RayHome) -> None:
        self.home = home
        self.found: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.found += stray_radiance(self.home)
            self.samples += 1
            self._stop.wait(0.1)

    def __enter__(self) -> StraySampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def stop_server(srv: Any, timeout: float = 30) -> tuple[int, float]:
    """SIGTERM the supervisor; (exit code, seconds until every process of ours was gone)."""
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(timeout)
    wait_until(
        lambda: not our_pids(srv.home.path),
        timeout,
        "every process of ours gone:\n" + "\n".join(_describe(p) for p in our_pids(srv.home.path)),
    )
    return code, time.monotonic() - t0


def _describe(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        cmd = "?"
    return f"{pid}: {cmd}"


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\nfaults: {text}")


# ------------------------------------------------------------------ worker kills


@pytest.mark.slow
@pytest.mark.faults
def test_worker_killed_20_times_while_40_jobs_run(
    server_factory: Any, rayhome: RayHome, capsys: pytest.CaptureFixture[str]
) -> None:
    make_project(rayhome)  # the test home's host record has 2 cpus
    srv = server_factory("-f", extra_env=FAST_RESTART)
    first = wait_until(lambda: info(srv), 20, "server answering")
    rng = random.Random(4)
    ids: list[int] = []
    kills = 0
    worker = first["pid"]
    with StraySampler(rayhome) as sampler:
        for round_ in range(20):
            # Where the kill lands: right after the submits (dispatch, launch, the
            # procwrap's claim), while a render runs (adoption), or anywhere.
            mode = (0, 1, 1, 2)[round_ % 4]
            if mode == 0:  # from an idle server, so that the new jobs start at once
                for i in ids:
                    wait_final(srv, i, timeout=120)
            for _ in range(2):
                n = len(ids)
                # 0.25-0.5 s each here (-aa 0: no ambient cache to make it vary); when
                # the kill is to hit a render, ~4x longer, so that it outlasts a new
                # worker's start on a busy machine (a warm procwrap starts jobs within
                # milliseconds, and a render over before the new worker is up is
                # finished by its procwrap alone: nothing to adopt).
                ids.append(
                    submit(
                        srv,
                        [
                            rpict(
                                (90 if mode == 1 else 36) + 6 * (n % 4),
                                "-ab",
                                "1",
                                "-ad",
                                "1024",
                                "-aa",
                                "0",
                                out=f"k{n}.hdr",
                            )
                        ],
                    )["id"]
                )
            if mode == 0:
                time.sleep(rng.uniform(0.0, 0.02))
            elif mode == 1:
                # A new worker is up in ~0.3 s: kill early in the render so that
                # it often still runs then and gets adopted.
                wait_until(
                    lambda: "rpict" in radiance_pids(rayhome).values(), 10, "a render running"
                )
                time.sleep(rng.uniform(0.0, 0.03))
            else:
                time.sleep(rng.uniform(0.0, 0.4))
            os.kill(worker, signal.SIGKILL)
            kills += 1
            fresh = wait_until(
                lambda old=worker: (i := info(srv)) and i["pid"] != old and i,
                30,
                f"a new worker after kill {round_ + 1}",
            )
            worker = fresh["pid"]
        jobs = [wait_final(srv, i, timeout=120) for i in ids]
    assert len(ids) == 40 and kills == 20
    bad = [(j["id"], j["state"], j["reason"]) for j in jobs if j["state"] != "done"]
    assert not bad, bad
    for job in jobs:
        text = job_log(srv, job["id"])
        # Exactly once: one start banner, one final summary line.
        assert text.count(f"== job {job['id']}:") == 1, text
        assert text.count("== done: exit status 0") == 1 and text.rstrip().endswith("=="), text
        assert text.count("== step 1/1:") == 1, text
        out = rayhome.projects / "room" / job["steps"][0]["stdout"]
        size = job["steps"][0]["args"][job["steps"][0]["args"].index("-x") + 1]
        res = subprocess.run(
            [str(BIN / "getinfo"), "-d", str(out)],
            capture_output=True,
            text=True,
            env=radiance.simulation_env(SETTINGS),
            timeout=30,
        )
        dims = res.stdout.split()[-4:]  # -Y <height> +X <width>: the view keeps its aspect
        assert dims[0] == "-Y" and dims[2:] == ["+X", size], (out, res.stdout)
        # Whole: every pixel of the resolution decodes.
        px = subprocess.run(
            [str(BIN / "pvalue"), "-h", "-H", "-d", str(out)],
            capture_output=True,
            text=True,
            check=True,
            env=radiance.simulation_env(SETTINGS),
            timeout=30,
        ).stdout
        assert len(px.splitlines()) == int(dims[1]) * int(size), out
        assert [o["path"] for o in job["outputs"]] == [out.name]  # not its neighbours' files
        assert job["outputs"][0]["size"] == out.stat().st_size
    assert sampler.found == [], sampler.found[:10]
    assert srv.output.count("internal error. Restarting.") == 20, srv.output[-3000:]
    code, took = stop_server(srv)
    assert code == 0, srv.output[-3000:]
    adopted = srv.output.count("INFO adopted job")
    requeued = srv.output.count("were being started by a previous worker")
    assert adopted >= 1, "no kill hit a running job: the test did not test adoption"
    report(
        capsys,
        f"worker SIGKILLs {kills} (running jobs adopted {adopted} times, half-started "
        f"jobs queued again {requeued} times), jobs {len(jobs)}, lost 0, run twice 0, "
        f"orphans seen 0 in {sampler.samples} samples, all gone {took:.1f} s after "
        "SIGTERM",
    )


# ------------------------------------------------------------------ shutdown under load


def _follow(home: RayHome, job_id: int, into: dict[int, str]) -> None:
    """Follow a job's log until the server ends the stream (or drops the connection)."""
    conn = http.client.HTTPConnection("127.0.0.1", home.port, timeout=60)
    chunks = []
    try:
        conn.request(
            "GET",
            f"/v1/jobs/{job_id}/log?follow=1",
            headers={"Authorization": f"Bearer {home.token()}"},
        )
        resp = conn.getresponse()
        while data := resp.read1(65536):
            chunks.append(data)
        into[job_id] = "complete"
    except (OSError, http.client.HTTPException) as exc:
        into[job_id] = f"cut: {exc!r}"
    finally:
        conn.close()


@pytest.mark.faults
def test_sigterm_under_load_ends_everything_and_keeps_the_queue(
    server_factory: Any, rayhome: RayHome, capsys: pytest.CaptureFixture[str]
) -> None:
    make_project(rayhome)
    # As before resume: the long renders end interrupted (tests/test_resume.py resumes).
    conf = rayhome.path / "config" / "rayserver.toml"
    conf.write_text(conf.read_text() + "resume_interrupted = false\n")
    srv = server_factory("-f")
    wait_until(lambda: info(srv), 20, "server answering")
    running = [
        submit(srv, [rpict(900, "-ab", "2", "-ad", "1024", out=f"long{i}.hdr")])["id"]
        for i in range(2)
    ]
    queued = [submit(srv, [rpict(48, out=f"q{i}.hdr")])["id"] for i in range(4)]
    wait_until(
        lambda: list(radiance_pids(rayhome).values()).count("rpict") == 2,
        20,
        "both renders running",
    )
    assert [get(srv, i)["state"] for i in running] == ["running", "running"]
    followed: dict[int, str] = {}
    followers = [
        threading.Thread(target=_follow, args=(rayhome, i, followed), daemon=True) for i in running
    ]
    for t in followers:
        t.start()
    # Polling clients as well, while the signal arrives.
    stop_polling = threading.Event()

    def poll() -> None:
        while not stop_polling.is_set():
            with contextlib.suppress(OSError):
                srv.request("GET", f"/v1/jobs/{running[0]}", timeout=5)

    pollers = [threading.Thread(target=poll, daemon=True) for _ in range(4)]
    for t in pollers:
        t.start()
    time.sleep(0.3)
    code, took = stop_server(srv)
    stop_polling.set()
    for t in [*followers, *pollers]:
        t.join(10)
    assert code == 0, srv.output[-3000:]
    assert took < 10, f"{took:.1f} s until every process of ours ended"
    assert radiance_pids(rayhome) == {}
    assert set(followed) == set(running), followed

    again = server_factory("-f")
    wait_until(lambda: info(again), 20, "restarted server answering")
    for job_id in running:
        job = get(again, job_id)
        assert job["state"] == "interrupted", job
        assert job["reason"] == "the server shut down while the job ran", job
        assert job_log(again, job_id).rstrip().endswith("=="), "log lacks its summary line"
    restarted = time.time()
    for job_id in queued:
        job = wait_final(again, job_id)
        assert job["state"] == "done" and job["started_at"] >= restarted - 1, job
    # Interrupted jobs are not started again on their own.
    assert [get(again, i)["state"] for i in running] == ["interrupted", "interrupted"]
    report(
        capsys,
        f"SIGTERM under load: everything gone in {took:.1f} s, 2 interrupted, "
        f"{len(queued)} queued jobs kept and run after restart",
    )


# ------------------------------------------------------------------ full log disk


@pytest.fixture
def tiny_srvlogs(rayhome: RayHome) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted on <home>/srvlogs (we are root); unmounted afterwards."""
    target = rayhome.path / "srvlogs"
    target.mkdir()
    need_service("root")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(target)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        need_service("tmpfs mounts", f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield target
    finally:
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_full_log_disk_server_keeps_serving_and_says_so(
    tiny_srvlogs: Path, server_factory: Any, rayhome: RayHome
) -> None:
    make_project(rayhome)
    srv = server_factory("-f")
    wait_until(lambda: info(srv), 20, "server answering")
    before = rayhome.log_file.read_text()
    filler = tiny_srvlogs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"x" * 512)
    finally:
        os.close(fd)
    # The log file's last page (tmpfs allocates 4 KiB at a time) still has room: jobs
    # write a few lines each (submitted, started, ended) until a new page is needed.
    # (Refused requests no longer do: they are logged once a minute per address.)
    for i in range(60):
        job_id = submit(srv, [rpict(8, out=f"f{i}.hdr")])["id"]
        assert wait_final(srv, job_id)["state"] == "done"
        if any("cannot write log file" in line for line in srv.lines):
            break
    line = srv.wait_for("cannot write log file", timeout=10)
    assert str(rayhome.log_file) in line and "No space left on device" in line, line
    assert "the server keeps running" in line
    assert info(srv) is not None
    # Once there is room again, logging resumes and says so.
    filler.unlink()
    later = submit(srv, [rpict(32, out="after.hdr")])["id"]
    assert wait_final(srv, later)["state"] == "done"
    srv.wait_for("is writable again", timeout=10)
    wait_until(
        lambda: f"job {later} submitted" in rayhome.log_file.read_text(),
        10,
        "log lines again after the disk had room",
    )
    assert rayhome.log_file.read_text().startswith(before)
    assert "internal error" not in srv.output


# ------------------------------------------------------------------ job database


def _seed_queue(home: RayHome, n: int) -> list[int]:
    """Put n queued jobs in the database through a server, then stop it (they stay queued)."""
    home.write_hosts(f'{HOSTNAME} 0 projects="{home.projects}"\n')  # 0 cpus: nothing starts
    from conftest import start_server, stop_everything

    srv = start_server(home, "-f")
    try:
        wait_until(lambda: info(srv), 20, "server answering")
        ids = [submit(srv, [rpict(32, out=f"s{i}.hdr")])["id"] for i in range(n)]
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0, srv.output
    finally:
        stop_everything(home, [srv.proc])
    home.write_hosts(f'{HOSTNAME} 2 projects="{home.projects}"\n')
    return ids


def _run_to_exit(home: RayHome, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rayserver", "-f"],
        env=home.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
        cwd=str(home.path.parent),
    )


def _damage_jobs_table(db: Path) -> None:
    """Overwrite the middle of a table b-tree page with junk (the page stays a page)."""
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
        root = con.execute("SELECT rootpage FROM sqlite_master WHERE name='jobs'").fetchone()[0]
    finally:
        con.close()
    with open(db, "r+b") as fh:
        fh.seek((root - 1) * page_size + 8)
        fh.write(b"\xff\x13" * 200)


@pytest.mark.parametrize("damage", ["garbage", "damaged page"])
def test_corrupt_database_stops_the_start_and_keeps_the_file(
    rayhome: RayHome, server_factory: Any, damage: str
) -> None:
    make_project(rayhome)
    _seed_queue(rayhome, 3)
    db = rayhome.path / "srvstate" / "jobs.sqlite3"
    if damage == "garbage":
        db.write_bytes(b"this is not a database at all\n" * 200)
        for side in ("-wal", "-shm"):
            db.with_name(db.name + side).unlink(missing_ok=True)
    else:
        _damage_jobs_table(db)
    original = db.read_bytes()
    res = _run_to_exit(rayhome)
    out = res.stdout + res.stderr
    assert res.returncode == 78, out  # EX_CONFIG: the worker failed while booting
    assert "the job database is corrupt" in out and "the server refuses to start" in out, out
    assert str(db) in out and "Restore it from a backup, or move it away" in out, out
    copies = [
        c for c in db.parent.glob("jobs.sqlite3.corrupt-*") if not c.name.endswith(("-wal", "-shm"))
    ]
    assert len(copies) == 1 and f"a copy for inspection is at {copies[0]}" in out, out
    assert copies[0].read_bytes() == original
    assert db.read_bytes() == original, "the corrupt file was changed"
    assert "Restarting" not in out
    assert our_pids(rayhome.path) == []


def _locked(db: Path) -> sqlite3.Connection:
    con = sqlite3.connect(db, isolation_level=None, timeout=0)
    con.execute("BEGIN EXCLUSIVE")
    return con


@pytest.mark.slow
@pytest.mark.faults
def test_database_locked_at_start(
    rayhome: RayHome, server_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A DB held with BEGIN EXCLUSIVE by another process at start.

    Held past the busy timeout (10 s): ``rayserver -f`` refuses to start with
    a message naming the file and the lock, exit 78. Held briefly: the
    server waits for it and then runs the queue. Either way no job is lost.
    """
    make_project(rayhome)
    ids = _seed_queue(rayhome, 3)
    db = rayhome.path / "srvstate" / "jobs.sqlite3"

    holder = _locked(db)
    t0 = time.monotonic()
    try:
        res = _run_to_exit(rayhome)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    refused_after = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode == 78, out
    assert f"{db}: the job database is locked by another process and stayed locked" in out, out
    assert "the server refuses to start rather than lose the queue" in out, out
    assert "Traceback" not in out and "Restarting" not in out, out
    assert our_pids(rayhome.path) == []
    con = sqlite3.connect(db)
    try:
        states = [r[0] for r in con.execute("SELECT state FROM jobs ORDER BY id")]
    finally:
        con.close()
    assert states == ["queued"] * 3

    holder = _locked(db)
    t0 = time.monotonic()
    try:
        srv = server_factory("-f", wait=None)
        time.sleep(2.0)
        assert info(srv) is None, "served while another process held the database"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    wait_until(lambda: info(srv), 30, "server answering after the lock went away")
    jobs = [wait_final(srv, i) for i in ids]
    assert [j["state"] for j in jobs] == ["done"] * 3, jobs
    for job_id in ids:
        assert job_log(srv, job_id).count(f"== job {job_id}:") == 1
    report(
        capsys,
        f"DB locked at start: refused after {refused_after:.1f} s (exit 78, "
        f"3 queued jobs kept); locked for 2 s: waited, then ran all 3 "
        f"({time.monotonic() - t0:.1f} s)",
    )


# ------------------------------------------------------------------ hosts file


def test_hosts_file_deleted_or_broken_keeps_the_last_good_one(
    server_factory: Any, rayhome: RayHome
) -> None:
    make_project(rayhome)
    srv = server_factory("-f")
    wait_until(lambda: info(srv), 20, "server answering")
    hosts = rayhome.path / "config" / "hosts"
    good = hosts.read_text()

    hosts.unlink()
    line = srv.wait_for("configuration not reloaded", timeout=10)
    assert f"{hosts}: file not found" in line and "keeping the last good one" in line, line
    assert wait_final(srv, submit(srv, [rpict(24, out="a.hdr")])["id"])["state"] == "done"

    hosts.write_text(good + 'ws-new 0 projects="/x"\nthis line is broken\n')
    bad_line = len(good.splitlines()) + 2
    line = wait_until(
        lambda: next((x for x in srv.lines if f"{hosts}:{bad_line}:" in x), None),
        10,
        "the broken line named as file:line",
    )
    assert "keeping the last good one" in line, line
    job = submit(srv, [rpict(24, out="b.hdr")])
    assert wait_final(srv, job["id"])["state"] == "done"
    # An unknown location re-reads the (still broken) file once, then refuses.
    status, body = srv.request(
        "POST", "/v1/jobs", {"location": "elsewhere", "project": "room", "steps": [rpict(24)]}
    )
    assert status == 404 and "elsewhere" in body["error"], body
    assert info(srv)["locations"] == ["projects"]

    # A fixed file is taken up at once.
    other = rayhome.projects.parent / "other"
    other.mkdir()
    hosts.write_text(f'{HOSTNAME} 2 projects="{rayhome.projects}" other="{other}"\n')
    wait_until(
        lambda: (i := info(srv)) and i["locations"] == ["other", "projects"],
        10,
        "the repaired hosts file in force",
    )
    assert "internal error" not in srv.output
