"""POST /v1/jobs/batch against a real server: order, all-or-nothing, and the client's method.

One server for every case (each start costs seconds on a loaded machine);
the jobs are real oconv runs.
"""

from __future__ import annotations

from typing import Any

from rayserver.client.connection import Client, ClientError, Target

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
