"""The HTTP API's behaviour on a real server: info, token, errors, limits, listing, cancel, log.

Each test starts ``python -m rayserver -f`` (shared fixtures) and talks to it
over 127.0.0.1. Jobs are tiny real Radiance runs; the pixel-level and
process-level checks are in test_jobs_e2e.py.
"""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import RayHome

from rayserver.common import radiance
from rayserver.common.settings import Settings

BIN = radiance.bin_dir(Settings())
# Tests that edit the hosts file, list every job or read the whole log opt out.
pytestmark = pytest.mark.shared_server
# A lamp over a floor and a wall: with -ab, rpict has real work to do.
SCENE = """\
void light bright 0 0 3 100 100 100
bright sphere lamp 0 0 4 2 2 2.5 0.3
void plastic grey 0 0 5 .6 .6 .6 0 0
grey polygon floor 0 0 12 0 0 0  4 0 0  4 4 0  0 4 0
grey polygon wall 0 0 12 0 4 0  4 4 0  4 4 3  0 4 3
"""


def raw(
    home: RayHome,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    token: bool = True,
) -> tuple[int, dict[str, str], bytes]:
    hdrs = dict(headers or {})
    if token and home.token():
        hdrs["Authorization"] = f"Bearer {home.token()}"
    conn = http.client.HTTPConnection("127.0.0.1", home.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def error_of(status: int, body: Any, expected: int, *words: str) -> str:
    assert status == expected, body
    assert isinstance(body, dict) and body.get("status") == expected, body
    message = body["error"]
    for word in words:
        assert word in message, message
    return message


def make_project(home: RayHome, name: str = "p") -> Path:
    proj = home.projects / name
    proj.mkdir()
    (proj / "pts.txt").write_text("0 0 0 0 0 1\n")
    (proj / "scene.rad").write_text(SCENE)
    (proj / "scene.oct").write_bytes(b"")
    return proj


def tiny(**over: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "location": "projects",
        "project": "p",
        "steps": [
            {"program": "oconv", "args": ["scene.rad"], "stdin": None, "stdout": "scene.oct"},
            {
                "program": "rtrace",
                "args": ["-h", "scene.oct"],
                "stdin": "pts.txt",
                "stdout": "out.txt",
            },
        ],
    }
    job.update(over)
    return job


def slow(seconds_hint: str = "600") -> dict[str, Any]:
    """A render that runs for many seconds (it is cancelled or interrupted, never awaited)."""
    return tiny(
        steps=[
            {"program": "oconv", "args": ["scene.rad"], "stdin": None, "stdout": "scene.oct"},
            {
                "program": "rpict",
                "args": [
                    "-vp",
                    "2",
                    "-1",
                    "2",
                    "-vd",
                    "0",
                    "1",
                    "-0.5",
                    "-x",
                    seconds_hint,
                    "-y",
                    seconds_hint,
                    "-ab",
                    "3",
                    "-ad",
                    "4096",
                    "scene.oct",
                ],
                "stdin": None,
                "stdout": "slow.hdr",
            },
        ]
    )


def answering(srv: Any) -> bool:
    try:
        return srv.request("GET", "/v1/info", timeout=2)[0] == 200
    except OSError:
        return False


def start(server_factory: Any) -> Any:
    srv = server_factory("-f")
    deadline = time.monotonic() + 20
    while not answering(srv):
        assert time.monotonic() < deadline, srv.output
        time.sleep(0.05)
    return srv


def final(srv: Any, job_id: int) -> dict[str, Any]:
    status, job = srv.request("GET", f"/v1/jobs/{job_id}?wait=60", timeout=90)
    assert status == 200 and job["state"] in ("done", "failed", "cancelled", "interrupted")
    return job


# ------------------------------------------------------------------ tests


def test_info_is_open_and_complete(server: Any, rayhome: RayHome) -> None:
    status, info = server.request("GET", "/v1/info", token=False)
    assert status == 200, info
    assert info["hostname"] == "testhost" and info["cpus"] == 2
    assert info["locations"] == ["projects"]
    assert info["radiance_version"].startswith("RADIANCE")
    assert (info["running"], info["queued"]) == (0, 0)
    assert info["auth"] is True and info["tls"] is False and info["executor"] == "local"
    assert len(info["load"]) == 3
    assert info["pid"] != server.proc.pid  # the worker answers, not the supervisor


def test_token_is_required_for_jobs(server: Any) -> None:
    status, body = server.request("GET", "/v1/jobs", token=False)
    error_of(status, body, 401, "token")
    status, body = server.request("POST", "/v1/jobs", tiny(), token="not-the-token")
    error_of(status, body, 401, "wrong token")


def test_submit_answers_201_with_location(server: Any, rayhome: RayHome) -> None:
    make_project(rayhome)
    status, headers, body = raw(
        rayhome,
        "POST",
        "/v1/jobs",
        json.dumps(tiny(name="t")).encode(),
        {"Content-Type": "application/json"},
    )
    job = json.loads(body)
    assert status == 201, job
    assert headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["name"] == "t" and job["priority"] == 0 and job["client"] == "127.0.0.1"
    assert job["state"] in ("queued", "running", "done")
    assert [s["program"] for s in job["steps"]] == ["oconv", "rtrace"]
    assert "path" not in job["steps"][0]  # the server's own paths stay inside
    done = final(server, job["id"])
    assert done["state"] == "done" and done["exit_status"] == 0
    assert (rayhome.projects / "p" / "out.txt").read_text().strip()


@pytest.mark.shared_server(False)
def test_bad_submissions_get_clear_errors(server: Any, rayhome: RayHome) -> None:
    make_project(rayhome)
    good = json.dumps(tiny()).encode()
    status, _, body = raw(rayhome, "POST", "/v1/jobs", good, {"Content-Type": "text/plain"})
    error_of(status, json.loads(body), 415, "Content-Type: application/json", "text/plain")
    status, _, body = raw(
        rayhome, "POST", "/v1/jobs", b'{"location": ', {"Content-Type": "application/json"}
    )
    error_of(status, json.loads(body), 400, "not valid JSON", "line 1")
    status, _, body = raw(rayhome, "POST", "/v1/jobs", b"", {"Content-Type": "application/json"})
    error_of(status, json.loads(body), 400, "empty request body")
    status, body = server.request("POST", "/v1/jobs", tiny(priority="urgent"))
    error_of(status, body, 422, "priority", "whole number")
    status, body = server.request(
        "POST", "/v1/jobs", tiny(steps=[{"program": "rtrace", "args": ["-h", 3]}])
    )
    error_of(status, body, 422, "steps[0].args[1]")
    status, body = server.request("POST", "/v1/jobs", tiny(project="nothere"))
    error_of(status, body, 404, "'nothere' does not exist")
    status, body = server.request("POST", "/v1/jobs", tiny(project="../.."))
    error_of(status, body, 403, "'..'")
    status, body = server.request("POST", "/v1/jobs", tiny(location="archive"))
    error_of(status, body, 404, "'archive' is not known", "projects")
    # the refusal is logged with the client's address
    deadline = time.monotonic() + 5
    while not any("archive" in line and "127.0.0.1" in line for line in server.lines):
        assert time.monotonic() < deadline, server.output
        time.sleep(0.05)
    status, listing = server.request("GET", "/v1/jobs")
    assert status == 200 and (listing["jobs"], listing["next"]) == ([], None)


def test_limits_from_settings(server_factory: Any, rayhome: RayHome) -> None:
    settings = rayhome.path / "config" / "rayserver.toml"
    settings.write_text(
        settings.read_text() + "max_body_bytes = 2000\nmax_steps = 3\n"
        "max_args = 5\nmax_arg_length = 50\n"
    )
    srv = start(server_factory)
    make_project(rayhome)
    status, _, body = raw(
        rayhome,
        "POST",
        "/v1/jobs",
        json.dumps(tiny(name="x" * 3000)).encode(),
        {"Content-Type": "application/json"},
    )
    error_of(status, json.loads(body), 413, "at most 2000 bytes")
    step = {"program": "rtrace", "args": [], "stdin": None, "stdout": None}
    status, body = srv.request("POST", "/v1/jobs", tiny(steps=[step] * 4))
    error_of(status, body, 422, "max_steps", "at most 3")
    status, body = srv.request("POST", "/v1/jobs", tiny(steps=[dict(step, args=["-h"] * 6)]))
    error_of(status, body, 422, "max_args", "steps[0].args")
    status, body = srv.request("POST", "/v1/jobs", tiny(steps=[dict(step, args=["a" * 51])]))
    error_of(status, body, 422, "max_arg_length", "steps[0].args[0]")


@pytest.mark.shared_server(False)
def test_location_added_while_running_is_accepted(
    server: Any, rayhome: RayHome, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    (archive / "p").mkdir(parents=True)
    (archive / "p" / "scene.rad").write_text("void light l 0 0 3 1 1 1\n")
    rayhome.write_hosts(f'testhost 2 projects="{rayhome.projects}" archive="{archive}"\n')
    # No SIGHUP, no waiting for the file watcher: an unknown name triggers one reload.
    status, body = server.request(
        "POST",
        "/v1/jobs",
        {
            "location": "archive",
            "project": "p",
            "steps": [{"program": "oconv", "args": ["scene.rad"], "stdout": "scene.oct"}],
        },
    )
    assert status == 201, body
    assert final(server, body["id"])["state"] == "done"
    assert (archive / "p" / "scene.oct").stat().st_size > 0


def test_bad_ids_and_parameters(server: Any) -> None:
    for method, path, expected, words in [
        ("GET", "/v1/jobs/999", 404, "no job 999"),
        ("DELETE", "/v1/jobs/999", 404, "no job 999"),
        ("GET", "/v1/jobs/999/log", 404, "no job 999"),
        ("GET", "/v1/jobs/abc", 400, "whole number"),
        ("GET", "/v1/jobs/0", 400, "whole number"),
        ("GET", "/v1/jobs?state=bogus", 400, "'bogus'"),
        ("GET", "/v1/jobs?limit=0", 400, "limit"),
        ("GET", "/v1/jobs?limit=ten", 400, "limit"),
        ("GET", "/v1/jobs?before=-3", 400, "before"),
        ("GET", "/v1/jobs/1?wait=-1", 400, "wait"),
        ("GET", "/v1/jobs/1?wait=301", 400, "wait"),
        ("GET", "/v1/jobs/1?wait=nan", 400, "wait"),
        ("GET", "/v1/jobs/1/log?offset=-1", 400, "offset"),
        ("GET", "/v1/jobs/1/log?follow=yes", 400, "follow"),
        ("GET", "/v1/nothing", 404, "not found"),
        ("PUT", "/v1/jobs", 405, "not allowed"),
    ]:
        status, body = server.request(method, path)
        error_of(status, body, expected, *words)


def test_cancel_queued_at_once_running_later_final_409(
    server_factory: Any, rayhome: RayHome
) -> None:
    rayhome.write_hosts(f'testhost 1 projects="{rayhome.projects}"\n')
    make_project(rayhome)
    srv = start(server_factory)
    running = srv.request("POST", "/v1/jobs", slow())[1]
    queued = srv.request("POST", "/v1/jobs", tiny(priority=-1))[1]
    deadline = time.monotonic() + 20
    while srv.request("GET", f"/v1/jobs/{running['id']}")[1]["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status, body = srv.request("DELETE", f"/v1/jobs/{queued['id']}")
    assert status == 200 and body["state"] == "cancelled", body
    status, body = srv.request("DELETE", f"/v1/jobs/{running['id']}")
    assert status == 200 and body["cancel_requested"] is True
    assert final(srv, running["id"])["state"] == "cancelled"
    status, body = srv.request("DELETE", f"/v1/jobs/{running['id']}")
    error_of(status, body, 409, "already ended", "cancelled")
    status, listing = srv.request("GET", "/v1/jobs?state=cancelled")
    assert [j["id"] for j in listing["jobs"]] == [queued["id"], running["id"]]
    status, listing = srv.request("GET", "/v1/jobs?state=done,running")
    assert listing["jobs"] == []


def test_log_with_offset(server: Any, rayhome: RayHome) -> None:
    make_project(rayhome)
    job = server.request("POST", "/v1/jobs", tiny())[1]
    final(server, job["id"])
    status, text = server.request("GET", f"/v1/jobs/{job['id']}/log")
    assert status == 200 and isinstance(text, str) and "rtrace" in text
    status, rest = server.request("GET", f"/v1/jobs/{job['id']}/log?offset=7")
    assert rest == text[7:]
    status, rest = server.request("GET", f"/v1/jobs/{job['id']}/log?offset=999999")
    assert status == 200 and rest == ""


@pytest.mark.parametrize("body", [b"[]", b'"job"', b"null"])
def test_json_that_is_not_an_object(server: Any, rayhome: RayHome, body: bytes) -> None:
    status, _, answer = raw(rayhome, "POST", "/v1/jobs", body, {"Content-Type": "application/json"})
    error_of(status, json.loads(answer), 422, "must be a JSON object")


@pytest.mark.shared_server(False)
def test_malformed_request_is_one_log_line_not_a_traceback(server) -> None:
    """A header with a NUL byte: aiohttp answers 400; our log gets one line, no traceback."""
    import socket as _socket

    with _socket.create_connection(("127.0.0.1", server.home.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.split(b" ", 2)[1] == b"400", answer
    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline:
        text = server.home.log_file.read_text()
        if "malformed HTTP request refused" in text:
            break
        time.sleep(0.05)
    assert "malformed HTTP request refused" in text, text
    assert "Traceback" not in text
    status, _ = server.request("GET", "/v1/info")
    assert status == 200
