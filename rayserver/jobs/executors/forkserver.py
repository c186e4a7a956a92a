"""The fork server: a small single-threaded process that forks the procwraps and keeps them warm.

The worker starts it first thing, as a fresh interpreter (``posix_spawn`` of
``sys.executable``) that imports only the procwrap code, so every procwrap
is forked from a clean, small, single-threaded process: a job starts within
milliseconds and never inherits the worker's threads, locks, sockets or
its ~45 MB of aiohttp and friends. The size matters on a busy machine: each
fork copies the page tables, each page a procwrap writes is copied, and its
exit unmaps them all; forked from the worker that cost ~1 ms of CPU per job
more than from this lean process.

Each procwrap runs jobs one after another while they leave nothing in it
(:mod:`rayserver.jobs.procwrap.warm`): it reports ``done <job> <exit code>``
on its own channel to this server (a ``SOCK_SEQPACKET`` socketpair that also
brings it its job ids) and waits for the next job; the worker is told of
that job's end as if the procwrap had exited with that code.

Protocol with the worker over a ``SOCK_SEQPACKET`` socketpair, one JSON object per packet:

    worker -> server  {"op": "launch", "job": <id>}
    server -> worker  {"op": "started", "job": <id>, "pid": <pid>}
                      {"op": "error", "job": <id>, "message": "..."}
                      {"op": "exited", "job": <id>, "pid": <pid>, "status": <raw wait status>}
                      (after a procwrap's ``done``: the raw status of its exit code)

A second socketpair (``SOCK_DGRAM``) goes straight from every procwrap to
the worker: right after a procwrap has committed its job's final state it
sends the job id there, so a waiting client is answered and the cpu slot
reused without waiting for the procwrap's exit, the fork server's reaping
and its ``exited`` message (which still follows, and still decides for a
procwrap that died without recording a result). After its claim and each
progress write it sends ``c<job id>``: the worker's memory of the job
(rayserver.jobs.jobview) reads the row again, so status answers need no
query of their own.

On EOF from the worker the fork server exits at once; its procwraps live on
(they run in sessions of their own; the supervisor, a subreaper, reaps them):
an idle one exits on the EOF of its channel, a busy one after its job.
The worker's side of the protocol is :mod:`rayserver.jobs.executors.forkclient`.
"""

from __future__ import annotations

import contextlib
import gc
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
from typing import TYPE_CHECKING, Any

from rayserver.common.paths import Layout
from rayserver.jobs import procwrap  # preimported: forked children start with it loaded
from rayserver.jobs.executors.base import ExecutorError
from supervisor.util import reap_exited

if TYPE_CHECKING:
    from rayserver.common.settings import Settings

MAX_PACKET = 65536
IDLE_RETIRE = 5.0  # s without a launch or a job's end, then warm idle procwraps are let go


class ForkServerError(ExecutorError):
    """The fork server is gone or refused a launch."""


@dataclass
class ForkServer:
    """Handle of a running fork server: its pid and the worker's ends of the socketpairs."""

    pid: int
    sock: socket.socket
    final_sock: socket.socket | None = None  # procwraps' "final state recorded" datagrams

    @classmethod
    def start(cls, layout: Layout, db_path: Path, settings: Settings) -> ForkServer:
        """Start the fork server. Call before any thread exists (its sockets are
        inheritable for a moment)."""
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        final_r, final_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        config = json.dumps(
            {
                "home": str(layout.home),
                "host": layout.host,
                "db": str(db_path),
                "grace": settings.cancel_grace,
                "sock": child_sock.fileno(),
                "final": final_w.fileno(),
            }
        )
        # The package this worker runs, first on the path: the same code, whatever
        # the current directory holds.
        package_root = str(Path(__file__).resolve().parents[3])
        try:
            child_sock.set_inheritable(True)
            final_w.set_inheritable(True)
            pid = os.posix_spawn(
                sys.executable, [sys.executable, "-c", _BOOT, package_root, config], os.environ
            )
        except BaseException:
            for s in (parent_sock, child_sock, final_r, final_w):
                s.close()
            raise
        finally:
            child_sock.close()
            final_w.close()
        return cls(pid, parent_sock, final_r)

    def stop(self, timeout: float = 2.0) -> int | None:
        """Close our end (the server exits on EOF) and reap it; returns its wait status."""
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.final_sock is not None:
            with contextlib.suppress(OSError):
                self.final_sock.close()
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


def _final_reporter(
    final_sock: socket.socket | None, prefix: bytes = b""
) -> Callable[[int], None] | None:
    """The procwrap's ``on_final`` (``on_change`` with prefix b"c"): one datagram to the
    worker, never blocking, never raising."""
    if final_sock is None:
        return None

    def report(job_id: int) -> None:
        # A worker that is gone (or too busy to read) still learns it from our exit
        # (a change: from re-reading the row a little later).
        with contextlib.suppress(OSError):
            final_sock.send(b"%s%d" % (prefix, job_id), socket.MSG_DONTWAIT)

    return report


