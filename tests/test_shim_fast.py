"""The shims' quick path and ``POST /v1/jobs/run``, against a real rayserver on 127.0.0.1.

Real shim scripts, real Radiance (-ab 0: byte-comparable), the server's own
/metrics counters to see how many requests a call made, and ``-X importtime``
to see which path a call took (the shims start Python with -I, which ignores
PYTHON* variables, so the test runs the script with the flag itself).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import RayHome
from jobtools import BIN, VIEW, make_project, rad_env, rayfront, wait_final, wait_until

from rayserver.client import shimfast, shimhttp

pytestmark = pytest.mark.shared_server

RAYS = b"".join(b"%.2f 1.5 1 0 0 1\n" % (0.3 + 0.1 * i) for i in range(20))


def _shim_env(home: RayHome, proj: Path) -> tuple[Path, dict[str, str]]:
    folder = proj.parent / f"shims-{proj.name}"
    proc = rayfront(home, "shim", str(folder), cwd=proj)
    assert proc.returncode == 0, proc.stderr
    env = home.env
    env.pop("RAYFRONT_TOKEN", None)
    env.pop("RAYPATH", None)
    env.update(PATH=f"{folder}:{env.get('PATH', '/usr/bin:/bin')}", PWD=str(proj))
    return folder, env


def _imports(folder: Path, proj: Path, env: dict[str, str], *args: str) -> tuple[bytes, set[str]]:
    """Run the rtrace shim with -X importtime; (its output, the modules it imported)."""
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-X", "importtime", str(folder / "rtrace"), *args],
        cwd=proj,
        env=env,
        input=RAYS,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    names = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.decode().splitlines()]
    return proc.stdout, set(names)


def _requests(srv: Any) -> dict[str, float]:
    """The server's counts of answered requests by method and status (GET /metrics)."""
    status, text = srv.request("GET", "/metrics")
    assert status == 200, text
    counts: dict[str, float] = {}
    for line in str(text).splitlines():
        if line.startswith("rayserver_http_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split("{", 1)[1].rstrip("}")] = float(value)
    return counts


@pytest.mark.shared_server(False)  # its shim edits the hosts file
def test_a_planned_call_is_one_request_without_the_full_client(
    server: Any, rayhome: RayHome
) -> None:
    proj = make_project(rayhome)
    folder, env = _shim_env(rayhome, proj)
    direct = subprocess.run(
        [str(BIN / "rtrace"), "-h", "-ab", "0", "scene.oct"],
        cwd=proj,
        env=rad_env(),
        input=RAYS,
        capture_output=True,
        check=True,
    ).stdout
    # The first call takes the full path and keeps the plan (one per user).
    out, names = _imports(folder, proj, env, "-h", "-ab", "0", "scene.oct")
    assert out == direct and "rayserver.client.shim" in names
    assert (folder / f".rayfront-plan-{os.getuid()}").is_file()
    before = _requests(server)
    out, names = _imports(folder, proj, env, "-h", "-ab", "0", "scene.oct")
    after = _requests(server)
    assert out == direct
    for heavy in ("rayserver.client.shim", "http.client", "json", "re", "socket", "ssl", "enum"):
        assert heavy not in names, heavy
    grown = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    grown = {k: v for k, v in grown.items() if v}
    # One POST /v1/jobs/run (201) and the GET /metrics of `before`; nothing else.
    assert grown == {'method="POST",code="201"': 1, 'method="GET",code="200"': 1}, grown
    # A file the plan was made from changes: the next call takes the full path again.
    hosts = rayhome.path / "config" / "hosts"
    hosts.write_text(hosts.read_text() + "\n# edited\n")
    out, names = _imports(folder, proj, env, "-h", "-ab", "0", "scene.oct")
    assert out == direct and "rayserver.client.shim" in names
    # Rewriting the shims drops the plans made for the old scripts.
    assert rayfront(rayhome, "shim", str(folder), cwd=proj).returncode == 0
    assert not list(folder.glob(".rayfront-plan-*"))


def _run_request(home: RayHome, body: bytes) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", home.port, timeout=60)
    try:
        conn.request(
            "POST",
            "/v1/jobs/run",
            body=body,
            headers={
                "Authorization": f"Bearer {home.token()}",
                "Content-Type": "application/octet-stream",
            },
        )
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _frames(data: bytes) -> list[tuple[bytes, bytes]]:
    frames, at = [], 0
    while at < len(data):
        kind, size = data[at : at + 1], int.from_bytes(data[at + 1 : at + 5], "big")
        frames.append((kind, data[at + 5 : at + 5 + size]))
        at += 5 + size
    assert at == len(data), "a frame is cut short"
    return frames


def test_run_endpoint_frames_and_refusals(server: Any, rayhome: RayHome) -> None:
    proj = make_project(rayhome)
    step = {"program": "rtrace", "args": ["-h", "-ab", "0", "scene.oct"]}
    job = {"location": "projects", "project": proj.name, "name": "frames"}
    job["steps"] = [{**step, "stdin": {"stream": True}, "stdout": {"stream": True}}]
    status, headers, body = _run_request(rayhome, json.dumps(job).encode() + b"\n" + RAYS)
    assert status == 201, body
    frames = _frames(body)
    kinds = [k for k, _ in frames]
    assert kinds[0] == b"J" and kinds[-1] == b"X" and kinds.count(b"X") == 1
    first = json.loads(frames[0][1])
    assert headers["Location"] == f"/v1/jobs/{first['id']}"
    end = json.loads(frames[-1][1])
    assert end["job"]["state"] == "done" and end["problems"] == []
    out = b"".join(p for k, p in frames if k == b"O")
    direct = subprocess.run(
        [str(BIN / "rtrace"), *step["args"]], cwd=proj, env=rad_env(), input=RAYS,
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    assert out == direct
    assert b"== done" in b"".join(p for k, p in frames if k == b"L")
    # Refused before anything is queued: the API's errors, naming what was wrong.
    for bad, code, words in (
        (b'{"location": "projects"', 400, "ended inside the job line"),
        (b"not json\n", 400, "JSON"),
        (json.dumps({**job, "location": "nowhere"}).encode() + b"\n", 404, "nowhere"),
    ):
        status, _, body = _run_request(rayhome, bad)
        assert status == code, body
        assert words in json.loads(body)["error"], body
    status, page = server.request("GET", "/v1/jobs?limit=100")
    assert [j["name"] for j in server.own(page["jobs"])] == ["frames"]


class _OldServer:
    """A loopback listener answering as a rayserver without /v1/jobs/run would (aiohttp's 404).

    It stands in for an older server, which cannot be installed here; the
    shim must then go the long way rather than report an error.
    """

    def __init__(self, answer: bytes) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(self.answer)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def _answer(ctype: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 404 Not Found\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}"
    return head.encode() + b"\r\n\r\n" + body


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (_answer("text/plain", b"404: Not Found"), None),
        (_answer("application/json", b'{"error": "no location x", "status": 404}'), 1),
    ],
)
def test_an_older_server_means_the_long_way(
    answer: bytes, expected: int | None, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    old = _OldServer(answer)
    try:
        opts = shimfast.ShimOptions(["--bin", str(BIN), "oconv", "scene.rad"])
        server = ("127.0.0.1", "127.0.0.1", old.port, None)
        assert shimfast.run_in(opts, server, "projects", "p", ["scene.rad"]) == expected
    finally:
        old.close()
    if expected is not None:
        assert "rayfront shim: oconv: rayserver on 127.0.0.1 refused: no location x" in (
            capfd.readouterr().err
        )


def test_the_shims_json_is_json() -> None:
    value = {
        "s": 'a"b\\c\n\té\udcff\u2028',
        "n": [0, -3, 2**40, None, True, False],
        "d": {"x": {"stream": True}, "": []},
    }
    text = shimhttp.dumps(value)
    assert json.loads(text) == value
    assert text == json.dumps(value, separators=(",", ":"))
    assert shimhttp.loads(json.dumps(value).encode()) == value
    with pytest.raises(ValueError):
        shimhttp.loads(b'{"a": 1} x')
    with pytest.raises(ValueError):
        shimhttp.loads(b"{oops")
    job = {"exit_status": 3, "state": "failed"}
    from rayserver.client.follow import job_exit_code

    for case in (job, {"signal": 9, "state": "failed"}, {"state": "done"}, {"state": "x"}):
        assert shimfast.exit_code(case) == job_exit_code(case)


def test_a_shim_killed_outright_has_its_job_cancelled(server: Any, rayhome: RayHome) -> None:
    """SIGKILL leaves the shim no chance to cancel: the server notices the closed connection."""
    from test_shim import _rpicts_in

    proj = make_project(rayhome)
    folder, env = _shim_env(rayhome, proj)
    args = ["rpict", *VIEW, "-x", "1200", "-y", "1200", "-ab", "3", "-ad", "2048", "scene.oct"]
    with open(proj / "out.hdr", "wb") as out:
        shim = subprocess.Popen(args, cwd=proj, env=env, stdout=out, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: _rpicts_in(proj), 60, "an rpict process")
        shim.kill()
        shim.wait(10)
        status, page = server.request("GET", "/v1/jobs?limit=10")
        (job,) = server.own(page["jobs"])
        final = wait_final(server, job["id"], 30)
        assert final["state"] == "cancelled", final
    finally:
        if shim.poll() is None:
            shim.kill()
            shim.wait(10)
    wait_until(lambda: not _rpicts_in(proj), 20, "no rpict left")


def test_hosts_shims_plan_the_servers_and_pick_the_least_busy(three_servers: Any) -> None:
    from jobtools import SCENE
    from splittools import jobs_of

    cluster = three_servers
    proj = cluster.project.parent / "shim-fast-hosts"
    proj.mkdir()
    (proj / "scene.rad").write_text(SCENE)
    folder = cluster.base / "shims-fast-hosts"
    assert cluster.rayfront("shim", str(folder), "--hosts", "all").returncode == 0
    env = cluster.client.env
    env.pop("RAYFRONT_TOKEN", None)
    env.pop("RAYPATH", None)
    env.update(PATH=f"{folder}:{env['PATH']}", PWD=str(proj))
    reference = subprocess.run(
        [str(BIN / "oconv"), "scene.rad"], cwd=proj, env=rad_env(), capture_output=True, check=True
    ).stdout
    before = sum(len(jobs_of(s)) for s in cluster.servers)
    for _ in range(2):  # the full path, then the plan's
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-X", "importtime", str(folder / "oconv"), "scene.rad"],
            cwd=proj, env=env, capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == reference
    assert "rayserver.client.shim " not in proc.stderr.decode().replace("\n", " ")
    assert "rayserver.client.shimfast" in proc.stderr.decode()
    assert sum(len(jobs_of(s)) for s in cluster.servers) == before + 2
