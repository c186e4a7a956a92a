"""The worker's heartbeat, and what the worker gets from the supervisor.

:class:`Heartbeat` is a beat counter in anonymous shared memory
(``mmap(-1, ...)`` is ``MAP_SHARED``, so it survives ``fork``): the worker's
event loop bumps it, the supervisor samples it and notes when it last
changed. No file, no descriptor the worker's own children could inherit and
hold, nothing that can block the worker when the supervisor is slow.
Sampling a counter, rather than reading a timestamp, means a torn read can
only look like one more beat, never like a beat from the future.

:class:`WorkerLink` is what the worker's target is handed: ``ready()``
(also available by calling the link, the form ``target(sock, notify_ready)``
uses) and ``beat()``, with the interval it should beat at.
"""

from __future__ import annotations

import contextlib
import mmap
import os

BEAT_BYTES = 8
# How often the worker beats and the supervisor samples, at most: small next
# to any sensible worker_timeout, and a negligible cost to both.
MAX_INTERVAL = 1.0


def beat_interval(timeout: float | None) -> float:
    """Seconds between beats (and between the supervisor's samples) for ``timeout``."""
    if timeout is None:
        return MAX_INTERVAL
    return min(MAX_INTERVAL, timeout / 4)


class Heartbeat:
    """One worker's beat counter; one instance per spawned worker."""

    def __init__(self, timeout: float | None, boot_timeout: float, now: float) -> None:
        self.timeout = timeout
        self.boot_timeout = boot_timeout
        self.interval = beat_interval(timeout)
        self._mem: mmap.mmap | None = mmap.mmap(-1, BEAT_BYTES)
        self._sent = 0  # worker side: beats written
        self._seen = 0  # supervisor side: the last count read
        self._seen_at = now

    # ------------------------------------------------------------- worker side

    def beat(self) -> None:
        """One beat (called from the worker's event loop)."""
        if self._mem is None:
            return
        self._sent = (self._sent + 1) % (1 << 63)
        self._mem[0:BEAT_BYTES] = self._sent.to_bytes(BEAT_BYTES, "little")

    # --------------------------------------------------------- supervisor side

    def observe(self, now: float) -> None:
        """Sample the counter; a change since the last sample is a beat seen ``now``."""
        if self._mem is None:
            return
        count = int.from_bytes(self._mem[0:BEAT_BYTES], "little")
        if count != self._seen:
            self._seen = count
            self._seen_at = now

    @property
    def started(self) -> bool:
        """The worker has beaten at least once (its event loop runs)."""
        return self._seen != 0

    def silent_for(self, now: float) -> float:
        """Seconds since the last beat seen (since the spawn before the first one)."""
        return now - self._seen_at

    def limit(self) -> float | None:
        """The silence allowed now: ``timeout``, or more before the first beat; None: unwatched."""
        if self.timeout is None:
            return None
        return self.timeout if self.started else max(self.timeout, self.boot_timeout)

    def overdue(self, now: float) -> bool:
        """The worker has been silent longer than allowed."""
        limit = self.limit()
        return limit is not None and self.silent_for(now) >= limit

    def close(self) -> None:
        if self._mem is not None:
            with contextlib.suppress(BufferError, ValueError):
                self._mem.close()
            self._mem = None


class WorkerLink:
    """The worker's line to the supervisor: report ready once, beat the heartbeat."""

    def __init__(self, ready_fd: int, heartbeat: Heartbeat) -> None:
        self._ready_fd: int | None = ready_fd
        self._heartbeat = heartbeat
        self.beat_interval = heartbeat.interval

    def ready(self) -> None:
        """The worker serves: from now on its death is a crash, never a start-up error."""
        if self._ready_fd is None:
            return
        fd, self._ready_fd = self._ready_fd, None
        with contextlib.suppress(OSError):
            os.write(fd, b"R")
            os.close(fd)

    __call__ = ready

    def beat(self) -> None:
        """Tell the supervisor the worker's event loop still runs."""
        self._heartbeat.beat()
