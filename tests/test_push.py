"""Status from memory and pushed updates, on a real server over 127.0.0.1.

The long poll (``GET /v1/jobs/{id}?wait=S&since=V``) answers promptly on a
change and after its timeout when nothing changes; ``GET /v1/events``
delivers a render's progress and its final state; the job object answered
from the worker's memory equals the one made from the database row after the
job ended. The client's fallback against a server without long polls is
tried against a tiny aiohttp app standing in for an older server (it lacks
the ``version`` field and the ``since`` parameter, as servers before them
did): nothing else of the old server can be run here.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any

import pytest
from conftest import RayHome
from test_api import error_of, final, make_project, slow, start, tiny

from rayserver.client import follow as follow_mod
from rayserver.client.connection import Client, Target
from rayserver.jobs.jobdb import JobDB

pytestmark = pytest.mark.shared_server


def job_of(srv: Any, job_id: int, query: str = "", timeout: float = 30) -> dict[str, Any]:
    status, job = srv.request("GET", f"/v1/jobs/{job_id}{query}", timeout=timeout)
    assert status == 200, job
    return job


def wait_running(srv: Any, job_id: int) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    job = job_of(srv, job_id)
    while job["state"] != "running":
        assert time.monotonic() < deadline, job
        job = job_of(srv, job_id, f"?wait=5&since={job['version']}")
    return job


def test_long_poll_answers_at_a_change_and_at_its_timeout(
    server_factory: Any, rayhome: RayHome
) -> None:
    make_project(rayhome)
    srv = start(server_factory)
    blocker = srv.request("POST", "/v1/jobs", slow())[1]
    waiting = srv.request("POST", "/v1/jobs", tiny(after=[blocker["id"]]))[1]
    assert isinstance(waiting["version"], int)  # the submit's answer can be long-polled at once
    listed = srv.request("GET", "/v1/jobs?state=queued")[1]["jobs"]
    assert waiting["id"] in [j["id"] for j in listed]  # no list from before the submit
    wait_running(srv, blocker["id"])
    # Nothing changes for the queued job: the answer comes after the wait, unchanged.
    queued = job_of(srv, waiting["id"])
    t0 = time.monotonic()
    same = job_of(srv, waiting["id"], f"?wait=1.5&since={queued['version']}")
    took = time.monotonic() - t0
    assert 1.4 <= took < 6, took
    assert same["version"] == queued["version"] and same["state"] == "queued"
    # A change (the blocker cancelled, so the waiting job too) ends the wait at once.
    answers: list[tuple[float, dict[str, Any]]] = []

    def poll() -> None:
        job = job_of(srv, waiting["id"], f"?wait=60&since={queued['version']}", timeout=90)
        answers.append((time.monotonic(), job))

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.5)
    cancelled_at = time.monotonic()
    assert srv.request("DELETE", f"/v1/jobs/{blocker['id']}")[0] == 200
    poller.join(60)
    assert answers, "the long poll never answered"
    answered_at, job = answers[0]
    assert answered_at - cancelled_at < 5, answered_at - cancelled_at  # not the 60 s
    assert job["version"] > queued["version"] and job["state"] == "cancelled", job
    assert str(blocker["id"]) in job["reason"]
    # A version this worker never gave (a previous one's, ahead of the clock): answered at once.
    t0 = time.monotonic()
    job_of(srv, waiting["id"], f"?wait=30&since={job['version'] + 10**9}")
    assert time.monotonic() - t0 < 5
    status, body = srv.request("GET", f"/v1/jobs/{waiting['id']}?wait=1&since=soon")
    error_of(status, body, 400, "since", "whole number")


def read_events(rayhome: RayHome, query: str, until: Any, timeout: float = 60) -> list[Any]:
    """(event, id, data) of GET /v1/events until ``until(events)`` is true."""
    conn = http.client.HTTPConnection("127.0.0.1", rayhome.port, timeout=timeout)
    events: list[tuple[str, str | None, Any]] = []
    try:
        conn.request(
            "GET", f"/v1/events{query}", headers={"Authorization": f"Bearer {rayhome.token()}"}
        )
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type", "").startswith(
            "text/event-stream"
        )
        kind, ident, data = "message", None, ""
        while not until(events):
            line = resp.fp.readline().decode()
            assert line, "the event stream ended"
            line = line.rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("id: "):
                ident = line[4:]
            elif line.startswith("data: "):
                data += line[6:]
            elif not line and data:
                events.append((kind, ident, json.loads(data)))
                kind, ident, data = "message", None, ""
    finally:
        conn.close()
    return events


def test_event_stream_delivers_progress_and_the_final_state(
    server_factory: Any, rayhome: RayHome
) -> None:
    make_project(rayhome)
    srv = start(server_factory)
    listing = srv.request("GET", "/v1/jobs")[1]
    job = srv.request("POST", "/v1/jobs", slow())[1]

    def of_job(events: list[Any]) -> list[dict[str, Any]]:
        return [d for k, _, d in events if k == "job" and d["id"] == job["id"]]

    def progressed(events: list[Any]) -> bool:
        return any(0 < d["progress"] < 100 and d["state"] == "running" for d in of_job(events))

    # From the list's version on: the job comes though it was submitted before the stream
    # opened (as it is at the connect: a catch-up sends the current object, not each step).
    seen = read_events(rayhome, f"?since={listing['version']}", progressed)
    assert seen[0][0] == "hello"
    states = [d["state"] for d in of_job(seen)]
    assert states[0] in ("queued", "running") and states[-1] == "running", states
    versions = [int(i) for k, i, _ in seen if k == "job"]
    assert versions == sorted(versions)
    last = of_job(seen)[-1]
    threading.Timer(0.5, srv.request, ("DELETE", f"/v1/jobs/{job['id']}")).start()
    ended = read_events(
        rayhome,
        f"?since={last['version']}",
        lambda ev: any(d["state"] == "cancelled" for d in of_job(ev)),
    )
    done = of_job(ended)[-1]
    assert done["state"] == "cancelled" and done["version"] > last["version"]
    assert done == {**final(srv, job["id"]), "outputs": done["outputs"]}
    # A version this worker never gave: the client is told to load the lists again.
    reset = read_events(rayhome, "?since=1", lambda ev: len(ev) >= 2)
    assert [k for k, _, _ in reset] == ["hello", "reset"]


def test_status_from_memory_matches_the_database(server: Any, rayhome: RayHome) -> None:
    make_project(rayhome)
    ids, answers = [], []
    for i in range(3):  # one after another: they write the same files
        ids.append(server.request("POST", "/v1/jobs", tiny(name=f"t{i}"))[1]["id"])
        answers.append(final(server, ids[-1]))
    listing = server.request("GET", "/v1/jobs?limit=10")[1]
    db = JobDB(rayhome.path / "srvstate" / "jobs.sqlite3", check=False)
    try:
        for job_id, answer in zip(ids, answers, strict=True):
            from_db = db.public(db.get(job_id))
            memory = job_of(server, job_id)
            assert answer["state"] == "done" and memory["version"] == answer["version"]
            assert {k: v for k, v in memory.items() if k != "version"} == from_db
            listed = next(j for j in listing["jobs"] if j["id"] == job_id)
            assert listed == memory
    finally:
        db.close()


# ------------------------------------------------------------------ the client


def old_server(port_box: list[int], stop: threading.Event, progress: list[float]) -> None:
    """A stand-in for a server before long polls: no version, no since (see the docstring)."""
    import asyncio

    from aiohttp import web

    requests: list[str] = []

    async def job(request: web.Request) -> web.Response:
        requests.append(request.query_string)
        if "since" in request.query:
            return web.json_response({"error": "unexpected since", "status": 400}, status=400)
        value = progress[0]
        state = "done" if value >= 100 else "running"
        return web.json_response({"id": 1, "state": state, "progress": value})

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/v1/jobs/{id}", job)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_box.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        while not stop.is_set():
            await asyncio.sleep(0.05)
        port_box.append(len(requests))
        await runner.cleanup()

    asyncio.run(main())


class Bar:
    def __init__(self) -> None:
        self.n = 0.0
        self.shown: list[float] = []

    def set_description_str(self, _desc: str, refresh: bool = False) -> None:
        pass

    def refresh(self) -> None:
        self.shown.append(self.n)


def test_client_falls_back_to_polling_without_long_polls() -> None:
    port_box: list[int] = []
    stop = threading.Event()
    progress = [10.0]
    thread = threading.Thread(target=old_server, args=(port_box, stop, progress))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not port_box:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        client = Client(Target("old", "127.0.0.1", port_box[0]), None)
        bar = Bar()
        poller = follow_mod._Poller(client, {"id": 1, "state": "queued"}, bar)
        poller.start()
        time.sleep(3 * follow_mod.POLL_SECONDS)
        progress[0] = 100.0
        poller.join(10)
        assert not poller.is_alive()
        assert poller.job["state"] == "done"
        assert 10.0 in bar.shown and bar.shown[-1] == 100.0
    finally:
        stop.set()
        thread.join(10)
    assert port_box[1] >= 3  # polled, and never with since (that one would answer 400)


def test_client_long_polls_a_server_that_sends_versions(
    server: Any, rayhome: RayHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_project(rayhome)
    client = Client(Target("testhost", "127.0.0.1", rayhome.port), rayhome.token())
    calls: list[tuple[Any, Any]] = []
    real = Client.job

    def job(self: Client, job_id: int, wait: Any = None, since: Any = None) -> dict[str, Any]:
        calls.append((wait, since))
        return real(self, job_id, wait, since)

    monkeypatch.setattr(Client, "job", job)
    submitted = client.submit(slow())
    bar = Bar()
    poller = follow_mod._Poller(client, submitted, bar)
    poller.start()
    wait_running(server, submitted["id"])
    time.sleep(1.0)
    client.cancel(submitted["id"])
    poller.join(30)
    assert not poller.is_alive() and poller.job["state"] == "cancelled"
    long_polls = [c for c in calls if c[1] is not None]
    assert long_polls and all(w == follow_mod.LONG_POLL for w, _ in long_polls)
    assert len(calls) < 12, calls  # answered at changes, not polled every 0.5 s
