"""A job's streamed standard input and output over HTTP (``rayfront run`` like ssh).

``PUT /v1/jobs/<id>/stdin`` sends the request body (Content-Length or
chunked) to the step whose ``stdin`` is ``{"stream": true}``, and
``GET /v1/jobs/<id>/stdout`` answers (chunked) with what the step whose
``stdout`` is ``{"stream": true}`` writes, byte for byte, while it runs.
Both wait while the job is queued: they connect to the procwrap's relay
sockets in the job folder as soon as the step starts (the framing and the
acknowledgements are those of :mod:`rayserver.jobs.procwrap.streams`).

The input is complete only when the whole request body arrived: then the
end frame goes to the procwrap, which only then lets the step see the end of
its input. A body cut short (the client, its network or this worker went
away) ends the relay connection without that frame, and the procwrap fails
the job naming it. The output's end is acknowledged to the procwrap after
the HTTP answer was completed, so a job never ends ``done`` with its output
undelivered.

Memory stays constant: the body is read as it comes, one buffer at a time
(aiohttp pauses the socket when its buffer is full), each piece awaits the
relay socket's drain, and the answer awaits aiohttp's drain, so a slow side
holds the other back. The security middleware does not read these bodies
in advance and lets these answers wait for a slow reader (``streams_body``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from rayserver.jobs.procwrap.streams import (
    ACK,
    ACK_WAIT,
    FRAME,
    STDIN_SOCKET,
    STDOUT_SOCKET,
    is_stream,
)
from rayserver.server.jobspec import JobSpecError

log = logging.getLogger("rayserver.server.streams")

CHUNK = 1 << 18
READ_BUFFER = 1 << 20  # the relay socket's read buffer (asyncio's default is 64 KiB)
SOCKET_POLL = 0.05  # s between looks for the relay socket while the job is queued
# ... but in the first half second every 2 ms: a tiny job's socket appears within
# milliseconds of its submit, and a 50 ms look doubled a shim's whole overhead.
SOCKET_QUICK = 0.002
SOCKET_QUICK_SPAN = 0.5


class _Refused(JobSpecError):
    """An answer other than success (the API's error shape, like a refused job)."""


def _job_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isdigit() or not raw.isascii() or int(raw) < 1 or len(raw) > 18:
        raise _Refused(400, f"job id must be a whole number >= 1, got {raw!r}")
    return int(raw)


def streams_body(handler: Any) -> Any:
    """Mark a handler whose request body or answer is a stream (see rayserver.server.security)."""
    handler.streams_body = True
    return handler


class JobStreams:
    """The two stream routes; one sender and one reader per job at a time."""

    def __init__(self, ctx: Any, check_owner: Callable[[web.Request, Any, str], None]) -> None:
        self.ctx = ctx
        self.check_owner = check_owner  # api's: 403 for another user's job (named tokens)
        self._busy: set[tuple[int, str]] = set()

    # --- helpers ------------------------------------------------------------

    def _streamed_job(self, request: web.Request, job_id: int, key: str) -> Any:
        row = self.ctx.db.get(job_id)
        if row is None:
            raise _Refused(404, f"no job {job_id} on this server")
        self.check_owner(request, row, f"the {key} of")
        if not any(is_stream(step.get(key)) for step in row.steps):
            raise _Refused(
                409,
                f"job {job_id} has no streamed {key}: it was submitted with "
                f'"{key}": a file or null, not {{"stream": true}}',
            )
        return row

    async def _connect(
        self, job_id: int, name: str, key: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Wait for the step's relay socket (the job may be queued) and connect to it."""
        folder = self.ctx.db.log_path(job_id).parent
        loop = asyncio.get_running_loop()
        quick_until = loop.time() + SOCKET_QUICK_SPAN
        while True:
            row = self.ctx.db.get(job_id)
            if row is None or row.final:
                state = row.state if row is not None else "gone"
                raise _Refused(409, f"job {job_id} ended ({state}) before its {key} was connected")
            try:
                return await _open_unix(folder, name)
            except FileNotFoundError:
                quick = loop.time() < quick_until
                await asyncio.sleep(SOCKET_QUICK if quick else SOCKET_POLL)
            except ConnectionRefusedError:
                raise _Refused(
                    409, f"the {key} of job {job_id} is already connected (one at a time)"
                ) from None

    def _claim(self, job_id: int, key: str) -> None:
        if (job_id, key) in self._busy:
            raise _Refused(409, f"the {key} of job {job_id} is already connected (one at a time)")
        self._busy.add((job_id, key))

    # --- PUT /v1/jobs/{id}/stdin --------------------------------------------

    @streams_body
    async def put_stdin(self, request: web.Request) -> web.Response:
        job_id = _job_id(request)
        self._streamed_job(request, job_id, "stdin")
        self._claim(job_id, "stdin")
        try:
            reader, writer = await self._connect(job_id, STDIN_SOCKET, "stdin")
            try:
                sent = await self._relay_body(request, writer, job_id)
                try:
                    answer = await asyncio.wait_for(reader.readexactly(1), ACK_WAIT)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    answer = b""
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
        finally:
            self._busy.discard((job_id, "stdin"))
        if answer != ACK:
            raise _Refused(
                409, f"job {job_id} ended before it took the end of its input ({sent} bytes sent)"
            )
        log.info("job %d: %d bytes of standard input delivered", job_id, sent)
        return web.json_response({"id": job_id, "bytes": sent})

    async def _relay_body(
        self, request: web.Request, writer: asyncio.StreamWriter, job_id: int
    ) -> int:
        """The body to the relay in frames, then the end frame; the byte count."""
        sent = 0
        while True:
            try:
                chunk = await request.content.readany()
            except Exception as exc:  # noqa: BLE001 - any broken body means: not delivered
                log.warning(
                    "job %d: standard input cut short after %d bytes (%s)", job_id, sent, exc
                )
                raise _Refused(
                    400, f"the request body ended before it was complete ({sent} bytes): {exc}"
                ) from None
            try:
                writer.write(FRAME.pack(len(chunk)))
                writer.write(chunk)  # (not joined to the frame: that would copy the chunk)
                await writer.drain()
            except ConnectionError:
                raise _Refused(
                    409, f"job {job_id} stopped reading its input after {sent} bytes"
                ) from None
            if not chunk:
                return sent
            sent += len(chunk)

    # --- GET /v1/jobs/{id}/stdout --------------------------------------------

    @streams_body
    async def get_stdout(self, request: web.Request) -> web.StreamResponse:
        job_id = _job_id(request)
        self._streamed_job(request, job_id, "stdout")
        self._claim(job_id, "stdout")
        try:
            reader, writer = await self._connect(job_id, STDOUT_SOCKET, "stdout")
            try:
                return await self._relay_output(request, reader, writer, job_id)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
        finally:
            self._busy.discard((job_id, "stdout"))

    async def _relay_output(
        self,
        request: web.Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        job_id: int,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        resp.content_type = "application/octet-stream"
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent = 0
        try:
            while chunk := await reader.read(CHUNK):
                await resp.write(chunk)
                sent += len(chunk)
            await resp.write_eof()
        except ConnectionError:
            # The client went away: no ack, so the procwrap fails the job.
            log.warning("job %d: the reader of its output went away after %d bytes", job_id, sent)
            return resp
        writer.write(ACK)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        log.info("job %d: %d bytes of standard output delivered", job_id, sent)
        return resp


async def _open_unix(folder: Path, name: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``folder/name`` through ``/proc/self/fd``: the path may exceed sun_path."""
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return await asyncio.open_unix_connection(
            f"/proc/self/fd/{dir_fd}/{name}", limit=READ_BUFFER
        )
    finally:
        os.close(dir_fd)


def add_routes(
    app: web.Application, ctx: Any, check_owner: Callable[[web.Request, Any, str], None]
) -> None:
    streams = JobStreams(ctx, check_owner)
    app.router.add_put("/v1/jobs/{id}/stdin", streams.put_stdin)
    app.router.add_get("/v1/jobs/{id}/stdout", streams.get_stdout)
