"""The server under hostile or heavy clients (issue 14, item 4), against a real ``rayserver -f``.

- a 50 MB job log is streamed in chunks read off the event loop: other
  requests keep answering in well under 50 ms meanwhile, and the bytes
  arrive exactly;
- refused requests (no or wrong token) are logged once a minute per address,
  with a count;
- connections beyond ``max_connections_per_client`` and ``max_connections``
  are closed before any HTTP, logged the same way;
- malformed JSON of every kind is a 400 naming the problem, never a 500 or a
  traceback in the log;
- a full disk under the job database answers 507 naming the folder, loses
  nothing, and submit works again once there is space (a real tmpfs).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RayHome, stop_everything
from jobtools import wait_final, wait_until
from services import need_service
from test_openapi import document, response_validator

# Refusals are logged once a minute per address: that test keeps a server of its own.
pytestmark = pytest.mark.shared_server

LOG_BYTES = 50 * 1024 * 1024
LATENCY_BOUND = 0.050
MIN_SAMPLES = 100
PROBE_TIMEOUT = 5.0
PROBE_INTERVAL = 0.01


def tiny_job(rayhome: RayHome, project: str = "p") -> dict[str, Any]:
    proj = rayhome.projects / project
    proj.mkdir(exist_ok=True)
    (proj / "scene.rad").write_text("void light l 0 0 3 1 1 1\nl sphere s 0 0 4 0 0 0 1\n")
    step = {"program": "oconv", "args": ["scene.rad"], "stdin": None, "stdout": "scene.oct"}
    return {"location": "projects", "project": project, "steps": [step]}


def finished_job(srv: Any, rayhome: RayHome) -> dict[str, Any]:
    status, job = srv.request("POST", "/v1/jobs", tiny_job(rayhome))
    assert status == 201, job
    job = wait_final(srv, job["id"])
    assert job["state"] == "done", job
    return job


def log_file(rayhome: RayHome, job_id: int) -> Path:
    """Where the procwrap writes a job's log (JobDB.log_path)."""
    return rayhome.path / "srvstate" / "jobs" / str(job_id) / "log"


# A separate process reads the log, so its work does not share the GIL with
# the latency probe of this process.
_READER = textwrap.dedent(
    """
    import hashlib, http.client, sys
    port, token, path = sys.argv[1:4]
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=120)
    conn.request("GET", path, headers={"Authorization": "Bearer " + token})
    resp = conn.getresponse()
    digest, size = hashlib.sha256(), 0
    while chunk := resp.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    print(resp.status, size, digest.hexdigest())
    """
)


