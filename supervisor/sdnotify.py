"""systemd's watchdog, spoken directly: ``sd_notify`` is one AF_UNIX datagram.

Under a unit with ``WatchdogSec=``, systemd puts ``WATCHDOG_USEC`` (the
timeout), ``WATCHDOG_PID`` (the process it expects the pings from) and
``NOTIFY_SOCKET`` (where to send them; a leading ``@`` names an abstract
socket) in the environment, and restarts the service when no ``WATCHDOG=1``
arrives in time. The recommended rhythm is a ping every half timeout.

``WATCHDOG_PID`` is the pid systemd started. In daemon mode that process
detaches and the server goes on in a grandchild, so :meth:`from_env` is
called before detaching: it checks the pid there and hands the watchdog to
the background process. It also removes the variables from the environment,
so the worker and the simulations never talk to systemd in the server's name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

log = logging.getLogger("supervisor.sdnotify")

ENV_NAMES = ("WATCHDOG_USEC", "WATCHDOG_PID", "NOTIFY_SOCKET")


def sd_notify(address: str, message: str) -> bool:
    """Send ``message`` (e.g. ``WATCHDOG=1``) to the notify socket; False if it failed."""
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode("utf-8"), target)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc.strerror or exc)
        return False
    return True


@dataclass(frozen=True)
class SystemdWatchdog:
    """The watchdog systemd expects pings from: where to send them and how often."""

    address: str
    timeout: float  # WATCHDOG_USEC, in seconds

    @property
    def interval(self) -> float:
        """Seconds between pings: half the timeout, as systemd recommends."""
        return self.timeout / 2

    def ping(self) -> bool:
        return sd_notify(self.address, "WATCHDOG=1")

    @classmethod
    def from_env(
        cls, environ: MutableMapping[str, str] | None = None, pid: int | None = None
    ) -> SystemdWatchdog | None:
        """The watchdog meant for this process (``pid``, default ours), or None.

        The variables are removed from ``environ`` (default ``os.environ``) either way.
        """
        env = os.environ if environ is None else environ
        usec, for_pid, address = (env.pop(name, "") for name in ENV_NAMES)
        if not usec or not address:
            return None
        me = os.getpid() if pid is None else pid
        if for_pid and for_pid.strip() != str(me):
            log.debug("WATCHDOG_PID=%s is not this process (%d): no watchdog", for_pid, me)
            return None
        timeout = 0
        with contextlib.suppress(ValueError):
            timeout = int(usec)
        if timeout <= 0:
            log.warning(
                "WATCHDOG_USEC=%r is not a positive number of microseconds: no systemd watchdog",
                usec,
            )
            return None
        return cls(address, timeout / 1e6)
