"""Detaching into the background, and the pid file.

:func:`detach` double-forks (``setsid`` in between so the daemon can never
reacquire a terminal), moves to ``/`` and points stdio at /dev/null. The
original process stays until the background process reports over a
readiness pipe, so ``rayserver -d`` can print the daemon's pid and exit
non-zero when start-up fails after detaching.

:class:`PidFile` is written atomically (temp file + rename) and held with
``flock`` for the daemon's lifetime: a pid file nobody holds is stale, one
that is locked belongs to a live server, whatever pid it names.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Callable
from pathlib import Path


class PidFileError(Exception):
    """The pid file cannot be used (another live server holds it, or it cannot be written)."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class PidFile:
    """``<path>``: the pid of the running server, locked while it runs."""

    def __init__(self, path: str | Path, name: str = "Server") -> None:
        self.path = Path(path)
        self.name = name
        self._fd: int | None = None

    def holder(self) -> int | None:
        """The pid of the live server holding the file, or None (absent or stale)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise PidFileError(f"cannot read pid file {self.path}: {exc.strerror}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
                return int(text) if text.isdigit() else -1
            return None
        finally:
            os.close(fd)

    def check(self) -> None:
        """Raise PidFileError if a live server holds the pid file."""
        pid = self.holder()
        if pid is not None:
            shown = str(pid) if pid > 0 else "(unknown pid)"
            raise PidFileError(
                f"{self.name} {shown} is already running (pid file {self.path} is locked by it); "
                "stop it first, or use another RAYFRONT_HOME",
                pid,
            )

    def acquire(self) -> None:
        """Write our pid atomically and keep it locked; a stale file is replaced."""
        self.check()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise PidFileError(
                f"cannot write pid file {self.path}: {exc.strerror} "
                f"(the server's user needs write permission on {self.path.parent})"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
            os.rename(tmp, self.path)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise PidFileError(f"cannot write pid file {self.path}: {exc.strerror}") from exc
        self._fd = fd

    def is_ours(self) -> bool:
        """The file at the path is the one we wrote and still names us."""
        if self._fd is None:
            return False
        try:
            on_disk = os.stat(self.path)
        except OSError:
            return False
        mine = os.fstat(self._fd)
        if (on_disk.st_dev, on_disk.st_ino) != (mine.st_dev, mine.st_ino):
            return False
        return os.pread(self._fd, 64, 0).decode("ascii", "replace").strip() == str(os.getpid())

    def release(self) -> None:
        """Remove the pid file if it is still ours, and drop the lock."""
        if self._fd is None:
            return
        if self.is_ours():
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def forget_in_child(self) -> None:
        """In a forked child: close our copy of the descriptor without touching the file."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class Readiness:
    """The background process's end of the readiness pipe."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @property
    def pending(self) -> bool:
        return self._fd is not None

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))

    def message(self, text: str) -> None:
        """A line the original process prints on stderr (it still has the terminal)."""
        self._send(f"MSG {text}")

    def ready(self) -> None:
        """Start-up succeeded: the original process prints its message and exits 0."""
        self._send(f"READY {os.getpid()}")
        self.close()

    def fail(self, code: int, text: str = "") -> None:
        """Start-up failed: the original process prints ``text`` and exits with ``code``."""
        if text:
            self.message(text)
        self._send(f"FAIL {code or 1}")
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def detach(on_ready: Callable[[int], str], on_silence: str) -> Readiness:
    """Double fork into the background; only the background process returns.

    The original process waits for the report: on READY it prints
    ``on_ready(pid)`` and exits 0; on FAIL it exits with the code sent; if the
    pipe closes without a report it prints ``on_silence`` and exits 1.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    first = os.fork()
    if first > 0:
        os.close(wfd)
        code = _wait_for_report(rfd, on_ready, on_silence)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(first, 0)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(rfd)
    os.setsid()
    second = os.fork()
    if second > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    return Readiness(wfd)


def _wait_for_report(rfd: int, on_ready: Callable[[int], str], on_silence: str) -> int:
    buf = b""
    while True:
        try:
            chunk = os.read(rfd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            line = raw.decode("utf-8", "replace")
            kind, _, rest = line.partition(" ")
            if kind == "MSG":
                print(rest, file=sys.stderr)
            elif kind == "READY":
                print(on_ready(int(rest)))
                return 0
            elif kind == "FAIL":
                return int(rest) if rest.isdigit() else 1
    print(on_silence, file=sys.stderr)
    return 1
