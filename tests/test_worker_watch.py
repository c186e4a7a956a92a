"""A busy machine never stops the server, and a hung worker is replaced.

Real ``rayserver -f`` processes, real signals, real CPU hogs:

- a worker SIGKILLed while it is still starting (right after the fork, as
  the OOM killer may, or a second into its start) on a machine busy with two
  CPU hogs is a crash: the supervisor restarts it and the server answers;
- a worker that exits on its own with a start-up error still stops the
  supervisor, with its message;
- a worker stopped with SIGSTOP (a hung event loop) misses its heartbeat and
  is SIGKILLed and replaced within ``worker_timeout`` and a few seconds; a
  request sent meanwhile is answered by the new worker, the job running at
  the time is adopted and ends ``done``;
- under systemd's watchdog, ``WATCHDOG=1`` datagrams reach the socket the
  test binds as ``NOTIFY_SOCKET``, never while no worker is healthy.

The times are printed (``pytest -s``) as ``watch:`` lines.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RayHome
from jobtools import get, make_project, rpict, submit, wait_final, wait_until

from supervisor.sdnotify import SystemdWatchdog, sd_notify
from supervisor.util import list_children

# Small, for a short test; not so small that a busy machine could silence a
# healthy (niced) worker's loop that long before the test stops it.
WORKER_TIMEOUT = 4.0


@contextlib.contextmanager
def cpu_hogs(n: int = 2) -> Iterator[list[int]]:
    """``n`` busy loops, children of the test in one process group of their own."""
    hogs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(n):
            hogs.append(
                subprocess.Popen(
                    [sys.executable, "-c", "while True: pass"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    process_group=hogs[0].pid if hogs else 0,
                )
            )
        yield [h.pid for h in hogs]
    finally:
        if hogs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(hogs[0].pid, signal.SIGKILL)
        for hog in hogs:
            hog.wait(10)


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\nwatch: {text}")


def info(srv: Any, timeout: float = 3) -> dict[str, Any] | None:
    """/v1/info, or None while no worker answers."""
    try:
        status, body = srv.request("GET", "/v1/info", timeout=timeout)
    except OSError:
        return None
    return body if status == 200 and isinstance(body, dict) else None


def started_workers(srv: Any) -> list[int]:
    """Worker pids in the order the supervisor started them."""
    return [
        int(m[1]) for line in list(srv.lines) if (m := re.search(r"worker (\d+) started$", line))
    ]


def new_worker(srv: Any, known: int, timeout: float = 60) -> int:
    """The pid of the next worker started after the first ``known`` ones."""
    return wait_until(
        lambda: (pids := started_workers(srv))[known:] and pids[known],
        timeout,
        f"worker number {known + 1} started",
        interval=0.002,
    )


def gone(pid: int) -> bool:
    """No such process any more: not even a zombie, so it was reaped."""
    return not Path(f"/proc/{pid}").exists()


# --------------------------------------------------- killed while starting


def mid_start(pid: int) -> bool:
    """The worker is well into its start: its fork server runs (its event loop does not yet)."""
    return bool(list_children(pid))


@pytest.mark.parametrize(
    ("when", "mid"),
    [("right after the fork (as the OOM killer may)", False), ("once its fork server ran", True)],
)
def test_worker_killed_while_starting_on_a_busy_machine_is_restarted(
    server_factory: Any,
    rayhome: RayHome,
    capsys: pytest.CaptureFixture[str],
    when: str,
    mid: bool,
) -> None:
    srv = server_factory("-f")
    first = wait_until(lambda: info(srv), 30, "server answering")["pid"]
    killed: list[int] = []
    with cpu_hogs(2):
        t0 = time.monotonic()
        os.kill(first, signal.SIGKILL)
        for _ in range(2):  # each one while it starts, after the previous restart
            pid = new_worker(srv, len(killed) + 1)
            if mid:
                wait_until(lambda p=pid: mid_start(p), 60, "the fork server started", 0.002)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        answer = wait_until(lambda: info(srv, timeout=10), 120, "an answer after the restarts")
        took = time.monotonic() - t0
    assert answer["pid"] not in (first, *killed)
    assert srv.proc.poll() is None, srv.output
    for pid in killed:  # not ready yet when killed: the supervisor saw no ready byte
        assert f"worker {pid} died while starting (killed by signal 9 (SIGKILL))" in srv.output
    assert "not restarting" not in srv.output
    assert all(gone(pid) for pid in (first, *killed))
    report(
        capsys,
        f"{len(killed)} workers SIGKILLed while starting, {when}, two CPU hogs: "
        f"answering again {took:.1f} s after the first kill",
    )


def test_start_up_error_still_stops_the_server_with_its_message(
    server_factory: Any, rayhome: RayHome
) -> None:
    db = rayhome.path / "srvstate" / "jobs.sqlite3"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not a database at all\n" * 200)
    with cpu_hogs(2):
        srv = server_factory("-f", wait=None)
        assert srv.proc.wait(120) == 78, srv.output  # EX_CONFIG
    srv.wait_for("stopped (exit code 78)")  # the reader has the last lines
    assert "the job database is corrupt" in srv.output, srv.output
    assert re.search(
        r"worker \d+ failed while starting \(exit code 78\); not restarting", srv.output
    ), srv.output
    assert "Restarting" not in srv.output and len(started_workers(srv)) == 1


# ------------------------------------------------------- a stopped worker


def frozen_job(srv: Any) -> tuple[int, int]:
    """Submit a render, wait until it runs, SIGSTOP its procwrap: (job id, procwrap pid).

    The procwrap records the job's end; frozen, it cannot record it before
    the new worker has adopted the job, however fast the render is. (rpict
    itself cannot be frozen: the procwrap SIGCONTs it for progress reports.)
    """
    job = submit(srv, [rpict(64, "-ab", "1", "-aa", "0", out="held.hdr")])["id"]
    running = wait_until(
        lambda: (j := get(srv, job))["state"] == "running" and j["pid"] and j, 60, "job running"
    )
    os.kill(running["pid"], signal.SIGSTOP)
    return job, running["pid"]


def test_stopped_worker_is_replaced_and_its_job_adopted(
    server_factory: Any, rayhome: RayHome, capsys: pytest.CaptureFixture[str]
) -> None:
    rayhome.write_settings(
        f'bind = "127.0.0.1"\nport = {rayhome.port}\nworker_timeout = {WORKER_TIMEOUT}\n'
    )
    make_project(rayhome)
    srv = server_factory("-f")
    old = wait_until(lambda: info(srv), 30, "server answering")["pid"]
    job, procwrap = frozen_job(srv)
    answered: dict[str, Any] = {}

    def ask() -> None:  # sent while the worker is stopped: queued in the backlog
        answered["info"] = info(srv, timeout=WORKER_TIMEOUT + 60)
        answered["at"] = time.monotonic()

    try:
        t0 = time.monotonic()
        os.kill(old, signal.SIGSTOP)
        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        asker.join(WORKER_TIMEOUT + 70)
        assert answered.get("info"), f"no answer while the worker was stopped:\n{srv.output}"
        took = answered["at"] - t0
        assert answered["info"]["pid"] != old
        wait_until(lambda: gone(old), 30, "the stopped worker reaped")
        srv.wait_for(f"adopted job {job} (procwrap pid {procwrap})", timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(procwrap, signal.SIGCONT)
    assert wait_final(srv, job, timeout=120)["state"] == "done"
    assert re.search(
        rf"worker {old} sent no heartbeat for [\d.]+ s since its last beat "
        rf"\(limit {WORKER_TIMEOUT:g} s, worker_timeout\); killing it \(SIGKILL\)",
        srv.output,
    ), srv.output
    assert f"worker {old} was killed for missing its heartbeat" in srv.output
    assert WORKER_TIMEOUT <= took < WORKER_TIMEOUT + 15, took
    report(
        capsys,
        f"worker SIGSTOPped (worker_timeout {WORKER_TIMEOUT:g} s): a request sent "
        f"then was answered by the new worker after {took:.1f} s; job {job} adopted, "
        "done",
    )


# ------------------------------------------------------- systemd watchdog


def test_from_env_takes_the_watchdog_meant_for_this_process() -> None:
    env = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "4242", "NOTIFY_SOCKET": "/run/n"}
    dog = SystemdWatchdog.from_env(dict(env), pid=4242)
    assert dog is not None and dog.timeout == 4.0 and dog.interval == 2.0
    assert dog.address == "/run/n"
    assert SystemdWatchdog.from_env(dict(env), pid=4243) is None, "meant for another process"
    assert SystemdWatchdog.from_env({**env, "WATCHDOG_USEC": "soon"}, pid=4242) is None
    assert SystemdWatchdog.from_env({"NOTIFY_SOCKET": "/run/n"}) is None
    left = dict(env)
    SystemdWatchdog.from_env(left, pid=1)
    assert left == {}, "the worker and the simulations must not inherit them"


def test_sd_notify_reaches_path_and_abstract_sockets(tmp_path: Path) -> None:
    name = f"rayserver-test-{os.getpid()}"
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as path_sock,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract,
    ):
        path_sock.bind(str(tmp_path / "notify"))
        abstract.bind("\0" + name)
        assert sd_notify(str(tmp_path / "notify"), "WATCHDOG=1")
        assert sd_notify("@" + name, "WATCHDOG=1")
        path_sock.settimeout(5)
        abstract.settimeout(5)
        assert path_sock.recv(64) == b"WATCHDOG=1"
        assert abstract.recv(64) == b"WATCHDOG=1"
    assert not sd_notify(str(tmp_path / "nobody"), "WATCHDOG=1")


def collect_pings(sock: socket.socket, into: list[float], stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            if sock.recv(64) == b"WATCHDOG=1":
                into.append(time.time())


def log_time(line: str) -> float:
    """The wall-clock time of a log file line (``2024-05-01 12:00:00,123 ...``)."""
    stamp, ms = line[:23].split(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


def test_watchdog_pings_only_while_the_worker_is_healthy(
    server_factory: Any, rayhome: RayHome, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rayhome.write_settings(
        f'bind = "127.0.0.1"\nport = {rayhome.port}\nworker_timeout = {WORKER_TIMEOUT}\n'
    )
    pings: list[float] = []
    stop = threading.Event()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        collector = threading.Thread(target=collect_pings, args=(notify, pings, stop))
        collector.start()
        try:
            env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000"}
            srv = server_factory("-f", extra_env=env)  # no WATCHDOG_PID: meant for us
            old = wait_until(lambda: info(srv), 30, "server answering")["pid"]
            wait_until(lambda: len(pings) >= 3, 30, "three pings while healthy")
            os.kill(old, signal.SIGSTOP)
            srv.wait_for(f"worker {old} was killed for missing its heartbeat", timeout=60)
            new = new_worker(srv, 1)
            srv.wait_for(f"worker {new} ready", timeout=60)
            seen = len(pings)
            wait_until(lambda: len(pings) > seen, 30, "pings again once the new worker is ready")
        finally:
            stop.set()
            collector.join(10)
    log = rayhome.log_file.read_text().splitlines()
    killed_at = log_time(next(x for x in log if f"worker {old} sent no heartbeat" in x))
    ready_at = log_time(next(x for x in log if f"worker {new} ready" in x))
    # Log times are truncated to the millisecond: 10 ms of slack on each side.
    silent = [t for t in pings if killed_at + 0.01 < t < ready_at - 0.01]
    assert not silent, (killed_at, ready_at, pings)
    assert "systemd watchdog: WATCHDOG=1 every 1 s while the worker is healthy" in srv.output
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    report(
        capsys,
        f"watchdog: {len(pings)} pings, every {min(gaps):.2f}-{max(gaps):.2f} s; "
        f"none for {ready_at - killed_at:.1f} s between the kill of the stopped "
        "worker and the new one's ready",
    )
