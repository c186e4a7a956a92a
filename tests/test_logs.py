"""Server log: line format, rotation (moved file, SIGUSR1), a full disk, colour on a tty."""

from __future__ import annotations

import logging
import os
import pty
import re
import signal
import subprocess
import sys
import time

import pytest

from rayserver.daemon.logsetup import ResilientFileHandler
from tests.conftest import RayHome


def wait_text(path, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path}")


def test_rotation_by_move_and_by_usr1(server) -> None:
    log = server.home.log_file
    log.rename(log.with_name("testhost.1"))
    # A refused request is logged by the worker: its handler must write to a new file.
    status, _ = server.request("GET", "/v1/jobs", token="wrong-token-1234567890")
    assert status == 401
    wait_text(log, "refused GET /v1/jobs")
    log.rename(log.with_name("testhost.2"))
    os.kill(server.proc.pid, signal.SIGUSR1)
    text = wait_text(log, "SIGUSR1: log files reopened")
    assert re.search(rf"^\S+ \S+ \[{server.proc.pid}\] INFO supervisor: ", text, re.M)


def test_full_disk_does_not_stop_the_server(rayhome: RayHome, server_factory) -> None:
    (rayhome.path / "srvlogs").mkdir()
    rayhome.log_file.symlink_to("/dev/full")
    srv = server_factory("-f")
    srv.wait_for("No space left on device")
    status, _ = srv.request("GET", "/v1/info")
    assert status == 200
    assert sum("cannot write log file" in line for line in srv.lines) <= 2, "said once per process"


def test_handler_survives_write_errors(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "log"
    path.symlink_to("/dev/full")
    handler = ResilientFileHandler(path)
    logger = logging.getLogger("test.full")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for _ in range(5):
            logger.error("line")
        err = capsys.readouterr().err
        assert err.count("No space left on device") == 1
        path.unlink()
        path.write_text("")  # space is back (a regular file)
        logger.error("after")
        assert "writable again" in capsys.readouterr().err
        assert "after" in path.read_text()
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_terminal_output_is_coloured_on_a_tty(rayhome: RayHome) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rayserver", "-f"],
        env=rayhome.env,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    data = b""
    try:
        deadline = time.monotonic() + 20
        while b"running." not in data and time.monotonic() < deadline:
            try:
                data += os.read(master, 4096)
            except OSError:
                break
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
        os.close(master)
    assert b"running." in data
    assert b"\x1b[" in data, "colorlog escapes on a tty"
    assert "\x1b[" not in rayhome.log_file.read_text(), "never in the file"
