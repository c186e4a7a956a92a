"""The fork server: a small single-threaded process that forks one procwrap per job.

The worker forks it first thing, before any thread or event loop exists, so
every procwrap is forked from a clean single-threaded process that has
already imported the procwrap code: a job starts within milliseconds and
never inherits the worker's threads, locks or sockets.

Protocol over a ``SOCK_SEQPACKET`` socketpair, one JSON object per packet:

    worker -> server  {"op": "launch", "job": <id>}
    server -> worker  {"op": "started", "job": <id>, "pid": <pid>}
                      {"op": "error", "job": <id>, "message": "..."}
                      {"op": "exited", "job": <id>, "pid": <pid>, "status": <raw wait status>}

On EOF from the worker the fork server exits at once; its procwraps live on
(they run in sessions of their own; the supervisor, a subreaper, reaps them).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayserver import procwrap  # preimported: forked children start with it loaded
from rayserver.paths import Layout
from rayserver.settings import Settings

_MAX_PACKET = 65536


class ForkServerError(Exception):
    """The fork server is gone or refused a launch."""


@dataclass
class ForkServer:
    """Handle of a running fork server: its pid and the worker's end of the socketpair."""

    pid: int
    sock: socket.socket

    @classmethod
    def start(cls, layout: Layout, db_path: Path, settings: Settings) -> ForkServer:
        """Fork the fork server. Call before any thread or event loop exists."""
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, covered by the tests' processes
            code = 1
            try:
                parent_sock.close()
                code = _serve(child_sock, layout, Path(db_path), settings)
            except BaseException:  # noqa: BLE001 - a child must never return into the worker
                with contextlib.suppress(Exception):
                    import traceback

                    traceback.print_exc()
            finally:
                os._exit(code)
        child_sock.close()
        return cls(pid, parent_sock)

    def stop(self, timeout: float = 2.0) -> int | None:
        """Close our end (the server exits on EOF) and reap it; returns its wait status."""
        with contextlib.suppress(OSError):
            self.sock.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid:
                return status
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                deadline = time.monotonic() + timeout
            time.sleep(0.01)


def _send(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.send(json.dumps(msg).encode())


def _serve(sock: socket.socket, layout: Layout, db_path: Path, settings: Settings) -> int:
    """The fork server's loop (in its own process)."""
    with contextlib.suppress(ImportError):
        import setproctitle

        setproctitle.setproctitle(f"{layout.server_title} forkserver")
    # Ctrl-C on a foreground server reaches the whole group: the worker decides,
    # then closes the socket, and we follow on EOF.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the worker's inherited handler
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the loop
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    children: dict[int, int] = {}  # pid -> job id
    grace = settings.cancel_grace

    while True:
        try:
            ready, _, _ = select.select([sock, wake_r], [], [])
        except InterruptedError:
            ready = []
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
        # Reap on every turn: a SIGCHLD may have been merged with another.
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            job = children.pop(pid, None)
            if job is not None:
                try:
                    _send(sock, {"op": "exited", "job": job, "pid": pid, "status": status})
                except OSError:
                    return 0
        if sock not in ready:
            continue
        try:
            raw = sock.recv(_MAX_PACKET)
        except ConnectionResetError:
            return 0
        if not raw:
            return 0  # the worker is gone: so are we; procwraps live on
        try:
            msg = json.loads(raw)
            if msg.get("op") != "launch":
                raise ValueError(f"unknown op {msg.get('op')!r}; expected 'launch'")
            job_id = msg["job"]
            if not isinstance(job_id, int) or isinstance(job_id, bool) or job_id < 1:
                raise ValueError(f"job must be a positive integer, got {job_id!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            _send(sock, {"op": "error", "job": None, "message": f"bad request: {exc}"})
            continue
        try:
            pid = os.fork()
        except OSError as exc:
            _send(sock, {"op": "error", "job": job_id, "message": f"fork failed: {exc}"})
            continue
        if pid == 0:  # pragma: no cover - child
            code = procwrap.EXIT_INTERNAL
            try:
                sock.close()
                signal.set_wakeup_fd(-1)
                os.close(wake_r)
                os.close(wake_w)
                for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_DFL)
                os.setsid()
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.close(devnull)
                with contextlib.suppress(ImportError):
                    import setproctitle

                    # Final title (with the job's name) is set by run_job; this one
                    # already lets an adopting worker recognise us.
                    setproctitle.setproctitle(f"{layout.procwrap_title} job={job_id}")
                code = procwrap.run_job(db_path, job_id, grace=grace)
            except BaseException:  # noqa: BLE001
                with contextlib.suppress(Exception):
                    import traceback

                    traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os._exit(code)
        children[pid] = job_id
        try:
            _send(sock, {"op": "started", "job": job_id, "pid": pid})
        except OSError:
            return 0


class ForkServerClient:
    """The worker's asyncio side of the fork server.

    ``on_exit(job_id, pid, raw_status)`` is called in the event loop when a
    procwrap the fork server started has exited. Construct it inside the
    running loop (or the reader is attached at the first launch).
    """

    def __init__(self, handle: ForkServer, on_exit: Callable[[int, int, int], None]) -> None:
        self.handle = handle
        self.on_exit = on_exit
        self.on_lost: Callable[[], None] | None = None
        self._waiting: collections.deque[asyncio.Future[int]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.handle.sock.setblocking(False)
        with contextlib.suppress(RuntimeError):
            self._attach(asyncio.get_running_loop())

    @property
    def closed(self) -> bool:
        return self._closed

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self.handle.sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                raw = self.handle.sock.recv(_MAX_PACKET)
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
                fut = self._waiting.popleft()
                if fut.done():
                    continue
                if op == "started":
                    fut.set_result(int(msg["pid"]))
                else:
                    fut.set_exception(ForkServerError(msg.get("message", "launch failed")))

    def _lost(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.handle.sock.fileno())
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(ForkServerError("the fork server exited"))
        if self.on_lost is not None:
            self.on_lost()

    async def launch(self, job_id: int) -> int:
        """Fork a procwrap for ``job_id``; returns its pid (its own process group)."""
        if self._closed:
            raise ForkServerError("the fork server is not running")
        loop = asyncio.get_running_loop()
        self._attach(loop)
        fut: asyncio.Future[int] = loop.create_future()
        self._waiting.append(fut)
        try:
            self.handle.sock.send(json.dumps({"op": "launch", "job": int(job_id)}).encode())
        except OSError as exc:
            self._waiting.remove(fut)
            self._lost()
            raise ForkServerError(f"cannot reach the fork server: {exc}") from exc
        return await fut

    def close(self) -> None:
        """Detach from the loop, close the socket (the server exits) and reap it."""
        if self._loop is not None and not self._closed:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.handle.sock.fileno())
        self._closed = True
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(ForkServerError("the fork server client was closed"))
        self.handle.stop()
