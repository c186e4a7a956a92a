"""The worker process: serves the HTTP API on the socket the supervisor bound.

Entry point :func:`run_worker` is called in the forked worker child with the
inherited listening socket. The worker is disposable: everything it knows is
on disk (hosts file, settings, job database), so a crash loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

from aiohttp import web

from rayserver import __version__
from rayserver.hosts import parse_hosts
from rayserver.paths import Layout
from rayserver.settings import load_settings

log = logging.getLogger("rayserver.worker")


def build_app(layout: Layout) -> web.Application:
    settings = load_settings(layout.settings_file)
    hosts = parse_hosts(layout.hosts_file)
    record = hosts.record_for(layout.host)
    app = web.Application()

    async def info(_request: web.Request) -> web.Response:
        return web.json_response({
            "hostname": layout.host,
            "pid": os.getpid(),
            "version": __version__,
            "cpus": record.cpus if record else 0,
            "port": settings.port,
        })

    app.router.add_get("/v1/info", info)
    return app


def run_worker(sock: socket.socket, layout: Layout,
               notify_ready: Callable[[], None] = lambda: None) -> int:
    """Serve on ``sock`` until SIGTERM/SIGINT; returns the exit code.

    ``notify_ready`` is called once the app is serving, so the supervisor can
    tell a worker that fails while booting from one that crashes later.
    """
    app = build_app(layout)

    async def ready(_app: web.Application) -> None:
        notify_ready()

    app.on_startup.append(ready)
    web.run_app(app, sock=sock, print=None, handle_signals=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - manual debugging aid
    asyncio.run(asyncio.sleep(0))