_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from rayserver.jobs.executors.forkserver import boot; sys.exit(boot(sys.argv[2]))"
)


def boot(config: str) -> int:
    """Entry point of the spawned fork server (``config``: JSON from :meth:`ForkServer.start`)."""
    code = 1
    try:
        conf = json.loads(config)
        sock = socket.socket(fileno=conf["sock"])
        final = socket.socket(fileno=conf["final"])
        for s in (sock, final):
            s.set_inheritable(False)
        code = Arbiter(
            sock,
            Layout(Path(conf["home"]), conf["host"]),
            Path(conf["db"]),
            float(conf["grace"]),
            final,
        ).run()
    except BaseException:  # noqa: BLE001 - report, then exit (the worker sees EOF)
        with contextlib.suppress(Exception):
            import traceback

            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)  # no interpreter teardown: nothing of ours needs it
    return code  # pragma: no cover


class Arbiter:
    """The fork server's state and loop: reap children, hand jobs to idle procwraps, fork spares.

    Every procwrap it forked keeps a channel to it (a ``SOCK_SEQPACKET``
    socketpair): a job id goes down it, and ``done <job> <exit code>`` comes
    back when the procwrap ran its job to the end and may take another (see
    :mod:`rayserver.jobs.procwrap.warm`). Such a report is passed on to the
    worker as an ``exited`` one (the raw status of that exit code); a
    procwrap that exits instead is reaped and reported as before. After
    :data:`IDLE_RETIRE` seconds without a launch or a job's end, the idle
    procwraps that ran jobs are let go (EOF on their channel) and one fresh
    spare waits, as after the start: a warm one is ~5 MB larger.
    Single-threaded; a SIGCHLD only writes to the wakeup pipe, the loop acts.
    """

    def __init__(
        self,
        sock: socket.socket,
        layout: Layout,
        db_path: Path,
        grace: float,
        final_sock: socket.socket | None = None,
    ) -> None:
        self.sock = sock
        self.layout = layout
        self.db_path = db_path
        self.grace = grace
        self.on_final = _final_reporter(final_sock)
        self.on_change = _final_reporter(final_sock, b"c")
        self.children: dict[int, int] = {}  # pid -> job id, while it runs that job
        self.chans: dict[int, socket.socket] = {}  # pid -> our end of its channel
        self.idle: list[tuple[int, bool]] = []  # (pid, fresh: ran no job), the last warmest
        self.last_busy = time.monotonic()  # the last launch or job's end
        self.wake_r = self.wake_w = -1

    def run(self) -> int:
        """Serve launches until the worker closes its end; the exit code."""
        self.setup()
        with contextlib.suppress(OSError):
            self.fork_spare()
        while True:
            by_fd = {chan.fileno(): pid for pid, chan in self.chans.items()}
            try:
                ready, _, _ = select.select(
                    [self.sock, self.wake_r, *by_fd], [], [], self.retire_in()
                )
            except InterruptedError:
                ready = []
            if self.wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self.wake_r, 512):
                        pass
            for fd in ready:
                if fd in by_fd and not self.read_channel(by_fd[fd]):
                    return 0
            # Reap on every turn: a SIGCHLD may have been merged with another.
            if not self.reap():
                return 0
            if self.sock in ready and not self.serve_request():
                return 0
            self.retire()

    def setup(self) -> None:
        """Title, signals, wakeup pipe, preloaded procwrap code and a frozen heap."""
        with contextlib.suppress(ImportError):
            import setproctitle

            setproctitle.setproctitle(f"{self.layout.server_title} forkserver")
        # Ctrl-C on a foreground server reaches the whole group: the worker decides,
        # then closes the socket, and we follow on EOF.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the worker's inherited handler
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the loop
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        procwrap.preload(self.db_path)
        # Everything alive now is shared with every procwrap: keep the garbage
        # collector of a child away from it, or its first collection touches
        # (and copies) every page of the inherited heap.
        gc.collect()
        gc.freeze()

    def reap(self) -> bool:
        """Reap every exited child and tell the worker of procwraps; False if it is gone."""
        for pid, status in reap_exited():
            self.drop(pid)
            job = self.children.pop(pid, None)
            if job is not None and not self.report_exit(job, pid, status):
                return False
        return True

    def report_exit(self, job: int, pid: int, status: int) -> bool:
        try:
            _send(self.sock, {"op": "exited", "job": job, "pid": pid, "status": status})
        except OSError:
            return False
        return True

    def read_channel(self, pid: int) -> bool:
        """A procwrap's ``done <job> <code>``: its job's exit, and it is idle; False: worker gone."""
        chan = self.chans[pid]
        try:
            raw = chan.recv(64)
        except OSError:
            raw = b""
        if not raw:
            self.drop(pid)  # it is exiting (its reaping reports the job)
            return True
        words = raw.split()
        if len(words) != 3 or words[0] != b"done" or not all(w.isdigit() for w in words[1:]):
            return True
        job, code = int(words[1]), int(words[2])
        if self.children.get(pid) != job:
            return True
        del self.children[pid]
        self.idle.append((pid, False))
        self.last_busy = time.monotonic()
        return self.report_exit(job, pid, (code & 0xFF) << 8)  # the raw status of that exit

    def drop(self, pid: int) -> None:
        """Forget a procwrap's channel (it exited, or is let go: EOF tells it to exit)."""
        chan = self.chans.pop(pid, None)
        if chan is not None:
            chan.close()
        self.idle = [entry for entry in self.idle if entry[0] != pid]

    def retire_in(self) -> float | None:
        """Seconds until the warm idle procwraps are let go (None: there is none)."""
        if all(fresh for _, fresh in self.idle):
            return None
        return max(0.0, self.last_busy + IDLE_RETIRE - time.monotonic())

    def retire(self) -> None:
        """Quiet for IDLE_RETIRE s: back to one fresh spare."""
        if self.retire_in() != 0.0:
            return
        for pid, fresh in list(self.idle):
            if not fresh:
                self.drop(pid)
        if not self.idle:
            with contextlib.suppress(OSError):
                self.fork_spare()

    def serve_request(self) -> bool:
        """Read one packet from the worker and answer it; False once the worker is gone."""
        try:
            raw = self.sock.recv(MAX_PACKET)
        except ConnectionResetError:
            return False
        if not raw:
            return False  # the worker is gone: so are we (the spares follow on EOF)
        try:
            job_id = _parse_launch(raw)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            _send(self.sock, {"op": "error", "job": None, "message": f"bad request: {exc}"})
            return True
        self.last_busy = time.monotonic()
        try:
            pid = self.hand_over(job_id)
        except OSError as exc:
            _send(self.sock, {"op": "error", "job": job_id, "message": f"fork failed: {exc}"})
            return True
        self.children[pid] = job_id
        try:
            _send(self.sock, {"op": "started", "job": job_id, "pid": pid})
        except OSError:
            return False
        if not self.idle:  # the next job's procwrap, while this one runs
            with contextlib.suppress(OSError):
                self.fork_spare()
        return True

    def hand_over(self, job_id: int) -> int:
        """Give ``job_id`` to the warmest idle procwrap (forking one if none is); its pid."""
        forked = 0
        while True:
            if not self.idle:
                if forked == 2:
                    raise OSError("two procwraps in a row died before they got their job")
                self.fork_spare()
                forked += 1
            pid, _fresh = self.idle.pop()
            try:
                self.chans[pid].send(b"%d" % job_id, socket.MSG_NOSIGNAL)
            except OSError:
                self.drop(pid)  # it died meanwhile (it is reaped as any child)
                continue
            return pid

    def fork_spare(self) -> int:
        """A procwrap forked ahead of its job: set up, connected, waiting for a job id.

        A launch then costs one packet instead of a fork, the child's
        start and its database connection (~2-3 ms on a busy machine).
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            raise
        if pid == 0:  # pragma: no cover - child
            ours.close()
            self._spare_main(theirs)
        theirs.close()
        self.chans[pid] = ours
        self.idle.insert(0, (pid, True))  # coldest: warm ones go first
        return pid

    def _spare_main(self, chan: socket.socket) -> None:  # pragma: no cover - child
        """The forked spare: drop the server's fds and handlers, run jobs, exit."""
        code = procwrap.EXIT_INTERNAL
        try:
            self.sock.close()
            # The other procwraps' channels: held here, their EOF would never come.
            for other in self.chans.values():
                other.close()
            signal.set_wakeup_fd(-1)
            os.close(self.wake_r)
            os.close(self.wake_w)
            for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
            code = procwrap.run_spare(
                chan,
                self.db_path,
                self.layout.procwrap_title,
                grace=self.grace,
                on_final=self.on_final,
                on_change=self.on_change,
            )
        except BaseException:  # noqa: BLE001
            with contextlib.suppress(Exception):
                import traceback

                traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os._exit(code)


def _parse_launch(raw: bytes) -> int:
    """The job id of a launch request; raises ValueError (etc.) naming what is wrong."""
    msg = json.loads(raw)
    if msg.get("op") != "launch":
        raise ValueError(f"unknown op {msg.get('op')!r}; expected 'launch'")
    job_id = msg["job"]
    if not isinstance(job_id, int) or isinstance(job_id, bool) or job_id < 1:
        raise ValueError(f"job must be a positive integer, got {job_id!r}")
    return job_id
