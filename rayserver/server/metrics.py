"""``GET /metrics``: the server's numbers in Prometheus' text format (version 0.0.4).

Gauges come from the job database and the scheduler at the moment of the
scrape (jobs by state, queue length, cpu slots), the job-duration histogram
and the sandbox and limit events from the job database (so they survive a
worker restart), requests and refusals from this worker's
:mod:`rayserver.server.counters`. No label names a job, user or file:
the series stay few, and the page tells nothing about anyone's work.
docs/operations.md lists every metric.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from rayserver.server import counters

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Upper bounds (seconds) of the job-duration buckets: a quick rtrace to a
# day-long rendering.
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)
REFUSAL_REASONS = ("allow", "limit", "token", "forbidden")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: dict[str, str]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items()) + "}"


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return (
        repr(float(value))
        if isinstance(value, float) and not value.is_integer()
        else str(int(value))
    )


class _Page:
    """The lines of one exposition, a family (HELP, TYPE, samples) at a time."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]
    ) -> None:
        # Format 0.0.4 names a counter by its sample name, _total included.
        if kind == "counter":
            name += "_total"
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def histogram(
        self,
        name: str,
        help_text: str,
        bounds: tuple[float, ...],
        data: tuple[list[int], int, float],
    ) -> None:
        below, count, total = data
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        for bound, n in zip(bounds, below, strict=True):
            self.lines.append(f'{name}_bucket{{le="{_number(bound)}"}} {n}')
        self.lines.append(f'{name}_bucket{{le="+Inf"}} {count}')
        self.lines.append(f"{name}_sum {_number(total)}")
        self.lines.append(f"{name}_count {count}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _slots(ctx: Any) -> tuple[int, int]:
    """(used, free) cpu slots of this server's record."""
    scheduler = ctx.scheduler
    capacity = int(getattr(scheduler, "capacity", 0) or 0)
    # A scheduler that gives a job several slots (its -n) says how many are taken.
    used = getattr(scheduler, "used_cpus", None)
    if used is None:
        used = getattr(scheduler, "running_count", 0)
    used = int(used or 0)
    return used, max(0, capacity - used)


def _job_families(page: _Page, ctx: Any) -> None:
    db = ctx.db
    page.family(
        "rayserver_jobs",
        "gauge",
        "Jobs in the job database by state.",
        (({"state": state}, n) for state, n in sorted(db.counts().items())),
    )
    page.family(
        "rayserver_queue_length", "gauge", "Jobs waiting to start.", [({}, db.queued_count())]
    )
    used, free = _slots(ctx)
    page.family(
        "rayserver_cpu_slots_used", "gauge", "Cpu slots taken by running jobs.", [({}, used)]
    )
    page.family(
        "rayserver_cpu_slots_free",
        "gauge",
        "Cpu slots of this server's hosts record not in use.",
        [({}, free)],
    )
    page.histogram(
        "rayserver_job_duration_seconds",
        "Wall time of finished jobs.",
        DURATION_BUCKETS,
        db.wall_times(DURATION_BUCKETS),
    )
    page.family(
        "rayserver_job_events",
        "counter",
        "Sandbox and limit events of jobs (log capped, limits hit, accesses refused).",
        (({"event": e}, n) for e, n in db.event_counts().items()),
    )


def _request_families(page: _Page) -> None:
    page.family(
        "rayserver_http_requests",
        "counter",
        "HTTP requests answered by this worker, by method and status code.",
        (({"method": m, "code": str(c)}, n) for (m, c), n in sorted(counters.REQUESTS.items())),
    )
    reasons = dict.fromkeys(REFUSAL_REASONS, 0) | dict(counters.REFUSALS)
    page.family(
        "rayserver_refusals",
        "counter",
        "Connections and requests refused by this worker, by reason.",
        (({"reason": r}, n) for r, n in sorted(reasons.items())),
    )


def exposition(ctx: Any) -> str:
    """The whole /metrics page for the worker's context."""
    page = _Page()
    _job_families(page, ctx)
    _request_families(page)
    return page.text()


def handler(get_ctx: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
    """The aiohttp handler of GET /metrics (``get_ctx`` finds the worker's context)."""

    async def metrics(request: web.Request) -> web.Response:
        # In a thread (its own database connection): with 10,000 jobs the
        # queries take milliseconds that other requests should not wait for.
        body = (await asyncio.to_thread(exposition, get_ctx(request))).encode("utf-8")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    return metrics
