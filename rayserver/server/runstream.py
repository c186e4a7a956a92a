"""``POST /v1/jobs/run``: submit one job and follow it in the same exchange (the shims).

A shim used to pay for five exchanges per command (submit, the standard
input and output streams, the log, the final state). Here the request body
is the job's JSON on one line, then, for a step whose ``stdin`` is
``{"stream": true}``, the bytes of its standard input until the body ends
(chunked). Once the job is queued the answer (201, ``Location`` naming the
job, chunked) is a sequence of frames: one byte of kind, a 4-byte
big-endian length, the payload:

- ``J``: the job object as queued (first);
- ``O``: bytes of the streamed standard output, in order;
- ``L``: bytes of the job's log (the program's messages, framed by the
  server's ``== ... ==`` lines), in order;
- ``X``: last, ``{"job": <the final job object>, "problems": [...]}``, where
  problems name a stream that did not end well.

A job refused before it is queued gets the API's usual error answer. The
delivery rules of :mod:`rayserver.server.streams` hold: the end of the input
reaches the program only when the whole body arrived, and the end of the
output is acknowledged to the procwrap only after its last frame was
written, so a job never ends ``done`` with its output undelivered. A
client that goes away before the last frame (a shim killed outright) has its
job cancelled: nobody would take the output, as with a command under ssh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
from collections.abc import Callable
from typing import Any

from aiohttp import web

from rayserver.jobs.procwrap.streams import ACK, ACK_WAIT, STDIN_SOCKET, STDOUT_SOCKET, is_stream
from rayserver.server import api, jsonbody
from rayserver.server.streams import CHUNK, JobStreams, streams_body

log = logging.getLogger("rayserver.server.runstream")

FRAME = struct.Struct(">cI")
CONTENT_TYPE = "application/x-rayserver-frames"


class _Frames:
    """Frames on one chunked answer; writers of the output and of the log take turns."""

    def __init__(self, resp: web.StreamResponse) -> None:
        self.resp = resp
        self.lock = asyncio.Lock()

    async def send(self, kind: bytes, payload: bytes) -> None:
        async with self.lock:
            await self.resp.write(FRAME.pack(kind, len(payload)) + payload)


class RunStream:
    """The route; the stream plumbing is that of :class:`JobStreams`."""

    def __init__(self, ctx: Any, check_owner: Callable[[web.Request, Any, str], None]) -> None:
        self.ctx = ctx
        self.streams = JobStreams(ctx, check_owner)

    @streams_body
    async def run(self, request: web.Request) -> web.StreamResponse:
        data = await _job_line(request)
        job_id = await api.accept_job(request, data)
        row = self.ctx.db.get(job_id)
        resp = web.StreamResponse(
            status=201, headers={"Location": f"/v1/jobs/{job_id}", "Cache-Control": "no-cache"}
        )
        resp.content_type = CONTENT_TYPE
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        frames = _Frames(resp)
        try:
            await frames.send(b"J", json.dumps(self.ctx.db.public(row)).encode())
            problems = await self._follow(request, row, frames)
            final = self.ctx.db.public(self.ctx.db.get(job_id))
            end = {"job": final, "problems": problems}
            await frames.send(b"X", json.dumps(end).encode())
            await resp.write_eof()
        except ConnectionError:
            await self._abandoned(job_id)
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client's connection is lost, even
            # while a quiet program (a render) gives nothing to write.
            await asyncio.shield(self._abandoned(job_id))
            raise
        return resp

    async def _abandoned(self, job_id: int) -> None:
        """The client went away: nobody takes the output any more, so the job is cancelled."""
        row = self.ctx.db.get(job_id)
        if row is None or row.final or row.cancel_request:
            return  # (or already cancelled: _stdout does it before closing its relay)
        log.warning("job %d: the client of its run went away; cancelling the job", job_id)
        await self.ctx.scheduler.cancel(job_id)

    async def _follow(self, request: web.Request, row: Any, frames: _Frames) -> list[str]:
        """Relay the streams and the log until the job is final; problems to tell."""
        problems: list[str] = []
        tasks = [asyncio.create_task(self._log(row.id, frames))]
        if any(is_stream(s.get("stdout")) for s in row.steps):
            tasks.append(asyncio.create_task(self._stdout(row.id, frames, problems)))
        sender = None
        if any(is_stream(s.get("stdin")) for s in row.steps):
            sender = asyncio.create_task(self._stdin(request, row.id, problems))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            if sender is not None:
                # The program may end without reading all of its input (like head).
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
        return problems

    async def _log(self, job_id: int, frames: _Frames) -> None:
        reader = api._LogReader(self.ctx.db.log_path(job_id), 0)
        try:
            while True:
                # The state before the drain: a job recorded final has written its whole log.
                row = self.ctx.db.get(job_id)
                final = row is None or row.final
                while chunk := await reader.chunk():
                    await frames.send(b"L", chunk)
                if final:
                    return
                await self.ctx.scheduler.wait(job_id, api.FOLLOW_INTERVAL)
        finally:
            await reader.close()

    async def _stdout(self, job_id: int, frames: _Frames, problems: list[str]) -> None:
        try:
            reader, writer = await self.streams._connect(job_id, STDOUT_SOCKET, "stdout")
        except api.JobSpecError as exc:
            problems.append(exc.message)
            return
        sent = 0
        try:
            while chunk := await reader.read(CHUNK):
                try:
                    await frames.send(b"O", chunk)
                except ConnectionError:
                    await self._abandoned(job_id)  # (see below)
                    raise
                sent += len(chunk)
            writer.write(ACK)  # every frame is written: the procwrap may call it done
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            log.info("job %d: %d bytes of standard output delivered", job_id, sent)
        except asyncio.CancelledError:
            # The client went away. Cancel the job before the relay's connection closes
            # (awaited directly, this runs through to the procwrap's signal without a
            # pause): else the procwrap sees its output cut short first and records a
            # failure where the client's end was a cancel (a shim killed outright).
            await self._abandoned(job_id)
            raise
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _stdin(self, request: web.Request, job_id: int, problems: list[str]) -> None:
        try:
            reader, writer = await self.streams._connect(job_id, STDIN_SOCKET, "stdin")
        except api.JobSpecError as exc:
            problems.append(exc.message)
            return
        try:
            sent = await self.streams._relay_body(request, writer, job_id)
            answer = await asyncio.wait_for(reader.readexactly(1), ACK_WAIT)
            if answer == ACK:
                log.info("job %d: %d bytes of standard input delivered", job_id, sent)
        except api.JobSpecError as exc:
            # 409: the program stopped reading (its own business, its state tells);
            # a body cut short fails the job in the procwrap, and is said here too.
            if exc.status != 409:
                problems.append(exc.message)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass  # the program ended without taking the end of its input: its state tells
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _job_line(request: web.Request) -> Any:
    """The job object: the body's first line (JSON)."""
    what = "the job as one line of JSON, then the standard input"
    if not request.body_exists:
        raise api.ApiError(400, f"the request has no body; expected {what}")
    try:
        line = await request.content.readuntil(b"\n")
    except ValueError:
        raise api.ApiError(
            413, "the job line is too long; expected one line of JSON of at most 64 KiB"
        ) from None
    if not line.endswith(b"\n"):
        raise api.ApiError(400, f"the body ended inside the job line; expected {what}")
    return jsonbody.parse(line, f"{what} (a JSON job object)")


def add_routes(
    app: web.Application, ctx: Any, check_owner: Callable[[web.Request, Any, str], None]
) -> None:
    app.router.add_post("/v1/jobs/run", RunStream(ctx, check_owner).run)
