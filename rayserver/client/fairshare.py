"""Which server of several takes one shim call: the one with the most free cpus.

Each call asks every server for its load (``GET /v1/info``: cpus, running,
queued) at once and takes the one with most cpus left; calls that see the
same loads (luigi workers or ``make -j`` starting together) are spread by
their pid, so they do not all pile onto the first server.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rayserver.client.connection import Client, ClientError
from rayserver.client.context import Context


def free_cpus(info: dict[str, Any], cpus: int) -> int:
    """Cpus of a server not taken by its running and queued jobs (negative: a queue)."""
    running = int(info.get("running") or 0)
    queued = int(info.get("queued") or 0)
    return int(info.get("cpus") or cpus) - running - queued


def least_busy(ctx: Context, hosts: str) -> Client:
    """A client of the answering server of ``hosts`` ('A,B' or 'all') with most free cpus."""
    names = [n.strip() for n in hosts.split(",") if n.strip()]
    records = ctx.server_records(None if names in ([], ["all"]) else names)
    token = ctx.token()
    clients = [Client(ctx.target_for(rec), token) for rec in records]

    def probe(i: int) -> int | None:
        try:
            return free_cpus(clients[i].info(timeout=3.0), records[i].cpus)
        except ClientError:
            return None

    with ThreadPoolExecutor(max_workers=min(16, len(clients))) as pool:
        free = list(pool.map(probe, range(len(clients))))
    answering = [i for i, f in enumerate(free) if f is not None]
    if not answering:
        raise ClientError("no server of " + ", ".join(r.name for r in records) + " is answering")
    turn = os.getpid()
    best = max(answering, key=lambda i: (free[i], -((i - turn) % len(clients))))
    return clients[best]
