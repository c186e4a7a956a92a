"""The farm on one page: ``GET /v1/farm`` and ``GET /v1/farm/{host}/jobs``.

The browser only ever talks to the server it loaded the dashboard from (its
CSP allows no other origin, and the other hosts send no CORS headers), so
this server asks the others for it: every server record of the hosts file
(cpus > 0) is asked for its ``GET /v1/info`` (open, no token needed) at the
same time, each with a short timeout, and the answers are kept
:data:`CACHE_SECONDS` so a page open in many tabs costs the farm one round.
A host that does not answer is listed with ``answering: false`` and the
error; it never holds up the page longer than :data:`PROBE_TIMEOUT`.
This server's own record is described from its own database, not over HTTP.

``GET /v1/farm/{host}/jobs`` passes a job list request (``state``,
``limit``, ``before``) on to that host with the caller's own Authorization
header: a user sees on another host what their token shows them there.
``GET /v1/farm/{host}/jobs/{id}/preview.png`` and ``.../grid.png`` relay that
host's picture of one of its jobs the same way (a running render's picture
so far included).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from rayserver import __version__
from rayserver.common.hosts import HostRecord
from rayserver.common.states import JobState
from rayserver.server.api import ApiError

log = logging.getLogger("rayserver.server.farm")

PROBE_TIMEOUT = 2.5
JOBS_TIMEOUT = 8.0
CACHE_SECONDS = 3.0
_JOB_QUERY = ("state", "limit", "before")
# A host's answer is read only up to this size: a wrong service at that port
# must not fill the server's memory.
MAX_ANSWER_BYTES = 4 * 1024 * 1024
MAX_PICTURE_BYTES = 32 * 1024 * 1024
MAX_INFO_BYTES = 1024 * 1024

FARM_KEY: web.AppKey[Farm] = web.AppKey("farm")


def _fields(info: dict[str, Any], record: HostRecord) -> dict[str, Any]:
    load = info.get("load")
    return {
        "hostname": str(info.get("hostname") or ""),
        "cpus": int(info.get("cpus") or record.cpus),
        "load": [float(v) for v in load][:3] if isinstance(load, list) else None,
        "running": int(info.get("running") or 0),
        "queued": int(info.get("queued") or 0),
        "version": str(info.get("version") or ""),
        "executor": str(info.get("executor") or ""),
    }


def _entry(record: HostRecord, port: int, own: bool) -> dict[str, Any]:
    return {
        "name": record.name,
        "address": record.address,
        "port": port,
        "self": own,
        "record_cpus": record.cpus,
        "answering": False,
        "error": None,
    }


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"answered {exc.status} {exc.message}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, ValueError):  # (json's JSONDecodeError is one)
        return f"not a rayserver answer: {exc}"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class Farm:
    """The hosts' summaries, fetched together and cached; one aiohttp session per worker."""

    ctx: Any  # rayserver.server.api.AppContext
    probe_timeout: float = PROBE_TIMEOUT
    cache_seconds: float = CACHE_SECONDS
    _session: aiohttp.ClientSession | None = None
    _cached: tuple[float, int, list[dict[str, Any]]] | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _ssl: tuple[Any, Any] | None = None  # (settings, their client TLS context)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No proxy from the environment: the hosts are reached directly.
            self._session = aiohttp.ClientSession(trust_env=False)
        return self._session

    def base_url(self, record: HostRecord) -> tuple[str, Any]:
        """(http(s)://address:port, ssl argument) of a record's server."""
        settings = self.ctx.live.settings
        port = record.effective_port(settings.port)
        host = f"[{record.address}]" if ":" in record.address else record.address
        ssl_ctx: Any = None
        if settings.tls_ca or settings.tls_enabled:
            # one context per settings snapshot: a reload with a new CA makes a new one
            if self._ssl is None or self._ssl[0] is not settings:
                from rayserver.common.credentials import client_ssl_context

                self._ssl = (settings, client_ssl_context(settings))
            ssl_ctx = self._ssl[1]
        scheme = "https" if ssl_ctx is not None else "http"
        return f"{scheme}://{host}:{port}", ssl_ctx if ssl_ctx is not None else True

    def record(self, name: str) -> HostRecord:
        """The server record called ``name`` (as the farm list names it), else ApiError 404."""
        for record in self.ctx.live.hosts.servers():
            if record.name == name:
                return record
        names = ", ".join(r.name for r in self.ctx.live.hosts.servers()) or "none"
        raise ApiError(404, f"no render host {name!r} in the hosts file; its servers: {names}")

    def local(self, record: HostRecord, entry: dict[str, Any]) -> dict[str, Any]:
        """This server's own entry, from its own database (no request to itself)."""
        counts = self.ctx.db.counts()
        try:
            load = list(os.getloadavg())
        except OSError:
            load = None
        info = {
            "hostname": self.ctx.layout.host,
            "cpus": record.cpus,
            "load": load,
            "running": counts.get(JobState.RUNNING, 0),
            "queued": counts.get(JobState.QUEUED, 0),
            "executor": self.ctx.live.settings.executor,
        }
        info["version"] = __version__
        return entry | _fields(info, record) | {"answering": True}

    async def probe(self, record: HostRecord) -> dict[str, Any]:
        """One host's entry: its /v1/info, or why it has none."""
        settings = self.ctx.live.settings
        own = record == self.ctx.live.record
        entry = _entry(record, record.effective_port(settings.port), own)
        if own:
            return self.local(record, entry)
        try:
            base, ssl_arg = self.base_url(record)
            timeout = aiohttp.ClientTimeout(total=self.probe_timeout)
            async with asyncio.timeout(self.probe_timeout):
                async with self.session().get(
                    base + "/v1/info", timeout=timeout, ssl=ssl_arg, allow_redirects=False
                ) as resp:
                    resp.raise_for_status()
                    body = await _read_capped(resp, MAX_INFO_BYTES)
            if body is None:
                raise ValueError(f"GET /v1/info answered over {MAX_INFO_BYTES} bytes")
            info = json.loads(body)
            if not isinstance(info, dict):
                raise ValueError("GET /v1/info did not answer a JSON object")
            return entry | _fields(info, record) | {"answering": True}
        except Exception as exc:  # every failure is this host's state, never the page's
            return entry | {"error": _describe(exc, self.probe_timeout)}

    async def hosts(self) -> tuple[float, list[dict[str, Any]]]:
        """(time checked, entries) of every server record, at most cache_seconds old."""
        generation = id(self.ctx.live.hosts)
        async with self._lock:  # a burst of page loads shares one round of probes
            now = time.time()
            cached = self._cached
            if cached and cached[1] == generation and now - cached[0] < self.cache_seconds:
                return cached[0], cached[2]
            records = self.ctx.live.hosts.servers()
            entries = list(await asyncio.gather(*(self.probe(r) for r in records)))
            self._cached = (now, generation, entries)
            return now, entries

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def farm_hosts(request: web.Request) -> web.Response:
    """GET /v1/farm: every render host of the hosts file, answering or not."""
    checked_at, entries = await request.app[FARM_KEY].hosts()
    return web.json_response({"hosts": entries, "checked_at": checked_at})


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None when it is longer than ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _relay(
    request: web.Request, path: str, keys: tuple[str, ...], limit: int = MAX_ANSWER_BYTES
) -> web.Response:
    """GET ``path`` of the request's {host}, with the caller's Authorization; its answer."""
    farm = request.app[FARM_KEY]
    record = farm.record(request.match_info["host"])
    if record == farm.ctx.live.record:
        qs = request.query_string
        raise web.HTTPTemporaryRedirect(path + (f"?{qs}" if qs else ""))
    query = {k: v for k, v in request.query.items() if k in keys}
    headers = {}
    if "Authorization" in request.headers:
        headers["Authorization"] = request.headers["Authorization"]
    try:
        base, ssl_arg = farm.base_url(record)
        timeout = aiohttp.ClientTimeout(total=JOBS_TIMEOUT)
        async with farm.session().get(
            base + path, params=query, headers=headers, timeout=timeout, ssl=ssl_arg
        ) as resp:
            body = await _read_capped(resp, limit)
            status, ctype = resp.status, resp.content_type
            passed = {
                k: v for k, v in resp.headers.items() if k.startswith(("X-Preview", "X-Grid"))
            }
    except Exception as exc:
        raise ApiError(502, f"render host {record.name}: {_describe(exc, JOBS_TIMEOUT)}") from exc
    if body is None:
        raise ApiError(502, f"render host {record.name}: its answer is over {limit} bytes")
    if status >= 500:
        raise ApiError(502, f"render host {record.name} answered {status}")
    if ctype not in ("application/json", "image/png"):
        raise ApiError(502, f"render host {record.name} answered {ctype or 'no type'}")
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", **passed}
    if status == 204:
        return web.Response(status=204, headers=headers)
    return web.Response(body=body, status=status, content_type=ctype, headers=headers)


