"""A small, generic process supervisor: bind, detach, switch identity, respawn a worker.

It knows nothing of Radiance or HTTP; rayserver plugs its worker in.

- :mod:`supervisor.sockets`: ``bind_with_retries``
- :mod:`supervisor.daemon`: ``detach`` (readiness pipe), ``PidFile`` (flock)
- :mod:`supervisor.identity`: ``resolve_user``, ``resolve_group``, ``switch_identity``
- :mod:`supervisor.core`: ``Supervisor`` (spawn, reap, respawn with backoff, kill a hung
  worker, shutdown)
- :mod:`supervisor.heartbeat`: ``Heartbeat`` (shared-memory beat counter), ``WorkerLink``
- :mod:`supervisor.sdnotify`: ``sd_notify``, ``SystemdWatchdog`` (``WATCHDOG=1`` pings)
- :mod:`supervisor.signals`: ``SignalQueue`` (handlers only record)
- :mod:`supervisor.util`: announcements, exit statuses, subreaper, children, titles
"""
