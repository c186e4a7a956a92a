"""The worker process: serves the HTTP API on the socket the supervisor bound.

:func:`run_worker` is called in the forked worker child with the inherited
listening socket. Order matters:

1. read the configuration (hosts, settings) and the token;
2. start the fork server *before* any thread or event loop exists, so the
   process that forks every procwrap is a clean single-threaded copy;
3. run asyncio: open the job database, start the heartbeat (the event loop
   beats the supervisor's ``worker_timeout`` watch from now on), the app,
   the scheduler, the config watcher; then tell the supervisor we are ready;
4. on SIGTERM/SIGINT stop accepting, let the scheduler shut down (running
   jobs are interrupted by their procwraps, queued ones stay queued), exit 0.
   SIGHUP reloads the configuration and wakes the scheduler.

The worker is disposable: everything it knows is on disk (hosts file,
settings, job database), so a crash loses nothing; a new worker adopts the
procwraps still running.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from rayserver.common.hosts import HostsFileError
from rayserver.common.paths import Layout
from rayserver.common.settings import SettingsError
from rayserver.server import api, farm, security
from rayserver.server.api import AppContext
from rayserver.server.dashboard import routes as dashboard
from supervisor.core import EX_CONFIG
from supervisor.heartbeat import WorkerLink

log = logging.getLogger("rayserver.daemon.worker")


class MalformedRequestFilter(logging.Filter):
    """One line, not a traceback, for requests aiohttp could not even parse.

    aiohttp answers them with 400 itself but logs the parser's exception with
    its full traceback at ERROR: any client could fill the log that way.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            original = record.getMessage()
            record.msg = "%s: malformed HTTP request refused (%s)"
            record.args = (original, (str(exc).splitlines() or [""])[0][:200])
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


# A worker that finds its configuration (hosts, settings, token, job database)
# unusable exits with EX_CONFIG before it is ready: a start-up error, after
# which the supervisor stops instead of respawning it in a loop. An exception
# escaping start-up is one too (EX_SOFTWARE, set by the supervisor). Death
# by a signal is a crash, restarted, whenever it happens.
# Open requests (followed logs, GET ?wait) get this long at shutdown.
SHUTDOWN_GRACE = 2.0


def run_worker(sock: socket.socket, layout: Layout, link: WorkerLink | None = None) -> int:
    """Serve on ``sock`` until SIGTERM/SIGINT; returns the exit code.

    ``link.ready()`` is called once the app is serving, so the supervisor can
    tell a worker that fails while booting from one that crashes later;
    ``link.beat()`` from the event loop tells it the loop still runs.
    """
    from rayserver.jobs.executors.forkserver import ForkServer
    from rayserver.server.confwatch import LiveConfig

    try:
        # The port the socket really has: an edited port waits for a restart, and
        # a restarted worker must keep matching its record by the port in use.
        live = LiveConfig(layout, port=sock.getsockname()[1])
        token = security.ensure_token(layout, live.settings)
    except (HostsFileError, SettingsError, security.CredentialsError) as exc:
        log.critical("worker cannot start: %s", exc)
        return EX_CONFIG
    # The sandbox probe of the start (inherited from the supervisor), or one now:
    # it forks, so before any thread exists.
    from rayserver.jobs.procwrap import boxprobe

    boxprobe.current()
    # Before any thread or event loop: the fork server must be forked from a
    # single-threaded process (see docs/internals.md, "Process tree").
    fork_server = ForkServer.start(layout, layout.db_path, live.settings)
    logging.getLogger("aiohttp.server").addFilter(MalformedRequestFilter())
    # The simulations are what the render host is for: the worker (and every
    # thread it starts later, which inherit it) yields the cpu to them. The
    # fork server was started first, so procwraps and Radiance keep their nice.
    if live.settings.server_nice:
        os.nice(live.settings.server_nice)
    return asyncio.run(_serve(sock, layout, live, token, fork_server, link))


async def _serve(
    sock: socket.socket,
    layout: Layout,
    live: Any,
    token: str | None,
    fork_server: Any,
    link: WorkerLink | None,
) -> int:
    from rayserver.jobs.jobdb import JobDB, JobDBError
    from rayserver.jobs.scheduler import Scheduler

    loop = asyncio.get_running_loop()
    try:
        db = JobDB(layout.db_path)
    except JobDBError as exc:
        log.critical("worker cannot start: %s", exc)
        return EX_CONFIG
    # Not before: opening the database may wait out another process's lock
    # (the busy timeout), which the longer start-up limit covers.
    stop_beating = _start_heartbeat(loop, link)

    app, ctx = await _build_app(layout, live, db, token)

    # The scheduler's local executor starts procwraps through the fork server.
    scheduler = Scheduler(layout, db, live, fork_server)
    ctx.scheduler = scheduler
    await scheduler.start()

    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE
    )
    await runner.setup()
    assert runner.server is not None
    # No ssl= here: filtered_factory checks the address first, then does the
    # TLS handshake itself (see rayserver.server.security).
    server = await loop.create_server(security.filtered_factory(runner.server, ctx), sock=sock)

    stop = _handle_signals(loop, live, scheduler)
    live.start_watching()
    log.info("worker serving the job API (%s)", layout.host)
    if link is not None:
        link.ready()

    await stop.wait()
    log.info("worker stopping: no new connections, shutting the scheduler down")
    server.close()
    try:
        # (It also closes the fork server client, even when it fails.)
        await scheduler.shutdown()
    finally:
        live.stop_watching()
        await runner.cleanup()
        db.close()
        stop_beating()
    return 0


async def _build_app(
    layout: Layout, live: Any, db: Any, token: str | None
) -> tuple[web.Application, AppContext]:
    ctx = AppContext(
        layout=layout, live=live, db=db, scheduler=None, started_at=time.time(), token=token
    )
    # Parse openapi.yaml and build the job validator now, not in the first submit, while
    # `rpict -version` runs (both on every worker start).
    from rayserver.server import jobspec

    ctx.radiance_version, _ = await asyncio.gather(
        asyncio.to_thread(api.radiance_version, live.settings),
        asyncio.to_thread(jobspec.schema_validator, "JobRequest"),
    )
    app = api.build_app(ctx, security.middlewares(ctx))
    dashboard.setup_dashboard(app, ctx)
    farm.setup_farm(app, ctx)
    return app, ctx


def _handle_signals(loop: asyncio.AbstractEventLoop, live: Any, scheduler: Any) -> asyncio.Event:
    """SIGTERM/SIGINT set the returned event; SIGHUP reloads the configuration."""
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    reloads: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    def on_hup() -> None:
        async def reload() -> None:
            if await asyncio.to_thread(live.reload):
                log.info("configuration reloaded on SIGHUP")
            scheduler.notify()

        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    return stop


def _start_heartbeat(
    loop: asyncio.AbstractEventLoop, link: WorkerLink | None
) -> Callable[[], None]:
    """Beat ``link`` every ``link.beat_interval`` from the loop; returns what stops it.

    A callback of the loop itself, not a thread: a stopped process or a loop
    stuck in a callback stops beating, which is what the supervisor watches.
    """
    if link is None:
        return lambda: None
    handle: asyncio.TimerHandle | None = None

    def beat() -> None:
        nonlocal handle
        link.beat()
        handle = loop.call_later(link.beat_interval, beat)

    def stop() -> None:
        if handle is not None:
            handle.cancel()

    beat()
    return stop
