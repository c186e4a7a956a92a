"""Streams like ssh: ``rayfront run`` sends its standard input to the program and gives
the program's standard output back, through real rayfront and rayserver processes on
127.0.0.1 with real Radiance (rtrace -ab 0: deterministic, so bytes are compared).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import RayHome
from jobtools import BIN, RAYFRONT, get, make_project, rad_env, rayfront, submit, wait_final

pytestmark = pytest.mark.shared_server

# A grid of sensor points looking up and sideways in the test scene.
POINTS = "".join(
    f"{0.5 + 0.25 * (i % 13):.2f} {0.5 + 0.25 * (i // 13 % 13):.2f} 1.2 0 0.{i % 7 + 1} -1\n"
    for i in range(1500)
)


def _direct(proj: Path, args: list[str], data: bytes) -> bytes:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=proj,
        input=data,
        capture_output=True,
        env=rad_env(),
        check=True,
        timeout=60,
    ).stdout


def _popen(home: RayHome, proj: Path, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
    env = home.env
    env.pop("RAYFRONT_TOKEN", None)
    return subprocess.Popen([*RAYFRONT, *args], cwd=proj, env=env, start_new_session=True, **kw)


def _wait_running(srv: Any, job_id: int) -> dict[str, Any]:
    for _ in range(400):
        job = get(srv, job_id, wait=0.05)
        if job["state"] != "queued":
            return job
    raise AssertionError(f"job {job_id} never started")


def _newest_job(srv: Any) -> dict[str, Any]:
    for _ in range(400):
        status, page = srv.request("GET", "/v1/jobs?limit=1")
        assert status == 200, page
        if srv.own(page["jobs"]):
            return page["jobs"][0]
        time.sleep(0.05)
    raise AssertionError("no job was submitted")


def test_piped_points_come_back_as_direct_rtrace_bytes(server: Any, rayhome: RayHome) -> None:
    proj = make_project(rayhome)
    data = POINTS.encode()
    for args in (
        ["rtrace", "-h", "-ab", "0", "scene.oct"],
        ["rtrace", "-ff", "-h", "-ab", "0", "scene.oct"],
    ):
        proc = rayfront(rayhome, "run", "--", *args, cwd=proj, input=data)
        assert proc.returncode == 0, proc.stderr.decode()
        direct = _direct(proj, args, data)
        assert len(direct) > 10_000
        # Byte for byte (-ff: binary floats; -h: no header, whose CAPDATE names the second).
        assert proc.stdout == direct
        messages = proc.stderr.decode()
        assert "done, exit status 0" in messages and "(streamed from the client)" in messages
    job = _newest_job(server)
    assert job["steps"][0]["stdin"] == {"stream": True} == job["steps"][0]["stdout"]
    # The explicit form, with the output into a project file instead.
    explicit = rayfront(
        rayhome,
        "run",
        "--stdin",
        "-",
        "--stdout",
        "grid.txt",
        "--",
        "rtrace",
        "-h",
        "-ab",
        "0",
        "scene.oct",
        cwd=proj,
        input=data,
    )
    assert explicit.returncode == 0, explicit.stderr.decode()
    assert (proj / "grid.txt").read_bytes() == _direct(
        proj, ["rtrace", "-h", "-ab", "0", "scene.oct"], data
    )
    assert b"grid.txt" in explicit.stdout  # the summary names the file (stdout carries no stream)


def test_exit_status_is_the_programs_and_unread_input_is_fine(
    server: Any, rayhome: RayHome
) -> None:
    proj = make_project(rayhome)
    # oconv reads no input: like `yes | ssh host true`, 8 MB it never reads are no error.
    ignored = rayfront(rayhome, "run", "--", "oconv", "scene.rad", cwd=proj, input=b"x" * (8 << 20))
    assert ignored.returncode == 0, ignored.stderr.decode()
    assert ignored.stdout.startswith(b"#?RADIANCE") and b"done" in ignored.stderr
    bad = rayfront(
        rayhome, "run", "--", "rtrace", "-h", "missing.oct", cwd=proj, input=b"0 0 0 0 0 1\n"
    )
    assert bad.returncode == 2 and b"failed" in bad.stderr  # rtrace: system error -> 2
    refused = rayfront(rayhome, "submit", "--stdin", "-", "--", "rtrace", "scene.oct", cwd=proj)
    assert refused.returncode == 2 and "needs rayfront run" in refused.stderr


def test_input_left_open_does_not_hold_the_job(server: Any, rayhome: RayHome) -> None:
    """Like `sleep 30 | ssh host oconv scene.rad`: the program's end ends the run."""
    proj = make_project(rayhome)
    proc = _popen(
        rayhome,
        proj,
        "run",
        "--",
        "oconv",
        "scene.rad",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"not read\n")
        proc.stdin.flush()
        # The pipe stays open (our end is never closed) until rayfront has ended; the
        # octree and the messages are small enough for the pipes' buffers.
        assert proc.wait(timeout=60) == 0
        assert proc.stdout is not None and proc.stdout.read().startswith(b"#?RADIANCE")
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert _newest_job(server)["state"] == "done"


