"""The HTTP API under ``/v1`` (aiohttp), as described in ``rayserver/server/openapi.yaml``.

Routes: server info, submit / list / status / cancel jobs, the job log
(optionally followed until the job ends), and the share probe (handled by
:mod:`rayserver.server.shareprobe`, whose locks live in the app). Every error is JSON,
``{"error": ..., "status": ...}``, with the status code of
docs/api-contract.md; the token check, body limit and the catch-all for
unexpected errors come from :mod:`rayserver.server.security`'s middlewares.

The app reads everything per request from the :class:`AppContext` (current
settings and hosts through ``ctx.live``, jobs through ``ctx.db``), so a
configuration reload applies without a restart, and the handlers never keep
state of their own (the share probe's held locks excepted, which end with the
process): the worker stays disposable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web

from rayserver import __version__
from rayserver.common import radiance
from rayserver.common.paths import Layout
from rayserver.common.receipt import RECEIPT_FILE
from rayserver.common.states import API_STATES, JobState
from rayserver.common.tokens import SHARED_USER
from rayserver.jobs.executors import slurmcli
from rayserver.jobs.jobdb import UnknownJobsError
from rayserver.jobs.rows import JobRow
from rayserver.server import counters, jobspec, jsonbody, metrics, push, shareprobe, streams
from rayserver.server.jobspec import JobSpecError
from rayserver.server.security import ROLE_KEY, USER_KEY

log = logging.getLogger("rayserver.server.api")

MAX_WAIT = 300.0
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
# Beyond this many waiting jobs a submit is refused with 503: a runaway
# script must not fill the disk with queue rows.
MAX_QUEUED = 10_000
# Jobs in one POST /v1/jobs/batch (a split's parts, a shim's commands).
MAX_BATCH = 1000
# How often a followed log is checked for new bytes while the job runs (a stat, no
# query); a change of the job (its progress, its end) is answered at once anyway.
FOLLOW_INTERVAL = 0.5
# Bytes of a log read (in a thread) and written per step. Three readers of a
# 50 MB log kept other requests at a median of 10 ms with 64 KiB and 11-17 ms
# with 256 KiB on a loaded 2-core machine (tests/test_server_limits.py).
LOG_CHUNK = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class AppContext:
    """What the handlers (and the security and dashboard hooks) work with."""

    layout: Layout
    live: Any  # rayserver.server.confwatch.LiveConfig: .settings, .hosts, .record, reload()
    db: Any  # rayserver.jobs.jobdb.JobDB
    scheduler: Any  # rayserver.jobs.scheduler.Scheduler
    started_at: float = field(default_factory=time.time)
    token: str | None = None
    radiance_version: str = "unknown"


CTX_KEY: web.AppKey[AppContext] = web.AppKey("ctx", AppContext)


class ApiError(Exception):
    """An answer other than success, raised anywhere below a handler."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


@web.middleware
async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ApiError and JobSpecError become the API's JSON error shape."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message)
    except JobSpecError as exc:
        return error_response(exc.status, exc.message)


def _ctx(request: web.Request) -> AppContext:
    return request.app[CTX_KEY]


# ------------------------------------------------------------------ parsing


def _job_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isdigit() or not raw.isascii() or int(raw) < 1 or len(raw) > 18:
        raise ApiError(400, f"job id must be a whole number >= 1, got {raw!r}")
    return int(raw)


def _int_param(
    request: web.Request, name: str, default: int | None, lo: int, hi: int
) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {name} must be a whole number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ApiError(400, f"query parameter {name} must be between {lo} and {hi}, got {value}")
    return value


def _float_param(request: web.Request, name: str, lo: float, hi: float) -> float | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(
            400, f"query parameter {name} must be a number of seconds, got {raw!r}"
        ) from None
    if not lo <= value <= hi:  # also false for nan
        raise ApiError(
            400, f"query parameter {name} must be between {lo:g} and {hi:g} seconds, got {raw}"
        )
    return value


def _get_row(ctx: AppContext, job_id: int) -> JobRow:
    row = ctx.db.get(job_id)
    if row is None:
        raise ApiError(404, f"no job {job_id} on this server")
    return row


