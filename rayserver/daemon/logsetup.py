"""Server logging: ``<home>/srvlogs/<hostname>`` plus, in the foreground, the terminal.

Every file line carries time, pid and level, so the lines of the supervisor
and of successive workers can be told apart. The file handler reopens the
file when logrotate moved it away (``WatchedFileHandler``, checked at each
record) and on SIGUSR1 (:meth:`LogSetup.reopen`). A write error such as a
full disk never reaches the server's code: it is reported once on stderr
(the terminal in the foreground) and logging resumes when writes work again.

Messages marked as announcements (:func:`supervisor.util.announce`) appear on
the terminal verbatim, as the manual prints them; other records get a short
time and level prefix, coloured with colorlog when the stream is a tty.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
from pathlib import Path
from typing import TextIO

from supervisor.util import ANNOUNCE

FILE_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
TERM_FORMAT = "%(asctime)s %(levelname)s %(message)s"
COLORS = {
    "DEBUG": "cyan",
    "INFO": "green",
    "WARNING": "yellow",
    "ERROR": "red",
    "CRITICAL": "bold_red",
}


class LogFileError(Exception):
    """The log file cannot be opened; the message names path and OS error."""


class ResilientFileHandler(logging.handlers.WatchedFileHandler):
    """A watched file handler that survives write errors (ENOSPC, EIO, ...).

    The default ``handleError`` prints a traceback per record; here the first
    failure is reported once on stderr, the stream is dropped (its buffer
    would fail again) and reopened with the next record.
    """

    def __init__(self, filename: str | Path) -> None:
        super().__init__(filename, mode="a", encoding="utf-8")
        self.failing: str | None = None
        self._ok = True

    def emit(self, record: logging.LogRecord) -> None:
        self._ok = True
        try:
            # Opening (first record, or after rotation) can fail as well as writing.
            super().emit(record)
        except OSError as exc:
            self._fail(exc)
        if self._ok and self.failing is not None:
            self.failing = None
            _stderr(f"rayserver: log file {self.baseFilename} is writable again")

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging API
        self._fail(sys.exc_info()[1])

    def _fail(self, exc: BaseException | None) -> None:
        self._ok = False
        stream, self.stream = self.stream, None
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
        text = str(exc) if exc is not None else "unknown error"
        if self.failing != text:
            self.failing = text
            _stderr(
                f"rayserver: cannot write log file {self.baseFilename}: {text}; "
                "the server keeps running, log lines are lost until this is fixed"
            )

    def reopen(self) -> None:
        """Close and reopen the file (after rotation or SIGUSR1)."""
        self.acquire()
        try:
            if self.stream is not None:
                with contextlib.suppress(Exception):
                    self.stream.close()
            self.stream = None
            try:
                self.stream = self._open()
                self._statstream()
            except OSError as exc:
                self._fail(exc)
        finally:
            self.release()


def _stderr(text: str) -> None:
    with contextlib.suppress(Exception):
        print(text, file=sys.stderr, flush=True)


class TerminalHandler(logging.Handler):
    """Records to the terminal: INFO and below on stdout, warnings and errors on stderr."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        super().__init__()
        self.out = out
        self.err = err
        tty = _isatty(self._stream(logging.INFO))
        self.plain = _formatter("%(message)s", tty)
        self.prefixed = _formatter(TERM_FORMAT, tty, datefmt="%H:%M:%S")

    def _stream(self, level: int) -> TextIO:
        if level >= logging.WARNING:
            return self.err or sys.stderr
        return self.out or sys.stdout

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fmt = self.plain if getattr(record, ANNOUNCE, False) else self.prefixed
            stream = self._stream(record.levelno)
            stream.write(fmt.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed terminal must not stop the server
            pass


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _formatter(fmt: str, colour: bool, datefmt: str | None = None) -> logging.Formatter:
    if colour:
        import colorlog

        return colorlog.ColoredFormatter(
            "%(log_color)s" + fmt + "%(reset)s", datefmt=datefmt, log_colors=COLORS
        )
    return logging.Formatter(fmt, datefmt=datefmt)


class LogSetup:
    """The handlers installed on the root logger for the server process."""

    def __init__(self, path: Path, level: str = "INFO") -> None:
        self.path = path
        self.file: ResilientFileHandler | None = None
        self.terminal: TerminalHandler | None = None
        self.root = logging.getLogger()
        self.set_level(level)

    def open_file(self) -> None:
        """Open the log file (creating srvlogs); raises LogFileError naming path and OS error."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handler = ResilientFileHandler(self.path)
        except OSError as exc:
            raise LogFileError(
                f"rayserver: cannot open log file {self.path}: {exc.strerror or exc} "
                f"[errno {exc.errno}]"
            ) from exc
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
        self.root.addHandler(handler)
        self.file = handler

    def add_terminal(self) -> None:
        self.terminal = TerminalHandler()
        self.root.addHandler(self.terminal)

    def remove_terminal(self) -> None:
        if self.terminal is not None:
            self.root.removeHandler(self.terminal)
            self.terminal = None

    def set_level(self, level: str) -> None:
        self.root.setLevel(getattr(logging, level.upper(), logging.INFO))

    def reopen(self) -> None:
        if self.file is not None:
            self.file.reopen()

    def chown(self, uid: int, gid: int) -> None:
        """Hand the log file to the identity the server switches to (when we may)."""
        if self.file is not None and os.geteuid() == 0:
            with contextlib.suppress(OSError):
                os.chown(self.path, uid, gid)
