"""Binding the listening socket, with the retries the manual describes.

"Address already in use" is retried (three attempts in all, a pause between
them); any other bind error fails at once, since waiting cannot fix it. The
socket has SO_REUSEADDR (a restarted server can bind while old connections
linger in TIME_WAIT) and never SO_REUSEPORT (two servers must not share the
port silently). It is close-on-exec: processes exec'd later never inherit it,
while a forked worker uses it directly.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Callable

from supervisor.util import announce

log = logging.getLogger("supervisor.sockets")


class BindError(Exception):
    """The socket could not be bound; the message says why and what was tried."""


def _secs(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def bind_with_retries(
    address: str,
    port: int,
    *,
    attempts: int = 3,
    delay: float = 30.0,
    backlog: int = 128,
    sleep: Callable[[float], None] = time.sleep,
) -> socket.socket:
    """A listening TCP socket on ``address``:``port`` (port 0: an ephemeral port).

    IPv6 addresses bind AF_INET6. Prints ``Socket Error: (98, 'Address already
    in use')`` and ``retrying in N secs...`` between attempts.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    host = address or "0.0.0.0"
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError as exc:
        raise BindError(f"bind address {host!r} is not an IP address") from exc
    for attempt in range(1, attempts + 1):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            announce(log, f"Socket Error: ({exc.errno}, {exc.strerror!r})", logging.ERROR)
            if exc.errno != errno.EADDRINUSE:
                raise BindError(
                    f"cannot bind {host} port {port}: {exc.strerror} "
                    "(check the bind address and port in rayserver.toml)"
                ) from exc
            if attempt < attempts:
                announce(log, f"retrying in {_secs(delay)} secs...", logging.WARNING)
                sleep(delay)
            continue
        sock.set_inheritable(False)
        return sock
    raise BindError(
        f"Unable to bind {host} port {port} after {attempts} attempts: the address is in use "
        "(most likely another server is running). Giving up."
    )
