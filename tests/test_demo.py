"""`rayfront demo` end to end: a real server, a real render, a real PNG, nothing left running."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import our_pids


@pytest.mark.timeout(150)
def test_demo_renders_the_example_and_stops_its_server(tmp_path: Path) -> None:
    home = tmp_path / "demo-home"
    out = tmp_path / "out"
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAYFRONT_TOKEN"}
    env["RAYFRONT_HOSTNAME"] = "demohost"
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rayserver.client.cli",
            "demo",
            "--json",
            "--home",
            str(home),
            "--out",
            str(out),
        ],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
    )
    elapsed = time.monotonic() - started
    try:
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
        result = json.loads(proc.stdout)
        assert result["job"]["state"] == "done" and result["job"]["exit_status"] == 0
        hdr, png = Path(result["picture"]), Path(result["png"])
        assert hdr == out / "demo_room.hdr" and png == out / "demo_room.png"
        assert hdr.read_bytes().startswith(b"#?RADIANCE")
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert (width, height) == (640, 476)  # rad keeps the view's aspect within 640 x 480
        assert elapsed < 60, f"demo took {elapsed:.1f} s"
        # the server's hosts file named this machine as RAYFRONT_HOSTNAME says
        assert (home / "config" / "hosts").read_text().count("demohost 2 projects=") == 1
    finally:
        left = our_pids(home)
        assert not left, f"demo left processes running: {left}"
    print(f"demo wall time {elapsed:.1f} s")


def test_demo_refuses_a_home_that_is_in_use(tmp_path: Path) -> None:
    home = tmp_path / "used"
    (home / "config").mkdir(parents=True)
    (home / "config" / "hosts").write_text("somehost 4\n")
    proc = subprocess.run(
        [sys.executable, "-m", "rayserver.client.cli", "demo", "--home", str(home)],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    assert "not empty" in proc.stderr and str(home) in proc.stderr
    assert (home / "config" / "hosts").read_text() == "somehost 4\n"  # untouched


@pytest.mark.timeout(90)
def test_interrupted_demo_stops_its_server(tmp_path: Path) -> None:
    import os
    import signal

    home = tmp_path / "demo-home"
    env = {k: v for k, v in os.environ.items() if k != "RAYFRONT_TOKEN"}
    env["RAYFRONT_HOSTNAME"] = "demohost"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rayserver.client.cli",
            "demo",
            "--home",
            str(home),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=str(tmp_path),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = []
        assert proc.stderr is not None
        for line in proc.stderr:  # Ctrl-C as soon as the server answers
            seen.append(line)
            if "answers after" in line:
                break
        # Freeze the demo first: on a loaded machine the 1 s render could end
        # before the checks below, and the Ctrl-C would find nothing to stop.
        proc.send_signal(signal.SIGSTOP)
        assert our_pids(home), "the server should be running now:\n" + "".join(seen)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, err
    assert not our_pids(home), "the demo's server outlived the interrupted demo"
    assert f"kept {home}" not in err  # --home given: nothing to keep or remove


@pytest.mark.timeout(60)
def test_demo_reports_a_server_that_cannot_start(tmp_path: Path) -> None:
    import os

    home = tmp_path / "demo-home"
    env = {k: v for k, v in os.environ.items() if k != "RAYFRONT_TOKEN"}
    env["RAYFRONT_HOSTNAME"] = "bad!host"  # the hosts file the demo writes is then malformed
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rayserver.client.cli",
            "demo",
            "--home",
            str(home),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "rayserver exited with status" in proc.stderr
    assert "bad!host" in proc.stderr.split("while starting", 1)[1]  # the server's log tail
    assert not our_pids(home)
    assert not (tmp_path / "out").exists()
