"""Signal handling that only records: handlers enqueue, the main loop acts.

Logging or printing inside a signal handler can deadlock (a handler may run
while the interrupted code holds the logging lock), so the handlers here put
the signal number on a ``SimpleQueue`` and ``signal.set_wakeup_fd`` wakes the
main loop's ``select``.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
from collections.abc import Iterable
from types import FrameType


class SignalQueue:
    """Record the given signals; :meth:`drain` returns them in arrival order."""

    def __init__(self, signals: Iterable[int]) -> None:
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._rsock, self._wsock = socket.socketpair()
        self._rsock.setblocking(False)
        self._wsock.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._wsock.fileno(), warn_on_full_buffer=False)
        self._signals = list(signals)
        self._old: dict[int, object] = {}
        for signum in self._signals:
            self._old[signum] = signal.signal(signum, self._record)

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self._queue.put_nowait(signum)

    def fileno(self) -> int:
        """Readable when a signal arrived (for select)."""
        return self._rsock.fileno()

    def drain(self) -> list[int]:
        """All signals recorded since the last call."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._rsock.recv(4096):
                pass
        got: list[int] = []
        while True:
            try:
                got.append(self._queue.get_nowait())
            except queue.Empty:
                return got

    def close(self, defaults: bool = False) -> None:
        """Stop recording: restore the old handlers (or SIG_DFL) and release the wakeup fd."""
        for signum in self._signals:
            old = signal.SIG_DFL if defaults else self._old.get(signum, signal.SIG_DFL)
            if old is None:
                old = signal.SIG_DFL
            signal.signal(signum, old)  # type: ignore[arg-type]
        signal.set_wakeup_fd(-1)
        self._rsock.close()
        self._wsock.close()
