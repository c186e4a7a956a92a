"""The worker's asyncio side of the fork server (:mod:`rayserver.jobs.executors.forkserver`).

Launches are sent without waiting for the answer; the fork server's
``started``/``error`` answers come back in launch order, its ``exited``
reports whenever a procwrap it forked is reaped, and each procwrap's
"final state recorded" and "row changed" datagrams on a second socket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import Callable

from rayserver.jobs.executors.forkserver import MAX_PACKET, ForkServer, ForkServerError


class ForkServerClient:
    """The worker's asyncio side of the fork server.

    ``on_exit(job_id, pid, raw_status)`` is called in the event loop when a
    procwrap the fork server started has exited; ``on_final(job_id)`` when a
    procwrap committed its job's final state (it exits next); ``on_change(job_id)``
    when it changed its job's row otherwise (claim, progress); ``on_lost()``
    when the fork server went away. Construct it inside the running loop (or
    the reader is attached at the first launch).
    """

    def __init__(
        self,
        handle: ForkServer,
        on_exit: Callable[[int, int, int], None],
        *,
        on_lost: Callable[[], None] | None = None,
        on_final: Callable[[int], None] | None = None,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.handle = handle
        self.on_exit = on_exit
        self.on_lost = on_lost
        self.on_final = on_final
        self.on_change = on_change
        self._waiting: collections.deque[Callable[[int | None, str | None], None]] = (
            collections.deque()
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.handle.sock.setblocking(False)
        if self.handle.final_sock is not None:
            self.handle.final_sock.setblocking(False)
        with contextlib.suppress(RuntimeError):
            self._attach(asyncio.get_running_loop())

    @property
    def closed(self) -> bool:
        return self._closed

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self.handle.sock.fileno(), self._readable)
            if self.handle.final_sock is not None:
                loop.add_reader(self.handle.final_sock.fileno(), self._final_readable)

    def _final_readable(self) -> None:
        assert self.handle.final_sock is not None
        while True:
            try:
                raw = self.handle.final_sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                with contextlib.suppress(Exception):
                    assert self._loop is not None
                    self._loop.remove_reader(self.handle.final_sock.fileno())
                return
            if raw.isdigit() and self.on_final is not None:
                self.on_final(int(raw))
            elif raw[:1] == b"c" and raw[1:].isdigit() and self.on_change is not None:
                self.on_change(int(raw[1:]))

    def _readable(self) -> None:
        while True:
            try:
                raw = self.handle.sock.recv(MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                raw = b""
            if not raw:
                self._lost()
                return
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            op = msg.get("op")
            if op == "exited":
                self.on_exit(int(msg["job"]), int(msg["pid"]), int(msg["status"]))
            elif op in ("started", "error") and self._waiting:
                done = self._waiting.popleft()
                if op == "started":
                    done(int(msg["pid"]), None)
                else:
                    done(None, str(msg.get("message", "launch failed")))

    def _lost(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._detach()
        while self._waiting:
            self._waiting.popleft()(None, "the fork server exited")
        if self.on_lost is not None:
            self.on_lost()

    def _detach(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.handle.sock.fileno())
        if self.handle.final_sock is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.handle.final_sock.fileno())

    def launch_nowait(self, job_id: int, done: Callable[[int | None, str | None], None]) -> None:
        """Ask for a procwrap for ``job_id`` without waiting for the answer.

        ``done(pid, None)`` follows once it is forked, or ``done(None, message)``
        when the launch failed; both are called in the event loop, in launch
        order. Raises ForkServerError at once when the fork server is gone.
        """
        if self._closed:
            raise ForkServerError("the fork server is not running")
        self._attach(asyncio.get_running_loop())
        self._waiting.append(done)
        try:
            self.handle.sock.send(b'{"op": "launch", "job": %d}' % int(job_id))
        except OSError as exc:
            self._waiting.remove(done)
            self._lost()
            raise ForkServerError(f"cannot reach the fork server: {exc}") from exc

    async def launch(self, job_id: int) -> int:
        """Fork a procwrap for ``job_id``; returns its pid (its own process group)."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def done(pid: int | None, error: str | None) -> None:
            if fut.done():
                return
            if pid is not None:
                fut.set_result(pid)
            else:
                fut.set_exception(ForkServerError(error or "launch failed"))

        self.launch_nowait(job_id, done)
        return await fut

    def close(self) -> None:
        """Detach from the loop, close the socket (the server exits) and reap it."""
        self._shut()
        self.handle.stop()

    async def aclose(self) -> None:
        """:meth:`close` that waits for the fork server's exit in a thread, not on the loop."""
        self._shut()
        await asyncio.to_thread(self.handle.stop)

    def _shut(self) -> None:
        if not self._closed:
            self._detach()
        self._closed = True
        while self._waiting:
            self._waiting.popleft()(None, "the fork server client was closed")
