"""The office load for bench/run.py: dashboards open and `rayfront run` followers.

Run by bench/run.py in a process of its own at idle priority (the clients
stand for the designers' workstations, not the render host):

- each dashboard makes the HTTP requests the dashboard's JavaScript makes
  (rayserver/server/dashboard/static/app.js), through aiohttp's client: the
  host information every 5 s, the two job lists, then the event stream
  ``GET /v1/events?since=<the lists' version>`` read as it comes (a reset
  loads the lists again); against a server without the stream, the lists
  every second, as the page does then. No log is open and no preview is
  fetched (the page only fetches a preview once a render is done);
- each follower is rayfront's own code (rayserver.client.follow.follow, as
  `rayfront run` calls it after its submit, without the bar, the log to
  /dev/null) following one of the renders whose ids appear in ``ids_file``.

The load ends when ``stop_file`` appears; the counts go to ``out`` as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

INFO_INTERVAL = 5.0
POLL_INTERVAL = 1.0
FINISHED_SHOWN = 20


class Counts:
    def __init__(self) -> None:
        self.requests = 0
        self.events = 0
        self.errors = 0
        self.pushed = 0  # dashboards that got the event stream
        self.followed = 0  # followers that saw their job's end


async def _lists(session: Any, base: str, headers: dict[str, str], counts: Counts) -> int | None:
    """The page's two job lists; the version to follow from (None: the server has none)."""
    answers = []
    for query in (
        "state=queued,running&limit=200",
        f"state=done,failed,cancelled,interrupted&limit={FINISHED_SHOWN}",
    ):
        async with session.get(f"{base}/v1/jobs?{query}", headers=headers) as resp:
            counts.requests += 1
            answers.append(await resp.json())
    versions = [a.get("version") for a in answers]
    return min(versions) if all(isinstance(v, int) for v in versions) else None


async def _events(session: Any, url: str, headers: dict[str, str], counts: Counts) -> bool:
    """Read one event stream to its end; False when the server has none (404)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with session.get(url, headers=headers, timeout=timeout) as resp:
        counts.requests += 1
        if resp.status == 404:
            return False
        counts.pushed += 1
        async for line in resp.content:
            if line.startswith(b"event: job"):
                counts.events += 1
            elif line.startswith(b"event: reset"):
                return True
    return True


async def dashboard(session: Any, base: str, token: str | None, counts: Counts) -> None:
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"

    async def info() -> None:
        while True:
            with contextlib.suppress(Exception):
                async with session.get(f"{base}/v1/info") as resp:
                    counts.requests += 1
                    await resp.read()
            await asyncio.sleep(INFO_INTERVAL)

    info_task = asyncio.create_task(info())
    push = True
    try:
        while True:
            try:
                since = await _lists(session, base, headers, counts)
                if push and since is not None:
                    push = await _events(
                        session, f"{base}/v1/events?since={since}", headers, counts
                    )
                    await asyncio.sleep(2.0 if push else 0)
                else:
                    await asyncio.sleep(POLL_INTERVAL)
            except Exception:  # noqa: BLE001 - counted; the page retries too
                counts.errors += 1
                await asyncio.sleep(2.0)
    finally:
        info_task.cancel()


def follower(port: int, token: str | None, job_id: int, counts: Counts) -> None:
    from rayserver.client.connection import Client, ClientError, Target
    from rayserver.client.follow import follow

    client = Client(Target("bench", "127.0.0.1", port), token)
    try:
        with open(os.devnull, "w") as out:
            job = follow(client, {"id": job_id, "state": "queued"}, show_bar=False, out=out)
        if job.get("state") in ("done", "failed", "cancelled", "interrupted"):
            counts.followed += 1
    except ClientError:
        counts.errors += 1


async def run_load(
    port: int, token: str | None, dashboards: int, followers: int, ids_file: Path, stop: Path
) -> dict[str, Any]:
    import aiohttp

    counts = Counts()
    base = f"http://127.0.0.1:{port}"
    threads: list[threading.Thread] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [
            asyncio.create_task(dashboard(session, base, token, counts)) for _ in range(dashboards)
        ]
        while not stop.exists():
            if not threads and ids_file.exists():
                ids = json.loads(ids_file.read_text())
                for i in range(followers):
                    t = threading.Thread(
                        target=follower, args=(port, token, ids[i % len(ids)], counts), daemon=True
                    )
                    t.start()
                    threads.append(t)
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    for t in threads:
        t.join(30)
    return vars(counts)


def main() -> int:
    port, token, dashboards, followers, ids_file, stop, out = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    result = asyncio.run(run_load(port, token, dashboards, followers, Path(ids_file), Path(stop)))
    result["seconds"] = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["client_cpu"] = usage.ru_utime + usage.ru_stime
    Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
