"""Daemon mode: detaching, the pid file, start-up failures reaching the shell, the systemd unit."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from services import need_service

from rayserver.common.settings import Settings
from tests.conftest import REPO, RayHome, http_request, our_pids


def run_d(
    home: RayHome, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rayserver", *args],
        env=env or home.env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=home.path.parent,
    )


@pytest.fixture
def daemon_home(rayhome: RayHome):
    """The home of a test's daemons; everything carrying it is stopped afterwards."""
    yield rayhome
    for _ in range(100):
        left = our_pids(rayhome.path)
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if _ < 50 else signal.SIGKILL)
        time.sleep(0.1)


def daemon_pid(out: subprocess.CompletedProcess[str]) -> int:
    match = re.search(r"^Rayserver (\d+) switching to daemon mode\.$", out.stdout, re.M)
    assert out.returncode == 0 and match, out.stdout + out.stderr
    return int(match.group(1))


def wait_gone(pid: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state == "Z":
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still alive")


def test_daemon_mode_detaches_and_serves(daemon_home: RayHome) -> None:
    t0 = time.monotonic()
    out = run_d(daemon_home)  # the default is daemon mode
    elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    match = re.search(r"^Rayserver (\d+) switching to daemon mode\.$", out.stdout, re.M)
    assert match, out.stdout
    pid = int(match.group(1))
    assert elapsed < 10
    assert daemon_home.pid_file.read_text().strip() == str(pid)
    # Detached: not a session leader, no terminal, cwd /, stdio /dev/null.
    assert os.getsid(pid) != pid and os.getsid(pid) != os.getsid(0)
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
    status, info = http_request(daemon_home, "GET", "/v1/info")
    assert status == 200 and isinstance(info, dict)
    worker = info["pid"]
    assert int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid
    assert f"Rayserver {pid} running." in daemon_home.log_file.read_text()

    os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    wait_gone(worker)
    assert not daemon_home.pid_file.exists(), "the pid file is removed at exit"
    assert "*System Exit* (caught signal 15)" in daemon_home.log_file.read_text()


def test_live_pid_file_is_refused(daemon_home: RayHome) -> None:
    first = run_d(daemon_home, "-d")
    assert first.returncode == 0, first.stderr
    pid = daemon_pid(first)
    for args in (["-d"], ["-f"]):
        again = run_d(daemon_home, *args)
        assert again.returncode == 1
        assert f"Rayserver {pid} is already running" in again.stderr
        assert str(daemon_home.pid_file) in again.stderr
    assert daemon_home.pid_file.read_text().strip() == str(pid)
    os.kill(pid, signal.SIGQUIT)
    wait_gone(pid)


def test_stale_pid_file_is_replaced(daemon_home: RayHome) -> None:
    daemon_home.pid_file.parent.mkdir(parents=True, exist_ok=True)
    # A pid that is alive (ours) but holds no lock: a reused pid is not mistaken for a server.
    daemon_home.pid_file.write_text(f"{os.getpid()}\n")
    out = run_d(daemon_home, "-d")
    assert out.returncode == 0, out.stderr
    pid = daemon_pid(out)
    assert daemon_home.pid_file.read_text().strip() == str(pid)
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    assert not daemon_home.pid_file.exists()


def test_pid_file_replaced_by_someone_else_is_left_alone(daemon_home: RayHome) -> None:
    out = run_d(daemon_home, "-d")
    pid = daemon_pid(out)
    daemon_home.pid_file.unlink()
    daemon_home.pid_file.write_text("12345\n")
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    assert daemon_home.pid_file.read_text() == "12345\n", "removed only if still ours"


def test_bind_failure_reaches_the_shell_before_detaching(daemon_home: RayHome) -> None:
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", daemon_home.port))
        blocker.listen()
        env = daemon_home.env | {"RAYSERVER_BIND_RETRY_SECS": "0.1"}
        out = run_d(daemon_home, "-d", env=env)
    assert out.returncode == 1
    text = out.stdout + out.stderr
    assert text.count("Socket Error: (98, 'Address already in use')") == 3
    assert "retrying in 0.1 secs..." in text
    assert "switching to daemon mode" not in text
    assert not daemon_home.pid_file.exists()


def test_unopenable_log_refuses_daemon_mode_but_not_foreground(
    daemon_home: RayHome, server_factory
) -> None:
    (daemon_home.path / "srvlogs").write_text("a file where the log folder belongs")
    out = run_d(daemon_home, "-d")
    assert out.returncode == 1
    assert f"cannot open log file {daemon_home.log_file}" in out.stderr
    assert "Not a directory" in out.stderr or "File exists" in out.stderr
    srv = server_factory("-f", wait=None)
    srv.wait_for(f"cannot open log file {daemon_home.log_file}")
    srv.wait_for("running.")


def test_worker_boot_failure_in_background_fails_the_command(tmp_path: Path) -> None:
    """The readiness pipe: a worker that dies while booting makes `-d` exit non-zero."""
    script = tmp_path / "d.py"
    script.write_text(f"""
import logging, sys
sys.path.insert(0, {str(REPO)!r})
from supervisor.core import Supervisor
from supervisor.daemon import detach
from supervisor.sockets import bind_with_retries
sock = bind_with_retries("127.0.0.1", 0)
ready = detach(on_ready=lambda pid: f"Toy {{pid}} switching to daemon mode.",
               on_silence="toy: background start failed")
def on_ready(pid, first):
    ready.ready()
code = Supervisor(sock, lambda s, r: 78, on_ready=on_ready).run()  # EX_CONFIG: a start-up error
ready.fail(code, f"toy: worker failed while starting (exit code {{code}})")
sys.exit(code)
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 78
    assert "toy: worker failed while starting (exit code 78)" in out.stderr
    assert "switching" not in out.stdout


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    need_service("systemd")
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None
    rayserver = Path(sys.executable).parent / "rayserver"
    assert rayserver.exists(), "the rayserver console script is installed in the venv"
    text = (REPO / "conf" / "rayserver.service").read_text()
    assert re.search(r"^ExecStart=\S*rayserver -d -u \S+ -g \S+", text, re.M)
    assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", text, re.M)
    assert re.search(r"^PIDFile=.*/srvlogs/.*\.pid$", text, re.M)
    assert re.search(r"^Restart=on-failure$", text, re.M)
    watchdog = re.search(r"^WatchdogSec=(\d+)$", text, re.M)
    assert watchdog and int(watchdog[1]) > Settings().worker_timeout, "above worker_timeout"
    assert re.search(r"^NotifyAccess=main$", text, re.M), "pings come from the main (pid file) pid"
    assert re.search(r"^Environment=RAYFRONT_HOME=", text, re.M)
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={rayserver}", text, flags=re.M)
    unit = tmp_path / "rayserver.service"
    unit.write_text(text)
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [
        line for line in (out.stdout + out.stderr).splitlines() if "rayserver.service" in line
    ]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr


def test_daemon_mode_takes_systemds_watchdog_across_the_detach(
    daemon_home: RayHome, tmp_path: Path
) -> None:
    """As under Type=forking: WATCHDOG_PID names the process systemd started, not the daemon."""
    import socket

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(30)
        env = daemon_home.env | {
            "NOTIFY_SOCKET": str(tmp_path / "notify"),
            "WATCHDOG_USEC": "1000000",
        }
        out = subprocess.run(
            ["sh", "-c", 'WATCHDOG_PID=$$ exec "$0" -m rayserver -d', sys.executable],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=daemon_home.path.parent,
        )
        pid = daemon_pid(out)
        assert notify.recv(64) == b"WATCHDOG=1"  # sent by the daemon, another pid
        assert notify.recv(64) == b"WATCHDOG=1"
    finally:
        notify.close()
    assert "systemd watchdog: WATCHDOG=1 every 0.5 s" in daemon_home.log_file.read_text()
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
