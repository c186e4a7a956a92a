"""Pushed job changes: ``GET /v1/events``, a server-sent event stream (text/event-stream).

The dashboard keeps it open instead of asking for the job lists every
second: each job whose object changed comes as one event, sent from the
worker's memory of its jobs (:mod:`rayserver.jobs.jobview`), so a change
costs one small write per open stream and no query. Events::

    event: hello   data {"version": V}     the version the stream starts from
    event: job     data <the job object, outputs as in a list>, id: its version
    event: reset   data {"version": V}     the server cannot tell what changed
                                           since the version asked for: load the
                                           lists again, then follow from theirs

``since`` (or the ``Last-Event-ID`` header a reconnecting EventSource sends)
is the version the client has, e.g. the ``version`` of the job lists it just
loaded: every job changed after it comes first. A comment line every
:data:`KEEPALIVE` seconds keeps proxies and the client's timeout from
closing a quiet stream. The stream ends when the worker stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from aiohttp import web

from rayserver.jobs.jobview import Entry, JobView

log = logging.getLogger("rayserver.server.push")

KEEPALIVE = 15.0


def _since(request: web.Request) -> int | None:
    raw = request.query.get("since") or request.headers.get("Last-Event-ID") or ""
    if not raw:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise web.HTTPBadRequest(
            text=json.dumps(
                {
                    "error": f"since must be a version (a whole number >= 0), got {raw[:40]!r}",
                    "status": 400,
                }
            ),
            content_type="application/json",
        )
    return int(raw)


def _event(kind: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    head = f"event: {kind}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    return (head + "data: " + json.dumps(data) + "\n\n").encode()


class EventStream:
    """One open ``GET /v1/events``: what it sent, and the loop that sends the rest."""

    def __init__(self, view: JobView, resp: web.StreamResponse) -> None:
        self.view = view
        self.resp = resp
        self.sent: dict[int, int] = {}  # job id -> version sent
        self.floor = view.version

    async def send_job(self, entry: Entry) -> None:
        if entry.version <= self.sent.get(entry.row.id, self.floor):
            return
        self.sent[entry.row.id] = entry.version
        await self.resp.write(
            b"event: job\nid: %d\ndata: %s\n\n" % (entry.version, entry.listed_body)
        )

    async def catch_up(self, since: int | None) -> None:
        """The hello, then every job changed after ``since`` (or a reset)."""
        view = self.view
        await self.resp.write(_event("hello", {"version": view.version}, view.version))
        if since is None:
            return
        changed = view.changed_since(since)
        if changed is None:
            await self.resp.write(_event("reset", {"version": view.version}))
            return
        self.floor = since
        for entry in changed:
            await self.send_job(entry)

    async def run(self) -> None:
        """Send each job the view hears changed, until the worker stops."""
        view = self.view
        listener = view.listen()
        quiet_since = time.monotonic()
        try:
            while not view.closed:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(listener.event.wait(), view.sweep_interval())
                if not listener.event.is_set():
                    view.sweep()  # jobs nobody reports on: their changes wake us next turn
                ids = listener.take()
                for job_id in sorted(ids):
                    entry = view.get(job_id)
                    if entry is not None:
                        await self.send_job(entry)
                if ids:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= KEEPALIVE:
                    await self.resp.write(b": keepalive\n\n")
                    quiet_since = time.monotonic()
        finally:
            view.unlisten(listener)


async def events(request: web.Request) -> web.StreamResponse:
    """GET /v1/events: the job changes as server-sent events (see the module docstring)."""
    from rayserver.server.api import CTX_KEY

    view: JobView = request.app[CTX_KEY].scheduler.view
    since = _since(request)
    resp = web.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    resp.content_type = "text/event-stream"
    resp.charset = "utf-8"
    await resp.prepare(request)
    stream = EventStream(view, resp)
    try:
        await stream.catch_up(since)
        await stream.run()
        await resp.write_eof()
    except ConnectionError:
        log.debug("event stream: client %s went away", request.remote)
    return resp


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/events", events)