async def farm_jobs(request: web.Request) -> web.Response:
    """GET /v1/farm/{host}/jobs: that host's GET /v1/jobs, asked with the caller's token."""
    return await _relay(request, "/v1/jobs", _JOB_QUERY)


def _picture(kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler relaying GET /v1/jobs/{id}/<kind>.png of the request's {host}."""

    async def handler(request: web.Request) -> web.Response:
        job_id = request.match_info["id"]
        if not (job_id.isascii() and job_id.isdigit() and len(job_id) <= 18):
            raise ApiError(400, f"bad job id {job_id!r}: expected a whole number >= 1")
        path = f"/v1/jobs/{job_id}/{kind}.png"
        return await _relay(request, path, ("step", "path"), MAX_PICTURE_BYTES)

    return handler


def setup_farm(app: web.Application, ctx: Any) -> None:
    """Register the farm endpoints on ``app`` (its session closes with the app)."""
    farm = Farm(ctx)
    app[FARM_KEY] = farm

    async def close(_app: web.Application) -> None:
        await farm.close()

    app.on_cleanup.append(close)
    app.router.add_get("/v1/farm", farm_hosts)
    app.router.add_get("/v1/farm/{host}/jobs", farm_jobs)
    for kind in ("preview", "grid"):
        app.router.add_get(f"/v1/farm/{{host}}/jobs/{{id}}/{kind}.png", _picture(kind))
