"""The supervisor: bind retries, signals, worker restarts, reloads, titles, orphans.

Two layers, both with real processes and real signals: the generic
``supervisor`` package driven by a small script with a toy worker (boot
failure, crash backoff, an exception inside the supervisor, orphans that
ignore SIGTERM), and the real ``rayserver -f`` for the manual's messages.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from supervisor.sockets import bind_with_retries
from tests.conftest import REPO, RayHome, our_pids

# --------------------------------------------------------------- generic layer

SCRIPT = textwrap.dedent("""
    import logging, os, signal, socket, sys, time
    sys.path.insert(0, {repo!r})
    from supervisor.core import Supervisor
    from supervisor.sockets import bind_with_retries

    logging.basicConfig(level=logging.DEBUG, stream=sys.stdout,
                        format="%(process)d %(levelname)s %(message)s")
    mode = sys.argv[1]
    timeout = float(sys.argv[2]) if len(sys.argv) > 2 else None
    sock = bind_with_retries("127.0.0.1", 0)
    spawns = 0

    def target(sock, link):
        if mode == "bootfail":
            return 78
        if mode.startswith("boot") and spawns <= 2:  # the first two die while starting
            if mode == "bootkill":
                os.kill(os.getpid(), signal.SIGKILL)
            return 7
        if mode == "nobeat":
            time.sleep(300)
        # Before link(): READY goes out from it, and the test's SIGTERM to the group may
        # come at once (on a busy machine it hit a worker with no handler yet: a crash).
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        link()
        if mode == "crash":
            time.sleep(0.05)
            os._exit(3)
        if mode == "orphans":
            for ignore in (False, True):
                if os.fork() == 0:       # child: double fork an orphan
                    if os.fork() == 0:
                        if ignore:
                            signal.signal(signal.SIGTERM, signal.SIG_IGN)
                        # One write: unbuffered print() makes several, and two orphans interleave.
                        os.write(1, f"orphan {{os.getpid()}} {{ignore}}\\n".encode())
                        time.sleep(300)
                        os._exit(0)
                    os._exit(0)
        while True:
            link.beat()
            time.sleep(link.beat_interval)

    def on_ready(pid, first):
        # One write, as the orphans' lines: unbuffered print() writes "\\n" on its own,
        # and an orphan's line landed in between on a busy machine (the test then hung).
        sys.stdout.flush()
        os.write(1, f"READY {{pid}} {{first}}\\n".encode())

    def on_reload():
        if mode == "hupbug":
            raise RuntimeError("bug in the reload hook")

    class Toy(Supervisor):
        def _spawn(self):
            global spawns
            spawns += 1  # the forked worker sees how many came before it
            super()._spawn()

    sup = Toy(sock, target, name="Toy", on_ready=on_ready, on_reload=on_reload,
              backoff_first=0.1, backoff_cap=0.8, kill_grace=0.5, shutdown_grace=2,
              worker_timeout=timeout, boot_timeout=2 * (timeout or 0))
    code = sup.run()
    print("EXIT", code, "restarts", sup.restarts, "hung", sup.hung_kills, flush=True)
    sys.exit(code)
