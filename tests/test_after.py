"""``--after``: jobs that wait for others, through real rayfront and rayserver processes.

Real Radiance (oconv, rtrace, rpict) on 127.0.0.1; a long rpict is the predecessor that
is still running while its followers are checked, then cancelled to end the chain.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import RayHome
from jobtools import get, make_project, rayfront, rayfront_json, rpict, submit, wait_final

pytestmark = pytest.mark.shared_server


def _wait_running(srv: Any, job_id: int) -> None:
    for _ in range(600):
        if get(srv, job_id, wait=0.05)["state"] == "running":
            return
    raise AssertionError(f"job {job_id} never ran")


def test_a_chain_waits_for_a_running_job_and_is_cancelled_with_it(
    server: Any, rayhome: RayHome
) -> None:
    proj = make_project(rayhome)
    long = submit(server, [rpict(3000, "-ab", "2", out="long.hdr")])
    _wait_running(server, long["id"])
    first = rayfront_json(
        rayhome, "submit", "--after", str(long["id"]), "--", "oconv", "scene.rad", cwd=proj
    )
    second = rayfront_json(
        rayhome,
        "submit",
        "--after",
        f"{first['id']},{long['id']}",
        "--",
        "oconv",
        "scene.rad",
        cwd=proj,
    )
    assert first["after"] == [long["id"]] and first["waiting_for"] == [long["id"]]
    assert second["waiting_for"] == sorted([first["id"], long["id"]])
    # Two cpus, one busy: the followers wait for their job, not for a slot.
    assert get(server, first["id"], wait=0.5)["state"] == "queued"
    table = rayfront(rayhome, "status", cwd=proj)
    assert f"queued >{long['id']} " in table.stdout, table.stdout
    details = rayfront(rayhome, "status", str(second["id"]), cwd=proj).stdout
    assert f"waiting_for: {long['id']}, {first['id']}" in details, details

    assert rayfront(rayhome, "cancel", str(long["id"]), cwd=proj).returncode == 0
    assert wait_final(server, long["id"])["state"] == "cancelled"
    one, two = wait_final(server, first["id"]), wait_final(server, second["id"])
    assert one["state"] == two["state"] == "cancelled"
    assert one["reason"] == f"job {long['id']}, which it was to run after, ended cancelled"
    # Both of its jobs ended cancelled; the reason names the first one found.
    assert two["reason"].startswith("job ") and "ended cancelled" in two["reason"]
    assert one["started_at"] is None and two["started_at"] is None


def test_after_a_failed_job_and_after_a_done_one(server: Any, rayhome: RayHome) -> None:
    proj = make_project(rayhome)
    (proj / "pts.txt").write_text("2 2 1 0 0 -1\n1 1 1 0 0 -1\n")
    bad = rayfront_json(rayhome, "submit", "--", "oconv", "missing.rad", cwd=proj)
    run = rayfront(
        rayhome,
        "run",
        "--after",
        str(bad["id"]),
        "--stdout",
        "x.oct",
        "--",
        "oconv",
        "scene.rad",
        cwd=proj,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"job {bad['id']}, which it was to run after, ended failed" in run.stdout + run.stderr
    assert not (proj / "x.oct").exists()

    octree = rayfront_json(
        rayhome, "submit", "--stdout", "chain.oct", "--", "oconv", "scene.rad", cwd=proj
    )
    trace = rayfront(
        rayhome,
        "run",
        "--after",
        str(octree["id"]),
        "--stdin",
        "pts.txt",
        "--stdout",
        "chain.txt",
        "--",
        "rtrace",
        "-h",
        "-ab",
        "0",
        "chain.oct",
        cwd=proj,
    )
    assert trace.returncode == 0, trace.stdout + trace.stderr
    made = get(server, octree["id"])
    assert made["state"] == "done"
    last = rayfront_json(rayhome, "status", str(int(made["id"]) + 1), cwd=proj)
    assert last["state"] == "done" and last["after"] == [octree["id"]]
    assert last["started_at"] >= made["ended_at"]
    assert len((proj / "chain.txt").read_text().splitlines()) == 2


def test_unknown_ids_are_refused_at_submit(server: Any, rayhome: RayHome) -> None:
    proj = make_project(rayhome)
    known = submit(server, [{"program": "oconv", "args": ["scene.rad"]}])
    proc = rayfront(
        rayhome,
        "submit",
        "--after",
        f"{known['id']},99998,99999",
        "--",
        "oconv",
        "scene.rad",
        cwd=proj,
    )
    assert proc.returncode == 1
    assert "no job 99998, 99999 on this server" in proc.stderr and "HTTP 422" in proc.stderr
    bad = rayfront(rayhome, "submit", "--after", "3,x", "--", "oconv", "scene.rad", cwd=proj)
    assert bad.returncode == 2 and "expected job ids separated by commas" in bad.stderr
    status, body = server.request(
        "POST",
        "/v1/jobs",
        {"location": "projects", "project": "room", "steps": [{"program": "oconv"}], "after": [0]},
    )
    assert status == 422 and "after[0]" in body["error"], body
