"""The farm on one page (issue 18 item 2): GET /v1/farm and GET /v1/farm/{host}/jobs.

Two real rayservers on 127.0.0.1 and 127.0.0.2 share a hosts file that also
names 127.0.0.3, where a real socket listens but never answers (the kernel
completes the handshake, nobody reads): the farm list must give it as not
answering with the reason within the probe timeout, not hang; and 127.0.0.4,
where a plain web server answers an HTML page (some other service).
"""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RayHome, free_port
from splittools import TOKEN, Cluster, make_cluster
from test_dashboard import SCENE, VIEW, png_size

from rayserver.server.farm import PROBE_TIMEOUT


def call(home: RayHome, path: str, token: str | None = TOKEN) -> tuple[int, Any]:
    """GET ``path`` from the server of ``home`` (at its own 127.0.0.K address)."""
    conn = http.client.HTTPConnection(home.host, home.port, timeout=90)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw[:1] in (b"{", b"[") else raw
    finally:
        conn.close()


class _NotRayserver(http.server.BaseHTTPRequestHandler):
    """Another web service at a record's address: a page, not rayserver's JSON."""

    def do_GET(self) -> None:
        body = b"<html>router login</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[tuple[Cluster, str, str]]:
    """Two servers, a silent third record and a web page as a fourth; all stopped at the end."""
    silent = socket.socket()
    silent.bind(("127.0.0.3", free_port()))
    silent.listen(8)  # never accepted: connections are made, nothing ever answers
    dead = f"127.0.0.3:{silent.getsockname()[1]}"
    web = http.server.HTTPServer(("127.0.0.4", 0), _NotRayserver)
    pager = threading.Thread(target=web.serve_forever, daemon=True)
    pager.start()
    other = f"127.0.0.4:{web.server_address[1]}"
    try:
        cluster = make_cluster(tmp_path, 2, extra_records=f"{dead} 4\n{other} 1\n")
        try:
            yield cluster, dead, other
        finally:
            cluster.stop()
    finally:
        silent.close()
        web.shutdown()
        web.server_close()
        pager.join(5)


def test_farm_lists_every_host_with_its_state(farm: tuple[Cluster, str, str]) -> None:
    cluster, dead, page = farm
    first, second = (s.home for s in cluster.servers)
    assert call(first, "/v1/farm", token=None)[0] == 401  # not open like /v1/info
    started = time.monotonic()
    status, body = call(first, "/v1/farm")
    took = time.monotonic() - started
    assert status == 200, body
    hosts = {h["name"]: h for h in body["hosts"]}
    assert list(hosts) == [*cluster.names, dead, page]  # hosts file order
    assert not hosts[page]["answering"]
    assert hosts[page]["error"].startswith("not a rayserver answer: "), hosts[page]
    me, other, silent = hosts[cluster.names[0]], hosts[cluster.names[1]], hosts[dead]
    assert me["self"] and me["answering"] and not other["self"] and other["answering"]
    for host in (me, other):
        assert host["cpus"] == 1 and host["running"] == 0 and host["queued"] == 0
        assert len(host["load"]) == 3 and host["error"] is None
    assert other["port"] == second.port and other["address"] == "127.0.0.2"
    assert not silent["answering"] and silent["record_cpus"] == 4
    assert silent["error"] == f"no answer within {PROBE_TIMEOUT:g} s"
    assert took < PROBE_TIMEOUT + 5, took
    # Cached a few seconds: a second look costs no second round of probes.
    started = time.monotonic()
    assert call(first, "/v1/farm")[1]["checked_at"] == body["checked_at"]
    assert time.monotonic() - started < 1.0


def test_farm_jobs_of_another_host(farm: tuple[Cluster, str, str]) -> None:
    cluster, dead, page = farm
    first, second = (s.home for s in cluster.servers)
    (cluster.project / "s.rad").write_text(SCENE)
    job = {
        "location": "projects",
        "project": "proj",
        "name": "on-two",
        "steps": [
            {"program": "oconv", "args": ["s.rad"], "stdout": "s.oct"},
            {
                "program": "rpict",
                "args": [*VIEW, "-x", "32", "-y", "32", "s.oct"],
                "stdout": "p.hdr",
            },
        ],
    }
    conn = http.client.HTTPConnection(second.host, second.port, timeout=30)
    conn.request(
        "POST",
        "/v1/jobs",
        body=json.dumps(job),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 201, resp.read()
    job_id = json.loads(resp.read())["id"]
    conn.close()
    status, body = call(first, f"/v1/farm/{cluster.names[1]}/jobs?limit=5")
    assert status == 200, body
    assert [j["id"] for j in body["jobs"]] == [job_id] and body["jobs"][0]["name"] == "on-two"
    # The caller's token goes along: a wrong one is refused by the other host.
    assert call(first, f"/v1/farm/{cluster.names[1]}/jobs", token="x" * 40)[0] == 401
    # Its picture, through the first server (the job done first: waited for on its host).
    assert call(second, f"/v1/jobs/{job_id}?wait=60")[1]["state"] == "done"
    status, png = call(first, f"/v1/farm/{cluster.names[1]}/jobs/{job_id}/preview.png")
    assert status == 200 and png_size(png) == (32, 25)  # (square pixels: 50 x 40 degrees)
    status, body = call(first, f"/v1/farm/{cluster.names[1]}/jobs/{job_id}/grid.png")
    assert status == 404 and "no sensor grid" in body["error"], body  # that host's answer
    status, body = call(first, f"/v1/farm/{page}/jobs")
    assert status == 502 and "answered text/html" in body["error"], body  # not passed on
    status, body = call(first, f"/v1/farm/{dead}/jobs")
    assert status == 502 and dead in body["error"], body
    status, body = call(first, "/v1/farm/nohost:1/jobs")
    assert status == 404 and cluster.names[0] in body["error"], body