""")


def run_toy(tmp_path: Path, mode: str, *args: str) -> subprocess.Popen[str]:
    script = tmp_path / "toy.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    return subprocess.Popen(
        [sys.executable, str(script), mode, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 20) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"toy supervisor did not finish:\n{out}") from None
    return out


def wait_line(proc: subprocess.Popen[str], text: str, lines: list[str], timeout: float = 10) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if text in line:
            return line
    raise AssertionError(f"no {text!r}:\n" + "\n".join(lines))


def test_worker_failing_at_boot_stops_the_supervisor_with_its_code(tmp_path: Path) -> None:
    proc = run_toy(tmp_path, "bootfail")
    out = finish(proc)
    assert proc.returncode == 78, out
    assert "failed while starting (exit code 78); not restarting" in out
    assert out.count("worker") and len(re.findall(r"worker \d+ started", out)) == 1


@pytest.mark.parametrize(
    ("mode", "how"),
    [
        ("bootkill", "killed by signal 9 (SIGKILL)"),  # the OOM killer, or kill -9, while starting
        ("bootexit", "exit code 7"),  # not a start-up error code: a crash
    ],
)
def test_worker_dying_while_starting_is_restarted(tmp_path: Path, mode: str, how: str) -> None:
    proc = run_toy(tmp_path, mode)
    lines: list[str] = []
    try:
        wait_line(proc, "READY", lines, timeout=30)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    out = "\n".join(lines) + finish(proc)
    assert proc.returncode == 0, out
    assert len(re.findall(rf"worker \d+ died while starting \({re.escape(how)}\)", out)) == 2, out
    assert "not restarting" not in out
    assert "EXIT 0 restarts 2" in out


def test_silent_worker_is_killed_and_replaced(tmp_path: Path) -> None:
    """A worker that stops beating (SIGSTOP here) is SIGKILLed and a new one started."""
    proc = run_toy(tmp_path, "beat", "2")
    lines: list[str] = []
    try:
        first = int(wait_line(proc, "READY", lines).split()[1])
        os.kill(first, signal.SIGSTOP)
        t0 = time.monotonic()
        second = int(wait_line(proc, "READY", lines, timeout=30).split()[1])
        replaced_after = time.monotonic() - t0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    out = "\n".join(lines) + finish(proc)
    assert second != first
    # Stopped right after READY, the supervisor may not have sampled a beat yet:
    # then the longer start-up limit (4 s here) applies.
    found = re.search(
        rf"worker {first} sent no heartbeat for ([\d.]+) s since (its last beat|it started) "
        r"\(limit (\d) s, worker_timeout\); killing it \(SIGKILL\)",
        out,
    )
    assert found, out
    silent, phase, limit = float(found[1]), found[2], int(found[3])
    assert limit == (2 if phase == "its last beat" else 4) and limit <= silent < limit + 10, out
    assert f"worker {first} was killed for missing its heartbeat (killed by signal 9" in out
    assert not Path(f"/proc/{first}").exists(), "the stopped worker was not reaped"
    assert replaced_after >= 2.0, replaced_after  # not before the timeout
    assert "hung 1" in out, out


def test_worker_that_never_starts_beating_is_killed_after_the_boot_timeout(tmp_path: Path) -> None:
    proc = run_toy(tmp_path, "nobeat", "0.5")  # boot timeout: 1 s
    lines: list[str] = []
    try:
        wait_line(proc, "since it started (limit 1 s", lines, timeout=30)
        wait_line(proc, "was killed for missing its heartbeat", lines, timeout=30)
        wait_line(proc, "started", lines, timeout=30)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    out = "\n".join(lines) + finish(proc)
    assert proc.returncode == 0 and "not restarting" not in out, out
    assert re.search(r"was killed for missing its heartbeat .*; restart 1 in 0\.10 s", out), out


def test_crash_loop_backs_off_and_caps(tmp_path: Path) -> None:
    proc = run_toy(tmp_path, "crash")
    lines: list[str] = []
    starts = []
    try:
        while len(starts) < 7:
            wait_line(proc, "started", lines)
            starts.append(time.monotonic())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    out = "\n".join(lines) + finish(proc)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    # 0.1, 0.2, 0.4, 0.8, 0.8, 0.8 (+ the 50 ms the toy lives): doubling, then capped.
    assert gaps[0] < 1.0, gaps
    assert gaps[2] > gaps[0] * 2, gaps
    assert all(g < 1.5 for g in gaps), gaps
    assert out.count("Toy") and "internal error. Restarting." in out
    assert "restart 6 in 0.80 s" in out


def test_exception_in_supervisor_prints_system_exit_and_logs_traceback(tmp_path: Path) -> None:
    proc = run_toy(tmp_path, "hupbug")
    lines: list[str] = []
    wait_line(proc, "READY", lines)
    os.kill(proc.pid, signal.SIGHUP)
    out = finish(proc)
    assert "*System Exit*" in out and "caught signal" not in out
    assert "Traceback (most recent call last)" in out
    assert "RuntimeError: bug in the reload hook" in out
    assert proc.returncode == 70
    assert "worker" in out and re.search(r"worker \d+ stopped", out)


def test_orphans_are_reaped_and_stopped_even_when_they_ignore_sigterm(tmp_path: Path) -> None:
    proc = run_toy(tmp_path, "orphans")
    try:
        lines: list[str] = []
        wait_line(proc, "READY", lines)
        # The orphans may announce themselves before or after READY.
        while sum(line.startswith("orphan ") for line in lines) < 2:
            wait_line(proc, "orphan", lines)
        found = [line.split()[1:] for line in lines if line.startswith("orphan ")]
        orphans = [int(pid) for pid, ignore in sorted(found, key=lambda f: f[1])]
        time.sleep(0.2)
        for pid in orphans:  # reparented to the supervisor (PR_SET_CHILD_SUBREAPER)
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            assert ppid == proc.pid
        os.kill(proc.pid, signal.SIGTERM)
        out = "\n".join(lines) + finish(proc)
        assert proc.returncode == 0
        assert "*System Exit* (caught signal 15)" in out
        assert re.search(rf"child {orphans[1]} still alive; SIGKILL", out), out
        for pid in orphans:
            assert not Path(f"/proc/{pid}").exists()
    finally:  # a failed test leaves no toy or orphan running (one process group)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_listening_socket_flags() -> None:
    sock = bind_with_retries("127.0.0.1", 0)
    try:
        assert not sock.get_inheritable(), "the listening socket must be close-on-exec"
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    finally:
        sock.close()
    six = bind_with_retries("::1", 0)
    try:
        assert six.family == socket.AF_INET6
    finally:
        six.close()


# ----------------------------------------------------------- the real server


def ps_titles() -> dict[int, str]:
    out = subprocess.run(
        ["ps", "x", "-ww", "-o", "pid=,args="], capture_output=True, text=True
    ).stdout
    return {
        int(pid): args
        for pid, _, args in (line.strip().partition(" ") for line in out.splitlines())
    }


def info_pid(server) -> int:
    status, body = server.request("GET", "/v1/info", timeout=10)
    assert status == 200, body
    return body["pid"]


def test_foreground_messages_titles_and_info(server) -> None:
    lines = server.lines
    sup = server.proc.pid
    assert re.fullmatch(r"render_server: adding channel <render_server  at \d+>", lines[0])
    assert f"render_server: Async Rayfront Server started on port {server.home.port}" in lines
    assert f"Rayserver {sup} running." in lines
    worker = info_pid(server)
    titles = ps_titles()
    home = server.home.path
    assert titles[sup] == f"rfcore -O {home}/server/start.pyo"
    assert titles[worker] == f"rfcore -O {home}/server/start.pyo worker"
    log = server.home.log_file.read_text()
    assert re.search(
        rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \[{sup}\] INFO rayserver: "
        rf"Rayserver {sup} running\.$",
        log,
        re.M,
    ), log


def test_killed_worker_is_restarted_and_clients_queue_meanwhile(server) -> None:
    old = info_pid(server)
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)
    # Sent while no worker runs: the bound socket queues it for the next worker.
    new = info_pid(server)
    elapsed = time.monotonic() - t0
    assert new != old
    server.wait_for(f"Rayserver {server.proc.pid} internal error. Restarting.")
    assert elapsed < 5, elapsed
    assert server.proc.poll() is None


@pytest.mark.parametrize(
    ("signum", "message"),
    [
        (signal.SIGINT, "*User Interrupt*"),
        (signal.SIGTERM, "*System Exit* (caught signal 15)"),
        (signal.SIGQUIT, "*System Exit* (caught signal 3)"),
    ],
)
def test_stop_signals_leave_nothing_behind(server, signum: int, message: str) -> None:
    worker = info_pid(server)
    os.kill(server.proc.pid, signum)
    assert server.proc.wait(15) == 0
    server.wait_for(message)
    assert not Path(f"/proc/{worker}").exists() or _is_zombie(worker)
    assert our_pids(server.home.path) == []
    assert not server.home.pid_file.exists()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_hup_reloads_without_closing_the_socket(server) -> None:
    worker = info_pid(server)
    home: RayHome = server.home
    home.write_settings(f'bind = "127.0.0.1"\nport = {home.port}\nlog_level = "DEBUG"\n')
    os.kill(server.proc.pid, signal.SIGHUP)
    server.wait_for("configuration reloaded (generation 1)")
    home.write_hosts("testhost two\n")
    os.kill(server.proc.pid, signal.SIGHUP)
    line = server.wait_for("configuration not reloaded")
    assert f"{home.path}/config/hosts:1:" in line
    assert info_pid(server) == worker, "HUP must not restart the worker"
    assert server.proc.poll() is None


def test_bind_retries_then_gives_up(rayhome: RayHome, server_factory) -> None:
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", rayhome.port))
        blocker.listen()
        srv = server_factory("-f", wait=None, extra_env={"RAYSERVER_BIND_RETRY_SECS": "0.2"})
        assert srv.proc.wait(20) == 1
    srv.wait_for("Giving up")
    lines = srv.lines
    assert lines.count("Socket Error: (98, 'Address already in use')") == 3, lines
    assert lines.count("retrying in 0.2 secs...") == 2, lines
    assert f"Unable to bind 127.0.0.1 port {rayhome.port} after 3 attempts" in srv.output


def test_bind_succeeds_when_the_port_frees_up(rayhome: RayHome, server_factory) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", rayhome.port))
    blocker.listen()
    try:
        srv = server_factory("-f", wait=None)  # conftest: RAYSERVER_BIND_RETRY_SECS=1
        srv.wait_for("retrying in 1 secs...")
    finally:
        blocker.close()
    srv.wait_for("running.")
    assert info_pid(srv) > 0


def test_port_zero_prints_the_real_port(rayhome: RayHome, server_factory) -> None:
    rayhome.write_settings('bind = "127.0.0.1"\nport = 0\n')
    srv = server_factory("-f")
    port = int(srv.wait_for("Async Rayfront Server started on port").rsplit(" ", 1)[1])
    assert port > 0
    rayhome.port = port
    assert info_pid(srv) > 0
