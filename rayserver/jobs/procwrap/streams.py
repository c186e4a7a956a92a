"""A step's standard input and output streamed through the worker (``rayfront run`` like ssh).

A step whose ``stdin`` is ``{"stream": true}`` reads a pipe that a relay
thread of this procwrap fills from a unix socket in the job folder
(``stdin.sock``); the worker connects to it for ``PUT /v1/jobs/<id>/stdin``
and sends the body in frames: an 8-byte big-endian length, then that many
bytes; a frame of length 0 says the input is complete. Only then is the
step's pipe closed, so the step sees end-of-input exactly when all of it
arrived: a sender that goes away mid-way (client, network or worker) leaves
the pipe open, and the job is ended with that reason instead (see
:class:`InputRelay`). The worker gets one byte back (:data:`ACK`) when the
end was taken.

A step whose ``stdout`` is ``{"stream": true}`` writes into a pipe whose
bytes the other relay thread sends, unchanged, to the worker connected to
``stdout.sock`` (``GET /v1/jobs/<id>/stdout``). At the step's end-of-output
the relay shuts its side down and waits for the worker's :data:`ACK`, sent
once the HTTP answer is complete: no ack, no ``done``.

Bytes move with ``splice(2)`` from socket to pipe and back, up to
:data:`CHUNK` at a time, so memory stays constant whatever the size, and a
full pipe or socket holds the other side back (backpressure all the way to
the client). Socket paths are bound through ``/proc/self/fd/<folder fd>``:
a job folder deep in a long home would not fit ``sun_path``'s 108 bytes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FRAME = struct.Struct(">Q")  # length of the next chunk of input; 0: the input is complete
ACK = b"\x01"
STDIN_SOCKET = "stdin.sock"
STDOUT_SOCKET = "stdout.sock"
CHUNK = 1 << 20
CONNECT_WAIT = 120.0  # s for the worker to connect once the step has started
ACK_WAIT = 60.0  # s for the worker to confirm the whole output was answered
POLL = 0.5  # s between looks at a stop request while a pipe end is not ready


class _Stopped(Exception):
    """The procwrap asked a relay to stop (the step ended or was cancelled)."""


def is_stream(redirect: Any) -> bool:
    """True for a step's ``{"stream": true}`` stdin or stdout."""
    return isinstance(redirect, dict) and redirect.get("stream") is True


def listen(job_dir: Path, name: str) -> socket.socket:
    """A listening unix socket ``job_dir/name`` (mode 0600, replacing a stale one).

    It is bound under a temporary name and renamed once it listens: a
    connection refused at the real name then always means "taken already".
    """
    dir_fd = os.open(job_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    temp = f".{name}.{os.getpid()}"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dir_fd)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(f"/proc/self/fd/{dir_fd}/{temp}")
            finally:
                os.umask(old)
            sock.listen(1)
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)
    return sock


def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    """``size`` bytes, or None when the peer closed first (at any point)."""
    data = b""
    while len(data) < size:
        part = conn.recv(size - len(data))
        if not part:
            return None
        data += part
    return data


