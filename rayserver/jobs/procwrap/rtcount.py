"""Progress of an rtrace step: output records counted against input records."""

from __future__ import annotations

import contextlib
import os

from rayserver.jobs.procwrap import progress as prog


class RtraceCount:
    """Progress of rtrace with stdin and stdout files: output records against input ones.

    Both files are reopened through /proc at the start (own offsets), but
    read only when the first sample is due, so a tiny job never reads them.
    """

    def __init__(self, in_fd: int, out_fd: int, header: bool) -> None:
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.counter = prog.LineCounter(header=header)
        self.in_lines: int | None = None

    def fraction(self) -> float | None:
        if self.in_lines is None:
            chunks = []
            with contextlib.suppress(OSError):
                while chunk := os.read(self.in_fd, 1 << 20):
                    chunks.append(chunk)
            self.in_lines = prog.count_lines(b"".join(chunks))
        if not self.in_lines:
            return None
        with contextlib.suppress(OSError):
            while chunk := os.read(self.out_fd, 1 << 20):
                self.counter.feed(chunk)
        return self.counter.lines / self.in_lines

    def close(self) -> None:
        for fd in (self.in_fd, self.out_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