def test_a_client_killed_mid_upload_fails_the_job(server: Any, rayhome: RayHome) -> None:
    """The program must never see an end of input that is not the real one."""
    proj = make_project(rayhome)
    client = _popen(
        rayhome,
        proj,
        "run",
        "--stdout",
        "cut.txt",
        "--",
        "rtrace",
        "-h",
        "-ab",
        "0",
        "scene.oct",
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert client.stdin is not None
        client.stdin.write(POINTS.encode())  # whole lines: a truncation looks like success
        client.stdin.flush()
        job = _wait_running(server, _newest_job(server)["id"])
        time.sleep(0.5)
        os.killpg(client.pid, signal.SIGKILL)
        client.wait(10)
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait(10)
    final = wait_final(server, job["id"])
    assert final["state"] == "failed", final
    assert "standard input was not delivered completely" in final["reason"], final["reason"]
    assert final["signal"] == signal.SIGKILL  # killed before it could see an end of input


def _raw_put(home: RayHome, job_id: int, head: str, body: bytes) -> None:
    """A PUT whose body is cut short: the connection closes before the end."""
    token = home.token()
    with socket.create_connection(("127.0.0.1", home.port), timeout=30) as sock:
        sock.sendall(
            f"PUT /v1/jobs/{job_id}/stdin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/octet-stream\r\n{head}\r\n".encode()
            + body
        )
        time.sleep(0.5)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_cut_short_fails_the_job_either_way(
    server: Any, rayhome: RayHome, framing: str
) -> None:
    proj = make_project(rayhome)
    stream = {"stream": True}
    job = submit(
        server,
        [{"program": "rtrace", "args": ["-h", "scene.oct"], "stdin": stream, "stdout": "o.txt"}],
    )
    data = POINTS.encode()[:4000]
    if framing == "content-length":
        _raw_put(rayhome, job["id"], f"Content-Length: {len(data) * 2}\r\n", data)
    else:
        _raw_put(
            rayhome,
            job["id"],
            "Transfer-Encoding: chunked\r\n",
            f"{len(data):x}\r\n".encode() + data + b"\r\n",
        )
    final = wait_final(server, job["id"])
    assert final["state"] == "failed", final
    assert "not delivered completely" in final["reason"]
    # rtrace never saw an end of input: killed with part of its answers still buffered.
    assert final["signal"] == signal.SIGKILL
    assert (proj / "o.txt").read_text().count("\n") < data.count(b"\n")


def test_ctrl_c_cancels_a_streamed_run(server: Any, rayhome: RayHome) -> None:
    proj = make_project(rayhome)
    client = _popen(
        rayhome,
        proj,
        "run",
        "--",
        "rtrace",
        "-h",
        "scene.oct",
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        job = _wait_running(server, _newest_job(server)["id"])
        client.send_signal(signal.SIGINT)
        client.wait(30)  # (stdin stays open: its end would let rtrace finish first)
        assert client.stderr is not None
        err = client.stderr.read()
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait(10)
        assert client.stdin is not None
        client.stdin.close()
    assert client.returncode == 130, err
    assert f"interrupted; job {job['id']} on testhost cancelled" in err.decode(), err
    assert wait_final(server, job["id"])["state"] == "cancelled"


def test_a_closed_reader_stops_the_job(server: Any, rayhome: RayHome) -> None:
    """`rayfront run -- cnt ... | head`: the reader goes away, the job does not end done."""
    proj = make_project(rayhome)
    client = _popen(
        rayhome,
        proj,
        "run",
        "-q",
        "--",
        "cnt",
        "100000000",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert client.stdout is not None
        first = client.stdout.read(4096)
        client.stdout.close()
        _, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait(10)
    assert first.startswith(b"\t0\n\t1\n\t2\n")
    assert client.returncode == 141, err
    job = wait_final(server, _newest_job(server)["id"])
    assert job["state"] in ("failed", "cancelled"), job
    assert "went away" in job["reason"] or job["state"] == "cancelled", job


def test_stream_requests_are_checked(server: Any, rayhome: RayHome) -> None:
    make_project(rayhome)
    stream = {"stream": True}
    two = [
        {"program": "rtrace", "args": ["scene.oct"], "stdin": stream},
        {"program": "rtrace", "args": ["scene.oct"], "stdin": stream},
    ]
    body = {"location": "projects", "project": "room", "steps": two}
    status, answer = server.request("POST", "/v1/jobs", body)
    assert status == 422 and "only one step of a job may have a streamed stdin" in answer["error"]
    body["steps"] = [{"program": "rtrace", "args": ["scene.oct"], "stdin": {"stream": False}}]
    status, answer = server.request("POST", "/v1/jobs", body)
    assert status == 422 and "steps[0].stdin" in answer["error"], answer
    plain = submit(server, [{"program": "oconv", "args": ["scene.rad"], "stdout": "x.oct"}])
    status, answer = server.request("GET", f"/v1/jobs/{plain['id']}/stdout")
    assert status == 409 and "has no streamed stdout" in answer["error"]
    status, answer = server.request("GET", "/v1/jobs/99999/stdout")
    assert status == 404


GB = 1 << 30
BLOCK = 1 << 20


def _vm_hwm_kb(pid: int) -> int:
    """The peak resident memory of a live process (VmHWM), in kB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pids_titled(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class _Peaks(threading.Thread):
    """Samples VmHWM of the client, the worker and the job's procwrap until stopped."""

    def __init__(self, pids: dict[str, int], home: RayHome) -> None:
        super().__init__(daemon=True)
        self.pids, self.home = pids, home
        self.peak: dict[str, int] = dict.fromkeys(pids, 0)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            if "procwrap" not in self.pids:
                found = _pids_titled(f"{self.home.path}/procwrap.pyo job=")
                if found:
                    self.pids["procwrap"] = found[0]
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak.get(name, 0), _vm_hwm_kb(pid))


@pytest.mark.slow
@pytest.mark.bigstream
def test_one_gigabyte_through_stdin_and_stdout_in_constant_memory(
    server: Any, rayhome: RayHome
) -> None:
    """1 GiB in and out of `getinfo -` (it strips the header and copies the rest).

    Memory is the peak resident size (VmHWM) of each process: the client, the
    worker (compared with its peak before the run) and the job's procwrap.
    """
    proj = make_project(rayhome)
    (worker,) = _pids_titled(f"{rayhome.path}/server/start.pyo worker")
    worker_before = _vm_hwm_kb(worker)
    base = bytearray(os.urandom(BLOCK))
    sent, got = hashlib.sha1(), hashlib.sha1()
    client = _popen(
        rayhome,
        proj,
        "run",
        "-q",
        "--",
        "getinfo",
        "-",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    peaks = _Peaks({"client": client.pid, "worker": worker}, rayhome)

    def feed() -> None:
        assert client.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            client.stdin.write(b"#?RADIANCE\nFORMAT=binary\n\n")
            for i in range(GB // BLOCK):
                base[:8] = i.to_bytes(8, "big")  # every block differs: order is checked
                sent.update(base)
                client.stdin.write(base)
            client.stdin.close()

    started = time.monotonic()
    peaks.start()
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    received = 0
    try:
        assert client.stdout is not None
        while chunk := client.stdout.read1(BLOCK):
            got.update(chunk)
            received += len(chunk)
        client.wait(600)
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait(10)
        peaks.stop.set()
        peaks.join(5)
    wall = time.monotonic() - started
    feeder.join(10)
    assert client.stderr is not None
    assert client.returncode == 0, client.stderr.read().decode()
    assert received == GB and got.hexdigest() == sent.hexdigest()
    peak = peaks.peak
    print(
        f"\n1 GiB through stdin and stdout: {wall:.1f} s wall; peak RSS client "
        f"{peak['client'] / 1024:.1f} MB, worker {peak['worker'] / 1024:.1f} MB "
        f"(before {worker_before / 1024:.1f} MB), procwrap {peak.get('procwrap', 0) / 1024:.1f} MB"
    )
    assert 0 < peak["client"] < 80 * 1024
    assert peak["worker"] - worker_before < 32 * 1024
    assert 0 < peak["procwrap"] < 64 * 1024