class _Relay(threading.Thread):
    """One direction of a streamed step; ``failure`` says why it did not end well."""

    what = "stream"

    def __init__(self, listener: socket.socket, pipe_fd: int, wake: Callable[[], None]) -> None:
        super().__init__(daemon=True, name=f"relay-{self.what}")
        self.listener = listener
        self.pipe_fd = pipe_fd
        self.wake = wake
        self.conn: socket.socket | None = None
        self.bytes = 0
        self.failure: str | None = None
        self.finished = False
        self._stopping = False

    def run(self) -> None:
        try:
            self.conn = self._accept()
            if self.conn is not None:
                self.relay(self.conn)
        except _Stopped:
            pass
        except OSError as exc:
            if not self._stopping:
                self.failure = self.failure or self.describe(exc)
        finally:
            self.finished = True
            self.wake()

    def _accept(self) -> socket.socket | None:
        """The worker's connection; None when stopped first or nobody came in time."""
        deadline = time.monotonic() + CONNECT_WAIT
        self.listener.setblocking(False)
        try:
            while not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.failure = f"nobody connected to its {self.what} within {CONNECT_WAIT:g} s"
                    return None
                if select.select([self.listener], [], [], min(POLL, left))[0]:
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = self.listener.accept()
                        conn.setblocking(True)
                        return conn
            return None
        finally:
            self.listener.close()  # one connection per stream: later ones are refused

    def relay(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def splice(self, src: int, dst: int, size: int) -> int:
        """``splice(2)`` of up to ``size`` bytes; waits for the pipe end without blocking in it.

        The pipe side is polled (so :meth:`stop` is noticed within
        :data:`POLL` even while the step neither reads nor writes); the
        socket side may block, and :meth:`stop` wakes it by shutting it down.
        """
        pipe_is_src = src == self.pipe_fd
        while True:
            if self._stopping:
                raise _Stopped
            ready = select.select(
                [self.pipe_fd] if pipe_is_src else [],
                [] if pipe_is_src else [self.pipe_fd],
                [],
                POLL,
            )
            if not (ready[0] or ready[1]):
                continue
            try:
                return os.splice(src, dst, size, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                continue

    def describe(self, exc: OSError) -> str:
        return f"its {self.what} broke after {self.bytes} bytes ({exc.strerror or exc})"

    def stop(self) -> None:
        """Ask the thread to end: it notices within POLL, or at once where it blocks on the socket."""
        self._stopping = True
        conn = self.conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """After the thread ended: release the socket and the pipe end."""
        for sock in (self.listener, self.conn):
            if sock is not None:
                sock.close()
        with contextlib.suppress(OSError):
            os.close(self.pipe_fd)


class InputRelay(_Relay):
    """Frames from the worker into the step's stdin pipe; the pipe closes only at the end frame.

    ``complete`` is True once the end frame came (and the pipe was closed);
    ``reader_closed`` when the step closed its input first (it needed no
    more, like ``head``): not a failure. Otherwise ``failure`` names what
    happened, and the pipe stays open until :meth:`close`, after the
    procwrap killed the step: it never sees a truncated input end.
    """

    what = "standard input"

    def __init__(self, listener: socket.socket, pipe_fd: int, wake: Callable[[], None]) -> None:
        super().__init__(listener, pipe_fd, wake)
        self.complete = False
        self.reader_closed = False

    def relay(self, conn: socket.socket) -> None:
        while True:
            head = _recv_exactly(conn, FRAME.size)
            if head is None:
                if not self._stopping:
                    self.failure = self._cut_short()
                return
            (size,) = FRAME.unpack(head)
            if size == 0:
                os.close(self.pipe_fd)
                self.pipe_fd = -1
                self.complete = True
                conn.sendall(ACK)
                return
            if not self._move(conn, size):
                return

    def _move(self, conn: socket.socket, size: int) -> bool:
        while size:
            try:
                n = self.splice(conn.fileno(), self.pipe_fd, min(size, CHUNK))
            except BrokenPipeError:
                self.reader_closed = True
                return False
            if n == 0:
                if not self._stopping:
                    self.failure = self._cut_short()
                return False
            size -= n
            self.bytes += n
        return True

    def _cut_short(self) -> str:
        return (
            f"its standard input was not delivered completely: the sender went away "
            f"after {self.bytes} bytes, before the end of the input"
        )

    def describe(self, exc: OSError) -> str:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):
            return self._cut_short()
        return super().describe(exc)


class OutputRelay(_Relay):
    """The step's stdout pipe to the worker, byte for byte; ``delivered`` once acknowledged."""

    what = "standard output"

    def __init__(self, listener: socket.socket, pipe_fd: int, wake: Callable[[], None]) -> None:
        super().__init__(listener, pipe_fd, wake)
        self.delivered = False

    def relay(self, conn: socket.socket) -> None:
        while True:
            n = self.splice(self.pipe_fd, conn.fileno(), CHUNK)
            if n == 0:
                break  # every writer closed the pipe: the output is complete
            self.bytes += n
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(ACK_WAIT)
        try:
            answer = conn.recv(1)
        except TimeoutError:
            answer = b""
        if answer == ACK:
            self.delivered = True
        elif not self._stopping:
            self.failure = (
                f"its standard output ({self.bytes} bytes) was not confirmed as delivered "
                "to the client"
            )

    def describe(self, exc: OSError) -> str:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):
            return (
                f"the reader of its standard output went away after {self.bytes} bytes, "
                "before the end of the output"
            )
        return super().describe(exc)


class StreamError(Exception):
    """A streamed stdin or stdout of a step did not end well; the job fails with the message."""

    def __init__(self, message: str, code: int | None, sig: int | None) -> None:
        super().__init__(message)
        self.code = code
        self.signal = sig


class StepStreams:
    """The relays of one step: none, its stdin, its stdout, or both.

    The procwrap opens them before the spawn (:meth:`open_input`,
    :meth:`open_output` return the step's pipe ends), starts them after it,
    looks at :meth:`new_failure` while the step runs and calls
    :meth:`finish` once the step's group is gone.
    """

    def __init__(self, step: Any, job_dir: Path, wake: Callable[[], None]) -> None:
        self.job_dir = Path(job_dir)
        self.wake = wake
        self.relays: list[_Relay] = []
        self._reported: set[int] = set()

    def open_input(self) -> int:
        return self._open(InputRelay, STDIN_SOCKET)

    def open_output(self) -> int:
        return self._open(OutputRelay, STDOUT_SOCKET)

    def _open(self, kind: type[_Relay], name: str) -> int:
        # A closed peer must be an EPIPE in the relay, not a signal that ends the procwrap
        # (the step gets SIGPIPE back: spawn resets it to the default).
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.job_dir.mkdir(parents=True, exist_ok=True)
        read_end, write_end = os.pipe()
        mine, steps = (write_end, read_end) if kind is InputRelay else (read_end, write_end)
        try:
            listener = listen(self.job_dir, name)
        except OSError:
            os.close(read_end)
            os.close(write_end)
            raise
        self.relays.append(kind(listener, mine, self.wake))
        return steps

    def start(self) -> None:
        for relay in self.relays:
            relay.start()

    def new_failure(self) -> _Relay | None:
        """A relay that failed since the last call (the step must be stopped), or None."""
        for relay in self.relays:
            if relay.failure and id(relay) not in self._reported:
                self._reported.add(id(relay))
                return relay
        return None

    def finish(self, cancelled: Callable[[], bool], log: Callable[[str], None]) -> str | None:
        """After the step: let the relays end; why a stream failed, or None.

        The input relay is stopped (the step ended: it needed no more); the
        output relay sends what is left in the pipe and waits for the
        worker's ack, unless the job is being cancelled.
        """
        failure = None
        for relay in self.relays:
            if isinstance(relay, InputRelay):
                relay.stop()
            while relay.is_alive():
                if cancelled():
                    relay.stop()
                relay.join(POLL)
            if relay.failure and id(relay) not in self._reported:
                log(f"rayserver: {relay.failure}\n")
            failure = failure or relay.failure
        self.abort()
        return failure

    def abort(self) -> None:
        """Close every socket and pipe end of the relays and remove the socket files."""
        for relay in self.relays:
            relay.close()
        for name in (STDIN_SOCKET, STDOUT_SOCKET):
            with contextlib.suppress(OSError):
                (self.job_dir / name).unlink()
        self.relays = []
