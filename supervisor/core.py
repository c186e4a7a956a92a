"""The supervisor loop: spawn the worker, reap, respawn with backoff, stop everything.

The supervisor holds the listening socket and never serves; the worker is
forked (not exec'd) and serves on the inherited socket, so the socket stays
bound while a crashed worker is replaced and clients queue in the backlog
instead of being refused.

Rules kept here (learned from gunicorn and supervisord):

- signal handlers only record (:class:`~supervisor.signals.SignalQueue`);
  this loop reaps, logs and prints;
- children are reaped with a ``waitpid(-1, WNOHANG)`` loop; unknown children
  (orphans reparented to us as subreaper) are reaped quietly;
- a worker that exits on its own before calling ``ready`` with a start-up
  error code (:data:`BOOT_ERRORS`: its own configuration check failed, or
  an exception escaped its start-up) cannot be helped by a restart: the
  supervisor stops with that code rather than looping (gunicorn's boot-error
  exit codes);
- any other death is a crash, whenever it happens: killed by a signal (the
  OOM killer's SIGKILL while a busy machine is still starting it, say) or an
  other exit code, before or after ready. The worker is replaced after a
  delay that doubles with each consecutive crash, up to a cap; the first
  restart is quick;
- with ``worker_timeout`` set, the worker's event loop beats a heartbeat
  (:mod:`supervisor.heartbeat`); a worker silent for longer (stopped, or
  stuck in its loop) is SIGKILLed and replaced like a crashed one;
- under systemd's watchdog (:mod:`supervisor.sdnotify`) the supervisor pings
  ``WATCHDOG=1`` only while a worker is ready and beating.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Collection

from supervisor.heartbeat import Heartbeat, WorkerLink
from supervisor.sdnotify import SystemdWatchdog
from supervisor.signals import SignalQueue
from supervisor.util import (
    announce,
    describe_status,
    exit_code,
    list_children,
    reap_exited,
    set_child_subreaper,
    set_title,
)

log = logging.getLogger("supervisor")

# The second argument is a WorkerLink; calling it is ``ready()``.
WorkerTarget = Callable[[socket.socket, WorkerLink], int]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
# sysexits. EX_SOFTWARE: an exception escaped the worker's target (before it
# was ready: a start-up error). EX_CONFIG: the worker found its configuration
# unusable. Either, before ready, stops the supervisor.
EX_SOFTWARE = 70
EX_CONFIG = 78
BOOT_ERRORS = frozenset({EX_SOFTWARE, EX_CONFIG})


class Supervisor:
    """Run ``target(sock, link)`` in a forked worker and keep it running.

    ``link`` is a :class:`~supervisor.heartbeat.WorkerLink`: the worker calls
    ``link.ready()`` (or ``link()``) once it serves, and ``link.beat()`` every
    ``link.beat_interval`` seconds from its event loop. ``worker_timeout``
    (seconds, None: not watched) is the longest silence allowed after the
    first beat, ``max(worker_timeout, boot_timeout)`` before it.
    ``boot_errors``: the exit codes that, before ready, stop the supervisor.
    ``watchdog``: systemd's, pinged while the worker is healthy.

    Hooks (all optional, all called from the main loop, never from a signal
    handler): ``on_ready(worker_pid, first)`` when a worker reports ready,
    ``on_reload()`` on SIGHUP (the HUP is also forwarded to the worker),
    ``on_reopen()`` on SIGUSR1 (reopen log files), ``child_setup()`` in the
    worker child before ``target`` runs.
    """

    def __init__(
        self,
        sock: socket.socket,
        target: WorkerTarget,
        *,
        name: str = "Server",
        title: str | None = None,
        worker_title: str | None = None,
        on_ready: Callable[[int, bool], None] | None = None,
        on_reload: Callable[[], None] | None = None,
        on_reopen: Callable[[], None] | None = None,
        child_setup: Callable[[], None] | None = None,
        backoff_first: float = 0.25,
        backoff_cap: float = 30.0,
        stable_after: float = 60.0,
        shutdown_grace: float = 8.0,
        kill_grace: float = 3.0,
        worker_timeout: float | None = None,
        boot_timeout: float = 60.0,
        boot_errors: Collection[int] = BOOT_ERRORS,
        watchdog: SystemdWatchdog | None = None,
    ) -> None:
        self.sock, self.target, self.name = sock, target, name
        self.title, self.worker_title = title, worker_title
        self.on_ready, self.on_reload, self.on_reopen = on_ready, on_reload, on_reopen
        self.child_setup = child_setup
        self.backoff_first, self.backoff_cap = backoff_first, backoff_cap
        self.stable_after = stable_after
        self.shutdown_grace, self.kill_grace = shutdown_grace, kill_grace
        self.worker_timeout, self.boot_timeout = worker_timeout, boot_timeout
        self.boot_errors = frozenset(boot_errors)
        self.watchdog = watchdog

        self.worker_pid: int | None = None
        self.restarts = 0
        self.hung_kills = 0
        self._sigq: SignalQueue | None = None
        self._ready_fd: int | None = None
        self._heartbeat: Heartbeat | None = None
        self._hung_pid: int | None = None
        self._booted = False
        self._ever_ready = False
        self._started_at = 0.0
        self._crashes = 0
        self._restart_at: float | None = None
        self._ping_at: float | None = None
        self._stop_signal: int | None = None
        self._exit: int | None = None

    # ----------------------------------------------------------------- main loop

    def run(self) -> int:
        """Supervise until a stop signal or a boot failure; returns the exit code."""
        set_title(self.title)
        if not set_child_subreaper():
            log.debug("PR_SET_CHILD_SUBREAPER not available; orphans go to init")
        self._sigq = SignalQueue([*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD])
        try:
            try:
                return self._loop()
            except Exception:
                log.exception("unexpected error in the supervisor")
                announce(log, "*System Exit*", logging.CRITICAL)
                self._stop_children()
                return EX_SOFTWARE
        finally:
            self._close_ready_pipe()
            self._close_heartbeat()
            self._sigq.close()
            self._sigq = None

    def _loop(self) -> int:
        assert self._sigq is not None
        self._spawn()
        while True:
            fds: list[int] = [self._sigq.fileno()]
            if self._ready_fd is not None:
                fds.append(self._ready_fd)
            readable, _, _ = select.select(fds, [], [], self._timeout())
            self._drain_signals()
            if self._ready_fd is not None and self._ready_fd in readable:
                self._read_ready_pipe()
            self._reap()
            if self._stop_signal is not None:
                return self._shutdown(self._stop_signal)
            if self._exit is not None:
                self._stop_children()
                return self._exit
            if self._restart_at is not None and time.monotonic() >= self._restart_at:
                self._restart_at = None
                self._spawn()
            self._watch(time.monotonic())

    def _timeout(self) -> float | None:
        """How long the loop may sleep: until the restart, the next sample or ping."""
        due = [t for t in (self._restart_at, self._ping_at) if t is not None]
        if self._heartbeat is not None and self._heartbeat.timeout is not None:
            due.append(time.monotonic() + self._heartbeat.interval)
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _drain_signals(self) -> None:
        assert self._sigq is not None
        for signum in self._sigq.drain():
            self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        if signum in STOP_SIGNALS:
            if self._stop_signal is None:
                self._stop_signal = signum
        elif signum == signal.SIGHUP:
            log.info("SIGHUP: reloading configuration")
            if self.on_reload is not None:
                self.on_reload()
            if self.worker_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.worker_pid, signal.SIGHUP)
        elif signum == signal.SIGUSR1:
            if self.on_reopen is not None:
                self.on_reopen()
            log.info("SIGUSR1: log files reopened")
        # SIGCHLD only wakes us; _reap() runs on every pass.

    # --------------------------------------------------- heartbeat and watchdog

    def _watch(self, now: float) -> None:
        """Kill a worker that stopped beating; ping systemd while the worker is healthy."""
        hb = self._heartbeat
        if hb is not None and self.worker_pid is not None and self._hung_pid is None:
            hb.observe(now)
            if hb.overdue(now):
                self._kill_hung(self.worker_pid, hb, now)
        if self.watchdog is not None and self._ping_at is not None and now >= self._ping_at:
            if self._healthy(now):
                self.watchdog.ping()
            self._ping_at = now + self.watchdog.interval

    def _healthy(self, now: float) -> bool:
        """A worker is ready, not being killed, and has beaten within its timeout."""
        if self.worker_pid is None or not self._booted or self._hung_pid is not None:
            return False
        hb = self._heartbeat
        return hb is None or hb.timeout is None or hb.silent_for(now) < hb.timeout

    def _kill_hung(self, pid: int, hb: Heartbeat, now: float) -> None:
        phase = "since it started" if not hb.started else "since its last beat"
        log.error(
            "worker %d sent no heartbeat for %.1f s %s (limit %g s, worker_timeout); "
            "killing it (SIGKILL)",
            pid,
            hb.silent_for(now),
            phase,
            hb.limit(),
        )
        self._hung_pid = pid
        self.hung_kills += 1
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def _close_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.close()
            self._heartbeat = None

    # -------------------------------------------------------------- the worker

    def _spawn(self) -> None:
        assert self._sigq is not None
        rfd, wfd = os.pipe()
        self._close_heartbeat()
        now = time.monotonic()
        heartbeat = Heartbeat(self.worker_timeout, self.boot_timeout, now)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            self._run_child(WorkerLink(wfd, heartbeat))
        os.close(wfd)
        self._close_ready_pipe()
        self._ready_fd = rfd
        self._heartbeat = heartbeat
        self._hung_pid = None
        self.worker_pid = pid
        self._booted = False
        self._started_at = now
        log.info("worker %d started", pid)

    def _run_child(self, link: WorkerLink) -> None:
        """In the forked worker: never returns."""
        code = EX_SOFTWARE
        try:
            assert self._sigq is not None
            self._sigq.close(defaults=True)
            # A worker that does not handle HUP/USR1 itself must not die of them;
            # the worker installs its own handlers when it wants them.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            set_title(self.worker_title)
            if self.child_setup is not None:
                self.child_setup()
            result = self.target(self.sock, link)
            code = result if isinstance(result, int) else 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            log.exception("worker %d failed", os.getpid())
            code = EX_SOFTWARE
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
                logging.shutdown()
            os._exit(code)

    def _read_ready_pipe(self) -> None:
        assert self._ready_fd is not None
        try:
            data = os.read(self._ready_fd, 16)
        except OSError:
            data = b""
        if data.startswith(b"R") and not self._booted and self.worker_pid is not None:
            self._booted = True
            first = not self._ever_ready
            self._ever_ready = True
            log.info("worker %d ready", self.worker_pid)
            if self.watchdog is not None:
                self._ping_at = time.monotonic()  # at once: the gap may have been long
            if self.on_ready is not None:
                self.on_ready(self.worker_pid, first)
        self._close_ready_pipe()

    def _close_ready_pipe(self) -> None:
        if self._ready_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._ready_fd)
            self._ready_fd = None

    def _reap(self) -> None:
        for pid, status in reap_exited():
            if pid == self.worker_pid:
                self._worker_exited(pid, status)
            else:
                log.debug("reaped child %d (%s)", pid, describe_status(status))

    def _worker_exited(self, pid: int, status: int) -> None:
        # A ready byte may still sit in the pipe if the worker died right after notifying.
        if self._ready_fd is not None and not self._booted:
            readable, _, _ = select.select([self._ready_fd], [], [], 0)
            if readable:
                self._read_ready_pipe()
        hung = self._hung_pid == pid
        self.worker_pid = None
        self._hung_pid = None
        self._close_ready_pipe()
        self._close_heartbeat()
        how = describe_status(status)
        # A stop sent to the whole process group (Ctrl-C in a terminal, systemd's
        # control-group kill) reaches the worker too, which may be reaped before the
        # loop drained the supervisor's own signal: it was a stop, not a crash.
        self._drain_signals()
        if self._stop_signal is not None:
            log.info("worker %d stopped (%s)", pid, how)
            return
        if self._is_boot_error(status):
            log.error("worker %d failed while starting (%s); not restarting", pid, how)
            self._exit = exit_code(status) or 1
            return
        self._schedule_restart(pid, how, hung)

    def _is_boot_error(self, status: int) -> bool:
        """The worker exited on its own, before ready, with a start-up error code.

        A signal is never one: the OOM killer, an operator's kill or our own
        SIGKILL of a hung worker say nothing about whether the next one can start.
        """
        return (
            not self._booted and os.WIFEXITED(status) and os.WEXITSTATUS(status) in self.boot_errors
        )

    def _schedule_restart(self, pid: int, how: str, hung: bool) -> None:
        lived = time.monotonic() - self._started_at
        if lived >= self.stable_after:
            self._crashes = 0
        self._crashes += 1
        delay = min(self.backoff_cap, self.backoff_first * 2 ** (self._crashes - 1))
        if hung:
            what = "was killed for missing its heartbeat"
        elif self._booted:
            what = "died unexpectedly"
        else:
            what = "died while starting"
        log.error(
            "worker %d %s (%s) after %.1f s; restart %d in %.2f s",
            pid,
            what,
            how,
            lived,
            self._crashes,
            delay,
        )
        announce(log, f"{self.name} {os.getpid()} internal error. Restarting.", logging.ERROR)
        self.restarts += 1
        self._restart_at = time.monotonic() + delay

    # ----------------------------------------------------------------- stopping

    def _shutdown(self, signum: int) -> int:
        if signum == signal.SIGINT:
            announce(log, "*User Interrupt*", logging.WARNING)
        else:
            announce(log, f"*System Exit* (caught signal {signum})", logging.WARNING)
        self._stop_children()
        return 0

    def _wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking on signals; True if a stop signal came meanwhile."""
        assert self._sigq is not None
        select.select([self._sigq.fileno()], [], [], max(0.0, seconds))
        urgent = False
        for signum in self._sigq.drain():
            if signum in STOP_SIGNALS:
                urgent = True
        return urgent

    def _stop_children(self) -> None:
        """SIGTERM the worker and wait for it, then TERM/KILL every other child until none is left."""
        if self._stop_signal is None:
            self._stop_signal = signal.SIGTERM
        hurry = False
        if self.worker_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.worker_pid, signal.SIGTERM)
            deadline = time.monotonic() + self.shutdown_grace
            while self.worker_pid is not None and time.monotonic() < deadline and not hurry:
                hurry = self._wait(0.05)
                self._reap()
        termed: dict[int, float] = {}
        while True:
            self._reap()
            children = list_children()
            if not children:
                return
            now = time.monotonic()
            for pid in children:
                if pid not in termed:
                    termed[pid] = now
                    sig = signal.SIGKILL if hurry else signal.SIGTERM
                    log.info("stopping child %d (%s)", pid, signal.Signals(sig).name)
                elif now - termed[pid] >= self.kill_grace or hurry:
                    sig = signal.SIGKILL
                    log.warning("child %d still alive; SIGKILL", pid)
                else:
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            hurry = self._wait(0.05) or hurry
