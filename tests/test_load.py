"""Load: 200 concurrent HTTP clients poll a live rayserver while two renders run.

A real ``python -m rayserver -f`` (2 cpus) renders two pictures with real
rpict while 200 aiohttp clients, each with a connection of its own, poll
job status, the job list and /v1/info for about ten seconds, each from a
loopback address of its own (as 200 workstations would). Every answer
must be a 200 with a sane body, no request may fail, and both renders must
end ``done``. Latency numbers are printed for the report (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import aiohttp
import pytest
from conftest import RayHome
from jobtools import VIEW, make_project

CLIENTS = 200
DURATION = 10.0


async def _client(
    n: int,
    base: str,
    token: str,
    ids: list[int],
    until: float,
    latencies: list[float],
    errors: list[str],
) -> int:
    """One polling client with a connection of its own; returns the answers it got."""
    paths = [f"/v1/jobs/{ids[n % 2]}", "/v1/jobs?state=running,queued", "/v1/info"]
    headers = {"Authorization": f"Bearer {token}"}
    answered = 0
    timeout = aiohttp.ClientTimeout(total=30)
    # Each client from an address of its own (127.0.0.2-201), as from 200
    # workstations: one address may keep max_connections_per_client (64).
    connector = aiohttp.TCPConnector(limit=1, local_addr=(f"127.0.0.{2 + n}", 0))
    async with aiohttp.ClientSession(
        base, headers=headers, timeout=timeout, connector=connector
    ) as session:
        i = n
        while time.monotonic() < until:
            path = paths[i % len(paths)]
            i += 1
            t0 = time.perf_counter()
            try:
                async with session.get(path) as resp:
                    body = await resp.json()
                    latencies.append(time.perf_counter() - t0)
                    if resp.status != 200:
                        errors.append(f"{path}: {resp.status} {body}")
                    elif path.startswith("/v1/jobs/") and body.get("id") != ids[n % 2]:
                        errors.append(f"{path}: wrong job {body}")
                    elif path.startswith("/v1/jobs?") and "jobs" not in body:
                        errors.append(f"{path}: no job list {body}")
                    answered += 1
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                errors.append(f"{path}: {exc!r}")
            # Pollers, not a flood: a short pause like a status display's.
            await asyncio.sleep(0.05)
    return answered


async def _load(base: str, token: str, ids: list[int]) -> tuple[int, list[float], list[str]]:
    latencies: list[float] = []
    errors: list[str] = []
    until = time.monotonic() + DURATION
    counts = await asyncio.gather(
        *(_client(n, base, token, ids, until, latencies, errors) for n in range(CLIENTS))
    )
    assert all(c > 0 for c in counts), f"{counts.count(0)} clients got no answer at all"
    return sum(counts), latencies, errors


@pytest.mark.slow
def test_200_clients_poll_while_two_renders_run(
    server: Any, rayhome: RayHome, capsys: pytest.CaptureFixture[str]
) -> None:
    make_project(rayhome)
    ids = []
    for i in range(2):
        step = {
            "program": "rpict",
            "stdin": None,
            "stdout": f"load{i}.hdr",
            "args": [
                *VIEW,
                "-x",
                "460",
                "-y",
                "460",
                "-ab",
                "1",
                "-ad",
                "1024",
                "-aa",
                "0",
                "scene.oct",
            ],
        }
        status, body = server.request(
            "POST", "/v1/jobs", {"location": "projects", "project": "room", "steps": [step]}
        )
        assert status == 201, body
        ids.append(body["id"])
    status, before = server.request("GET", "/v1/info")
    assert status == 200 and before["running"] + before["queued"] == 2
    token = rayhome.token()
    assert token

    t0, wall0 = time.monotonic(), time.time()
    answers, latencies, errors = asyncio.run(_load(f"http://127.0.0.1:{rayhome.port}", token, ids))
    took, wall1 = time.monotonic() - t0, time.time()
    assert errors == [], f"{len(errors)} errors, first: {errors[:5]}"
    for job_id in ids:
        status, job = server.request("GET", f"/v1/jobs/{job_id}?wait=120", timeout=150)
        assert status == 200 and job["state"] == "done", job
        # The render really ran under the load, for most of it.
        overlap = min(job["ended_at"], wall1) - max(job["started_at"], wall0)
        assert overlap > DURATION / 2, (overlap, job)
        assert (rayhome.projects / "room" / f"load{job_id - ids[0]}.hdr").stat().st_size > 0
    status, after = server.request("GET", "/v1/info")
    assert status == 200 and after["pid"] == before["pid"], "the worker was restarted"
    lat = sorted(latencies)
    with capsys.disabled():
        print(
            f"\nload: {CLIENTS} clients, {answers} answers in {took:.1f} s "
            f"({answers / took:.0f}/s), errors {len(errors)}; latency median "
            f"{statistics.median(lat) * 1000:.1f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.1f} "
            f"ms, max {lat[-1] * 1000:.1f} ms"
        )