def read_log_in_background(rayhome: RayHome, path: str) -> subprocess.Popen[str]:
    token = rayhome.token()
    assert token
    return subprocess.Popen(
        [sys.executable, "-c", _READER, str(rayhome.port), token, path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def info_latencies(rayhome: RayHome, readers: list[subprocess.Popen[str]]) -> list[float]:
    """Latencies of GET /v1/info sent on a fixed schedule for as long as a reader runs.

    Each request is due PROBE_INTERVAL after the one before, and its latency
    is counted from when it was due, not from when it could be sent: a loop
    stalled for a second makes a hundred slow samples, not one (otherwise
    the many quick answers between stalls would hide them). A request
    without an answer within PROBE_TIMEOUT counts as that long, and the
    connection is made anew, so a stalled server fails the bound with its
    message rather than with a timeout.
    """
    conn = http.client.HTTPConnection("127.0.0.1", rayhome.port, timeout=PROBE_TIMEOUT)
    samples: list[float] = []
    due = time.perf_counter()
    try:
        while any(r.poll() is None for r in readers):
            due += PROBE_INTERVAL
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                conn.request("GET", "/v1/info")
                resp = conn.getresponse()
                body = resp.read()
            except TimeoutError:
                conn.close()
                body, resp = b"", None
            done = time.perf_counter()
            # Every request that fell due while this one was waiting shares its end.
            while due <= done:
                samples.append(done - due)
                due += PROBE_INTERVAL
            due -= PROBE_INTERVAL
            assert resp is None or resp.status == 200, body
    finally:
        conn.close()
    return samples


def test_50_mb_log_streams_while_other_requests_answer_fast(
    server: Any, rayhome: RayHome, capsys: pytest.CaptureFixture[str]
) -> None:
    job = finished_job(server, rayhome)
    data = random.Random(14).randbytes(LOG_BYTES)
    log_file(rayhome, job["id"]).write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    offset = 12_345_678
    want_tail = hashlib.sha256(data[offset:]).hexdigest()
    base = f"/v1/jobs/{job['id']}/log"

    samples: list[float] = []
    rounds = 0
    # Read the log (whole, from an offset, followed) until enough samples came in.
    while len(samples) < MIN_SAMPLES and rounds < 5:
        rounds += 1
        readers = [
            read_log_in_background(rayhome, base),
            read_log_in_background(rayhome, f"{base}?offset={offset}"),
            read_log_in_background(rayhome, f"{base}?follow=1"),
        ]
        try:
            samples += info_latencies(rayhome, readers)
            outs = [r.communicate(timeout=120) for r in readers]
        finally:
            for r in readers:
                if r.poll() is None:
                    r.kill()
                    r.wait()
        assert [o[0].split() for o in outs] == [
            ["200", str(LOG_BYTES), want],
            ["200", str(LOG_BYTES - offset), want_tail],
            ["200", str(LOG_BYTES), want],
        ], [o[1] for o in outs]
    lat = sorted(samples)
    median, p95 = statistics.median(lat), lat[int(len(lat) * 0.95)]
    with capsys.disabled():
        print(
            f"\nGET /v1/info every 10 ms during {rounds} x 3 reads of a 50 MB log: {len(lat)} probes, "
            f"median {median * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms"
        )
    assert len(lat) >= MIN_SAMPLES, f"only {len(lat)} requests were measured in {rounds} rounds"
    # The median is the bound asserted: p95 and max on a shared 2-core machine
    # measure the other tenants as much as this server (they are printed). The
    # samples count stalls by their length (see info_latencies), so a loop
    # blocked for more than half of the reads fails here.
    assert median < LATENCY_BOUND, (
        f"GET /v1/info took {median * 1000:.1f} ms (median; p95 {p95 * 1000:.1f} ms) while a "
        f"50 MB log was read: the log endpoint holds the event loop (bound "
        f"{LATENCY_BOUND * 1000:.0f} ms)"
    )


# ------------------------------------------------------------ refused requests


def log_text(rayhome: RayHome, start: int = 0) -> str:
    """The server's log from byte ``start`` on ("" while there is none)."""
    if not rayhome.log_file.exists():
        return ""
    return rayhome.log_file.read_bytes()[start:].decode(errors="replace")


@pytest.mark.shared_server(False)
def test_refused_requests_are_logged_once_a_minute_per_address(
    server: Any, rayhome: RayHome
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", rayhome.port, timeout=30)
    try:
        for i in range(300):
            headers = {"Authorization": "Bearer wrong-token-0123456789"} if i % 2 else {}
            conn.request("GET", "/v1/jobs", headers=headers)
            resp = conn.getresponse()
            body = json.loads(resp.read())
            assert resp.status == 401 and body["status"] == 401, body
    finally:
        conn.close()
    # Another address gets its own line: the limit is per address, not global.
    other = http.client.HTTPConnection(
        "127.0.0.1", rayhome.port, timeout=30, source_address=("127.0.0.2", 0)
    )
    try:
        other.request("DELETE", "/v1/jobs/1")
        assert other.getresponse().status == 401
    finally:
        other.close()
    wait_until(
        lambda: "refused DELETE /v1/jobs/1 from 127.0.0.2: no token" in log_text(rayhome),
        10,
        "the refusal from 127.0.0.2 in the log",
    )
    text = log_text(rayhome)
    assert text.count("refused GET /v1/jobs from 127.0.0.1") == 1, text
    assert "refused GET /v1/jobs from 127.0.0.1: no token" in text


# ------------------------------------------------------------ connection limits


def hold(source: str, port: int) -> socket.socket:
    """A keep-alive connection from ``source`` that has had one answer (so it is counted)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.recv(65536).startswith(b"HTTP/1.1 200"), "a held connection got no answer"
    return s


def refused_before_http(source: str, port: int) -> bool:
    """True when a new connection from ``source`` is closed without any HTTP answer."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    try:
        try:
            s.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = s.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""
        return answer == b""
    finally:
        s.close()


def test_connections_over_the_limits_are_closed_before_http(
    rayhome: RayHome, server_factory: Any
) -> None:
    rayhome.write_settings(
        f'bind = "127.0.0.1"\nport = {rayhome.port}\n'
        "max_connections_per_client = 4\nmax_connections = 6\n"
    )
    srv = server_factory("-f")
    wait_until(lambda: srv.request("GET", "/v1/info", timeout=2)[0] == 200, 20, "server up")
    held = [hold("127.0.0.1", rayhome.port) for _ in range(4)]
    try:
        for _ in range(5):
            assert refused_before_http("127.0.0.1", rayhome.port), "5th connection was served"
        # Other addresses still get in, up to the total.
        held += [hold("127.0.0.2", rayhome.port) for _ in range(2)]
        assert refused_before_http("127.0.0.3", rayhome.port), "7th connection was served"
        # The held ones keep working.
        held[0].sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()
    # Closed connections are no longer counted.
    wait_until(lambda: not refused_before_http("127.0.0.1", rayhome.port), 10, "room again")
    text = log_text(rayhome)
    line = next(ln for ln in text.splitlines() if "closed connection from 127.0.0.1" in ln)
    assert "before HTTP" in line and "max_connections_per_client" in line, line
    assert text.count("closed connection from 127.0.0.1") == 1, text
    assert "closed connection from 127.0.0.3" in text and "(setting max_connections)" in text


# ------------------------------------------------------------ malformed JSON

DEEP = b'{"location": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HOSTILE_BODIES = {
    "deep nesting": (DEEP, "nested too deeply"),
    "moderate nesting": (b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "at most 32 levels"),
    "5000-digit integer": (b'{"priority": ' + b"9" * 5000 + b"}", "5000 digits"),
    "huge float": (b'{"priority": 1e999}', "too large"),
    "NaN": (b'{"priority": NaN}', "NaN is not JSON"),
    "Infinity": (b'{"priority": -Infinity}', "-Infinity is not JSON"),
    "bad UTF-8": (b'{"name": "\xff\xfe"}', "not UTF-8"),
    "UTF-16": ('{"name": "x"}'.encode("utf-16"), "not UTF-8"),
    "byte order mark": (b'\xef\xbb\xbf{"name": "x"}', "byte order mark"),
    "unpaired surrogate": (b'{"project": "\\udcff"}', "unpaired surrogate"),
    "duplicate key": (b'{"project": "p", "project": "../x"}', "duplicate key 'project'"),
    "truncated": (b'{"project": "p"', "not valid JSON"),
}


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/share-probe"])
def test_malformed_json_is_a_400_naming_the_problem(
    server: Any, rayhome: RayHome, path: str
) -> None:
    token = rayhome.token()
    # (What this test logged: the shared server's log has the lines of earlier tests.)
    start = rayhome.log_file.stat().st_size if rayhome.log_file.exists() else 0
    for what, (body, words) in HOSTILE_BODIES.items():
        conn = http.client.HTTPConnection("127.0.0.1", rayhome.port, timeout=30)
        try:
            conn.request(
                "POST",
                path,
                body=body,
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
            )
            resp = conn.getresponse()
            answer = json.loads(resp.read())
        finally:
            conn.close()
        assert resp.status == 400, (what, answer)
        assert words in answer["error"] and answer["status"] == 400, (what, answer)
    assert server.request("GET", "/v1/info")[0] == 200
    text = log_text(rayhome, start)
    assert "Traceback" not in text and "internal error" not in text, text


# ------------------------------------------------------------ full disk


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[None]:
    """A tmpfs of ``size`` mounted on ``folder`` (root only); unmounted on exit."""
    need_service("root")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        need_service("tmpfs mounts", f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(path: Path) -> int:
    """Write ``path`` until the file system is full; returns the bytes written."""
    block, written = b"\0" * 65536, 0
    with open(path, "wb", buffering=0) as fh:
        while True:
            try:
                written += fh.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        with contextlib.suppress(OSError):
            # Blocks smaller than 64 KiB may still fit.
            while fh.write(b"\0" * 512):
                written += 512
    return written


def test_full_disk_under_the_job_database_is_a_507_and_loses_nothing(
    rayhome: RayHome, server_factory: Any
) -> None:
    state = rayhome.path / "srvstate"
    procs = []
    with small_tmpfs(state, "3m"):
        try:
            srv = server_factory("-f")
            procs.append(srv.proc)
            wait_until(lambda: srv.request("GET", "/v1/info", timeout=2)[0] == 200, 20, "up")
            before = finished_job(srv, rayhome)
            # An empty write-ahead log: the next write must grow a file on the full disk.
            with contextlib.closing(sqlite3.connect(state / "jobs.sqlite3")) as db:
                assert db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
            fill(state / "filler")
            answers = []
            for _ in range(50):
                status, body = srv.request("POST", "/v1/jobs", tiny_job(rayhome))
                answers.append((status, body))
                if status != 201:
                    break
            status, body = answers[-1]
            assert status == 507, answers
            doc = document()
            response_validator(doc, "/v1/jobs", "POST", 507, "application/json").validate(body)
            assert body["status"] == 507 and str(state) in body["error"], body
            assert "database or disk is full" in body["error"], body
            assert "free space there" in body["error"], body
            (state / "filler").unlink()
            after = srv.request("POST", "/v1/jobs", tiny_job(rayhome))[1]
            assert wait_final(srv, after["id"])["state"] == "done"
            assert srv.request("GET", f"/v1/jobs/{before['id']}")[1] == before
            text = log_text(rayhome)
            assert "Traceback" not in text and "internal error" not in text, text
            assert "no space left in" in text
        finally:
            # Before the unmount: the server keeps the database open.
            stop_everything(rayhome, procs)