def _check_owner(request: web.Request, row: JobRow, what: str) -> None:
    """403 unless the request's token is the job's user's or an admin's."""
    user = request.get(USER_KEY, SHARED_USER)
    if request.get(ROLE_KEY, "admin") == "admin" or row.owner == user:
        return
    counters.count_refusal("forbidden")
    raise ApiError(
        403,
        f"job {row.id} belongs to user {row.owner!r}; {what} another user's job needs "
        f"an admin token (this request's token is user {user!r}'s, role user)",
    )


def _job_response(
    ctx: AppContext, row: JobRow, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """The job as the worker's memory has it now (its version included)."""
    entry = ctx.scheduler.view.get(row.id)
    if entry is None:
        return web.json_response(ctx.db.public(row), status=status, headers=headers)
    return web.Response(
        body=entry.body, status=status, headers=headers, content_type="application/json"
    )


# ------------------------------------------------------------------ handlers


async def info(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    settings = ctx.live.settings
    record = ctx.live.record
    counts = ctx.scheduler.view.cached_list("counts", ctx.db.counts)
    try:
        load = list(os.getloadavg())
    except OSError:
        load = [0.0, 0.0, 0.0]
    return web.json_response(
        {
            "hostname": ctx.layout.host,
            # The own record's name as written in the hosts file ("box:9183"): tells
            # apart several servers of one machine, which share the hostname.
            "name": record.name if record else ctx.layout.host,
            "pid": os.getpid(),
            "version": __version__,
            "radiance_version": ctx.radiance_version,
            "cpus": record.cpus if record else 0,
            "running": counts.get(JobState.RUNNING, 0),
            "queued": counts.get(JobState.QUEUED, 0),
            "locations": sorted(record.locations) if record else [],
            "executor": settings.executor,
            "tls": bool(settings.tls_enabled),
            "auth": ctx.token is not None,
            "load": load,
            "sandbox": sandbox_info(settings),
            **(
                {"slurm": await slurmcli.cluster_info(settings)}
                if settings.executor == "slurm"
                else {}
            ),
        }
    )


def sandbox_info(settings: Any) -> dict[str, Any]:
    """The ``sandbox`` object of GET /v1/info: the mode in force and how jobs are boxed."""
    from rayserver.jobs.procwrap import boxprobe

    return boxprobe.current().info(settings.sandbox)


async def openapi(_request: web.Request) -> web.Response:
    text = resources.files("rayserver.server").joinpath("openapi.yaml").read_text(encoding="utf-8")
    return web.Response(text=text, content_type="application/yaml")


def _require_json(request: web.Request, what: str) -> None:
    if request.content_type != "application/json":
        raise ApiError(
            415,
            f"send {what} as JSON with 'Content-Type: application/json' "
            f"(got {request.content_type or 'no content type'!r})",
        )


def _resolve(ctx: AppContext, data: dict[str, Any], client: str) -> jobspec.ResolvedJob:
    """The checked job of a request body (touches the file system: call it in a thread)."""
    live = ctx.live
    return jobspec.resolve_job(
        data,
        settings=live.settings,
        hosts=live.hosts,
        record=lambda: live.record,
        reload=live.reload_if_changed,
        client=client,
    )


def _check_room(ctx: AppContext, adding: int) -> None:
    queued = ctx.db.queued_count()
    if queued + adding > MAX_QUEUED:
        raise ApiError(503, f"the queue is full ({queued} jobs waiting); try again later")


def _log_submitted(
    job_id: int, user: str, client: str, job: jobspec.ResolvedJob, after: list[int]
) -> None:
    log.info(
        "job %d submitted by %s from %s: %s in %s/%s%s",
        job_id,
        user,
        client,
        " | ".join(s["program"] for s in job.steps),
        job.location,
        job.project,
        f" after {', '.join(map(str, after))}" if after else "",
    )


async def submit(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    _require_json(request, "the job")
    data = jsonbody.parse(await request.read(), "a JSON job object")
    job_id = await accept_job(request, data)
    row = _get_row(ctx, job_id)
    return _job_response(ctx, row, 201, {"Location": f"/v1/jobs/{job_id}"})


async def accept_job(request: web.Request, data: Any) -> int:
    """Check, resolve and queue one job body (POST /v1/jobs, POST /v1/jobs/run); its id."""
    ctx = _ctx(request)
    settings = ctx.live.settings
    jobspec.check_shape(data, settings)
    client = request.remote or "?"
    # Path checks touch the (possibly network) file system: keep them off the loop.
    job = await asyncio.to_thread(_resolve, ctx, data, client)
    _check_room(ctx, 1)
    # On the loop, like the scheduler's writes: a short local transaction
    # costs less than the hop to a thread and back.
    after = data.get("after") or []
    user = request.get(USER_KEY, SHARED_USER)
    try:
        job_id = _insert(ctx, job, client, settings.executor, after, user)
    except UnknownJobsError as exc:
        raise ApiError(
            422,
            f"after: {exc}; expected ids of jobs on this server (each server numbers its own jobs)",
        ) from None
    _log_submitted(job_id, user, client, job, after)
    ctx.scheduler.view.touch(job_id)  # the lists change, the event streams tell it
    ctx.scheduler.notify()
    return job_id


def _batch_items(data: Any, settings: Any) -> list[dict[str, Any]]:
    """The jobs of a batch body, each shape-checked; the first bad one refuses them all."""
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise ApiError(422, 'expected a JSON object {"jobs": [job, ...]}')
    if extra := sorted(set(data) - {"jobs"}):
        raise ApiError(422, f"unknown field {extra[0]!r} in the batch; expected only 'jobs'")
    jobs: list[Any] = data["jobs"]
    if not 1 <= len(jobs) <= MAX_BATCH:
        raise ApiError(
            422, f"jobs: {len(jobs)} jobs given; expected between 1 and {MAX_BATCH} in one batch"
        )
    for index, item in enumerate(jobs):
        with _batch_index(index, len(jobs)):
            jobspec.check_shape(item, settings)
    return jobs


@contextlib.contextmanager
def _batch_index(index: int, count: int) -> Iterator[None]:
    """A job's error, prefixed with its place in the batch; nothing of the batch is queued."""
    try:
        yield
    except (JobSpecError, ApiError) as exc:
        raise ApiError(
            exc.status, f"jobs[{index}]: {exc.message} (none of the {count} jobs was queued)"
        ) from None


async def submit_batch(request: web.Request) -> web.Response:
    """POST /v1/jobs/batch: several jobs checked first, then queued in one transaction."""
    ctx = _ctx(request)
    settings = ctx.live.settings
    _require_json(request, "the batch")
    data = jsonbody.parse(await request.read(), 'a JSON object {"jobs": [job, ...]}')
    items = _batch_items(data, settings)
    client = request.remote or "?"

    def resolve_all() -> list[jobspec.ResolvedJob]:
        resolved = []
        for index, item in enumerate(items):
            with _batch_index(index, len(items)):
                resolved.append(_resolve(ctx, item, client))
        return resolved

    jobs = await asyncio.to_thread(resolve_all)
    _check_room(ctx, len(jobs))
    user = request.get(USER_KEY, SHARED_USER)
    afters = [item.get("after") or [] for item in items]
    try:
        ids = ctx.db.submit_many(
            [
                _submit_args(j, client, settings.executor, a, user)
                for j, a in zip(jobs, afters, strict=True)
            ]
        )
    except UnknownJobsError as exc:
        raise ApiError(
            422,
            f"jobs[{exc.index}]: after: {exc}; expected ids of jobs on this server (each "
            f"server numbers its own jobs) (none of the {len(jobs)} jobs was queued)",
        ) from None
    view = ctx.scheduler.view
    for job_id, job, after in zip(ids, jobs, afters, strict=True):
        _log_submitted(job_id, user, client, job, after)
        view.touch(job_id)
    ctx.scheduler.notify()
    entries = [view.get(i) for i in ids]
    return web.json_response({"jobs": [e.job for e in entries if e is not None]}, status=201)


def _insert(
    ctx: AppContext,
    job: jobspec.ResolvedJob,
    client: str,
    executor: str,
    after: list[int],
    user: str,
) -> int:
    return ctx.db.submit(**_submit_args(job, client, executor, after, user))


def _submit_args(
    job: jobspec.ResolvedJob, client: str, executor: str, after: list[int], user: str
) -> dict[str, Any]:
    """JobDB.submit's keyword arguments for a resolved job."""
    return {
        "name": job.name,
        "priority": job.priority,
        "client": client,
        "location": job.location,
        "project": job.project,
        "workdir": job.workdir,
        "steps": job.steps,
        "env": job.env,
        "executor": executor,
        "after": after,
        "user": None if user == SHARED_USER else user,
        "project_dir": job.project_dir,
        "cpus": job.cpus,
    }


async def list_jobs(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    states: list[str] | None = None
    raw_states = request.query.get("state", "")
    if raw_states:
        states = [s.strip() for s in raw_states.split(",") if s.strip()]
        bad = [s for s in states if s not in API_STATES]
        if bad:
            raise ApiError(
                400,
                f"unknown job state {bad[0]!r} in state=; expected some of {', '.join(API_STATES)}",
            )
    limit = _int_param(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    before = _int_param(request, "before", None, 1, 2**63 - 1)
    assert limit is not None
    view = ctx.scheduler.view
    key = (tuple(states) if states else None, limit, before)
    body = view.cached_list(key, lambda: _list_body(ctx, states, limit, before))
    return web.Response(body=body, content_type="application/json")


def _list_body(ctx: AppContext, states: list[str] | None, limit: int, before: int | None) -> bytes:
    """A job list's answer, read from the database (each row also refreshes the memory)."""
    view = ctx.scheduler.view
    # One row more than asked tells whether there is a next page.
    rows = ctx.db.list(states, limit + 1, before)
    page = rows[:limit]
    nxt = page[-1].id if len(rows) > limit else None
    jobs = [view.observe(r).listed() for r in page]
    return json.dumps({"jobs": jobs, "next": nxt, "version": view.version}).encode()


async def get_job(request: web.Request) -> web.Response:
    """GET /v1/jobs/{id}, from the worker's memory; ``wait`` (+ ``since``) long-polls."""
    ctx = _ctx(request)
    job_id = _job_id(request)
    wait = _float_param(request, "wait", 0.0, MAX_WAIT)
    since = _int_param(request, "since", None, 0, 2**62)
    view = ctx.scheduler.view
    entry = view.get(job_id)
    if entry is None:
        raise ApiError(404, f"no job {job_id} on this server")
    if wait and not entry.final and (since is None or entry.version <= since):
        entry = await view.wait(job_id, since, wait)
        if entry is None:
            raise ApiError(404, f"no job {job_id} on this server")
    return web.Response(body=entry.body, content_type="application/json")


async def cancel_job(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    job_id = _job_id(request)
    row = _get_row(ctx, job_id)
    _check_owner(request, row, "cancelling")
    if row.final:
        raise ApiError(
            409, f"job {job_id} has already ended ({row.state}); there is nothing to cancel"
        )
    after = await ctx.scheduler.cancel(job_id)
    row = after if after is not None else _get_row(ctx, job_id)
    if row.final and row.state != JobState.CANCELLED:
        raise ApiError(409, f"job {job_id} ended ({row.state}) before it could be cancelled")
    log.info(
        "job %d cancel requested by %s from %s",
        job_id,
        request.get(USER_KEY, SHARED_USER),
        request.remote,
    )
    return _job_response(ctx, row)


class _LogReader:
    """A job's log read in chunks by a worker thread, never on the event loop.

    The file is opened at the first read (a queued job has no log yet) and
    kept open, so a log moved or truncated meanwhile is read consistently.
    """

    def __init__(self, path: os.PathLike[str] | str, offset: int) -> None:
        self._path = path
        self.offset = offset
        self._fh: Any = None
        self.size_at_open = 0

    def _read(self, limit: int) -> bytes:
        if self._fh is None:
            try:
                self._fh = open(self._path, "rb")  # closed in close()
            except FileNotFoundError:
                return b""
            self.size_at_open = os.fstat(self._fh.fileno()).st_size
        self._fh.seek(self.offset)
        return self._fh.read(limit)

    def grown(self) -> bool:
        """True when the log may hold bytes beyond the offset (or cannot be looked at)."""
        try:
            return os.stat(self._path).st_size > self.offset
        except OSError:
            return self._fh is not None

    async def chunk(self, limit: int = LOG_CHUNK) -> bytes:
        data = await asyncio.to_thread(self._read, limit)
        self.offset += len(data)
        return data

    async def close(self) -> None:
        if self._fh is not None:
            await asyncio.to_thread(self._fh.close)
            self._fh = None


async def job_log(request: web.Request) -> web.StreamResponse:
    """GET /v1/jobs/{id}/log: the log from ``offset``, streamed; ``follow=1`` until the job ends."""
    ctx = _ctx(request)
    job_id = _job_id(request)
    offset = _int_param(request, "offset", 0, 0, 2**62) or 0
    follow_raw = request.query.get("follow", "0")
    if follow_raw not in ("0", "1", "true", "false", ""):
        raise ApiError(400, f"query parameter follow must be 0 or 1, got {follow_raw!r}")
    _check_owner(request, _get_row(ctx, job_id), "reading the log of")
    reader = _LogReader(ctx.db.log_path(job_id), offset)
    resp = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    resp.content_type = "text/plain"
    resp.charset = "utf-8"
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    try:
        if request.method == "HEAD":
            pass
        elif follow_raw in ("1", "true"):
            await _follow_log(ctx, job_id, reader, resp)
        else:
            await _send_log(reader, resp)
        await resp.write_eof()
    except ConnectionError:
        # The client went away mid-stream; there is no one left to answer.
        log.debug("log of job %d: client %s went away", job_id, request.remote)
    finally:
        await reader.close()
    return resp


def _read_receipt(path: os.PathLike[str] | str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None  # none written (or something else is in its place)


async def job_receipt(request: web.Request) -> web.Response:
    """GET /v1/jobs/{id}/receipt: the job's receipt.json (what ran, on what, and what came out)."""
    ctx = _ctx(request)
    job_id = _job_id(request)
    row = _get_row(ctx, job_id)
    _check_owner(request, row, "reading the receipt of")
    path = ctx.db.log_path(job_id).parent / RECEIPT_FILE
    body = await asyncio.to_thread(_read_receipt, path)
    if body is None:
        when = (
            "it ended without one (see its warnings and log)"
            if row.final
            else f"it is {row.state}; the receipt is written when the job ends"
        )
        raise ApiError(404, f"job {job_id} has no receipt yet: {when}")
    return web.Response(body=body, content_type="application/json")


async def _send_log(reader: _LogReader, resp: web.StreamResponse) -> None:
    """The log as it is now: up to its size when the request came (a running job adds more)."""
    chunk = await reader.chunk()
    while chunk:
        await resp.write(chunk)
        left = reader.size_at_open - reader.offset
        if left <= 0:
            break
        chunk = await reader.chunk(min(left, LOG_CHUNK))


async def _follow_log(
    ctx: AppContext, job_id: int, reader: _LogReader, resp: web.StreamResponse
) -> None:
    view = ctx.scheduler.view
    since = None
    while True:
        # The state is read before draining: a job recorded as final has
        # written its whole log, so what follows the drain is the end.
        entry = view.get(job_id)
        final = entry is None or entry.final
        # A thread's read only when the file grew (a stat on the loop is ~µs).
        while reader.grown() and (chunk := await reader.chunk()):
            await resp.write(chunk)
        if final:
            return
        if entry is not None:
            since = entry.version
        await view.wait(job_id, since, FOLLOW_INTERVAL)


# ------------------------------------------------------------------ the app


def build_app(ctx: AppContext, extra_middlewares: list[Any] | None = None) -> web.Application:
    """The aiohttp application for ``ctx`` (security middlewares are passed in by the worker)."""
    app = web.Application(
        middlewares=[*(extra_middlewares or []), api_errors],
        client_max_size=ctx.live.settings.max_body_bytes,
    )
    # An AppKey rather than the plain string "ctx": aiohttp warns on string keys.
    app[CTX_KEY] = ctx
    app.router.add_get("/v1/info", info)
    app.router.add_get("/v1/openapi.yaml", openapi)
    app.router.add_post("/v1/jobs", submit)
    app.router.add_post("/v1/jobs/batch", submit_batch)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{id}", get_job)
    app.router.add_delete("/v1/jobs/{id}", cancel_job)
    app.router.add_get("/v1/jobs/{id}/log", job_log)
    app.router.add_get("/v1/jobs/{id}/receipt", job_receipt)
    app.router.add_get("/metrics", metrics.handler(lambda r: r.app[CTX_KEY]))
    streams.add_routes(app, ctx, _check_owner)
    push.add_routes(app)
    from rayserver.server import runstream  # (it uses this module's job checks)

    runstream.add_routes(app, ctx, _check_owner)
    # The probe's locks live in this app (one per worker) and close with it.
    probes = shareprobe.ShareProbes(ctx)
    app.router.add_post("/v1/share-probe", probes.handle)
    app.on_cleanup.append(probes.cleanup)
    return app


def radiance_version(settings: Any) -> str:
    """Radiance's version line for /v1/info (runs rpict once; cached by radiance.version)."""
    try:
        return radiance.version(str(radiance.bin_dir(settings)), radiance.raypath(settings))
    except FileNotFoundError:
        return "unknown"
