"""POST /v1/jobs/batch against a real server: order, all-or-nothing, and the client's method.

One server for every case (each start costs seconds on a loaded machine);
the jobs are real oconv runs. A split run's fallback for a server older than the batch
endpoint is checked against a loopback stand-in answering as such a server would.
"""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest

from rayserver.client.connection import Client, ClientError, Target

pytestmark = pytest.mark.shared_server

SCENE = "void light l 0 0 3 1 1 1\nl sphere s 0 0 4 0 0 2 .5\n"


def _job(name: str, **extra: Any) -> dict[str, Any]:
    step = {"program": "oconv", "args": ["scene.rad"], "stdout": f"{name}.oct"}
    return {"location": "projects", "project": "p", "name": name, "steps": [step], **extra}


def _count(server: Any) -> int:
    status, page = server.request("GET", "/v1/jobs?limit=1000")
    assert status == 200, page
    return len(page["jobs"])


def _refused(server: Any, body: Any, status: int, *words: str) -> None:
    before = _count(server)
    got, answer = server.request("POST", "/v1/jobs/batch", body)
    assert got == status, answer
    for word in words:
        assert word in answer["error"], answer
    assert _count(server) == before  # all or nothing: not one job of the batch queued


def test_batch_submit(server: Any) -> None:
    home = server.home
    (home.projects / "p").mkdir()
    (home.projects / "p" / "scene.rad").write_text(SCENE)
    client = Client(Target(home.host, "127.0.0.1", home.port), home.token())

    jobs = client.submit_batch([_job("a"), _job("b", priority=5), _job("c")])
    assert [j["name"] for j in jobs] == ["a", "b", "c"]
    ids = [j["id"] for j in jobs]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert jobs[1]["priority"] == 5
    for job_id in ids:
        assert client.job(job_id, wait=60)["state"] == "done"
    assert all((home.projects / "p" / f"{n}.oct").stat().st_size > 0 for n in "abc")

    # The bad job is named by its place and its problem; the good ones are not queued.
    _refused(server, {"jobs": [_job("d"), {**_job("e"), "location": "elsewhere"}]}, 404, "jobs[1]:")
    _refused(
        server,
        {"jobs": [_job("f"), {**_job("g"), "priority": 1000}]},
        422,
        "jobs[1]:",
        "none of the 2",
    )
    _refused(
        server, {"jobs": [_job("h"), _job("i", after=[99999])]}, 422, "jobs[1]: after:", "99999"
    )
    _refused(server, {"jobs": []}, 422, "expected between 1 and 1000")
    _refused(server, [_job("j")], 422, '{"jobs": [job, ...]}')
    _refused(server, {"jobs": [_job("k")], "extra": 1}, 422, "'extra'")
    try:
        client.submit_batch([_job("l"), {"project": "p"}])
    except ClientError as exc:
        assert exc.status == 422 and "jobs[1]:" in str(exc)
    else:
        raise AssertionError("a batch with a bad job was accepted")

    # after naming a job of an earlier batch works as for a single submit.
    (later,) = client.submit_batch([_job("m", after=[ids[0]])])
    assert client.job(later["id"], wait=60)["state"] == "done"


class _OldServer(http.server.BaseHTTPRequestHandler):
    """Answers as a rayserver older than POST /v1/jobs/batch would (aiohttp's plain 404).

    A stand-in on 127.0.0.1: an older server cannot be installed here. Every
    request is recorded; POST /v1/jobs queues (answers 201 with a new id).
    """

    seen: ClassVar[list[tuple[str, str]]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append((self.path, body.decode()))
        if self.path != "/v1/jobs":
            data, status, ctype = b"404: Not Found", 404, "text/plain"
        else:
            job = {"id": len(self.seen), "state": "queued", "name": json.loads(body)["name"]}
            data, status, ctype = json.dumps(job).encode(), 201, "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_split_falls_back_to_one_post_per_part_on_an_older_server(tmp_path: Path) -> None:
    from conftest import make_home

    from rayserver.client.context import Context, Project
    from rayserver.client.splitplan import Part
    from rayserver.client.splitrun import Host, SplitRun
    from rayserver.common.hosts import parse_hosts_text
    from rayserver.common.paths import Layout

    home = make_home(tmp_path)
    old = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OldServer)
    thread = threading.Thread(target=old.serve_forever, daemon=True)
    thread.start()
    try:
        port = old.server_address[1]
        ctx = Context(Layout(home.path, home.host))
        project = Project("projects", "p", home.projects / "p")
        run = SplitRun(
            ctx, project, ["rtrace", "scene.oct"], hosts=[], explicit_hosts=False,
            stdin="pts", stdout=None,
        )  # fmt: skip
        record = parse_hosts_text(f'127.0.0.1:{port} 2 projects="{home.projects}"\n')
        host = Host(
            next(iter(record.records.values())), Client(Target("old", "127.0.0.1", port), None), 2
        )
        parts = [Part(i, 3, f"rays {i}", 1 / 3, ("-h", "scene.oct")) for i in range(3)]
        attempts = [run._attempt(p, host) for p in parts]
        assert run._submit_many(host, attempts) == []  # nothing left to hand out again
        paths = [path for path, _ in _OldServer.seen]
        assert paths == ["/v1/jobs/batch", "/v1/jobs", "/v1/jobs", "/v1/jobs"], paths
        assert [a.job_id for a in attempts] == [2, 3, 4] and host.running == 3
        assert not host.batch  # asked once: the next round goes one by one at once
        assert run._submit_many(host, [run._attempt(parts[0], host)]) == []
        assert [path for path, _ in _OldServer.seen][4:] == ["/v1/jobs"]
    finally:
        old.shutdown()
        old.server_close()
        thread.join(5)
