"""Server-side security: allow-list, bearer token, body limits, slow clients, TLS.

Two pieces are plugged into the worker's aiohttp server:

- :func:`filtered_factory` wraps the protocol factory of aiohttp's low-level
  ``web.Server``. Each connection is checked against the ``allow`` networks
  in ``connection_made``, before a single byte is read (with TLS: before the
  handshake), and is closed when the client is idle or slow beyond
  ``client_timeout``: a request's headers and body must arrive within that
  time of its first byte, an idle keep-alive connection lasts that long, and
  a client that stops reading its answer is dropped after that long.
- :func:`middlewares` counts requests for GET /metrics, checks the token
  (``Authorization: Bearer``: the shared token or a named one of
  ``<home>/config/tokens``, which decides the request's user and role), reads
  request bodies up to ``max_body_bytes`` (so the time spent receiving them
  counts against the client), and turns every error into the API's JSON
  shape ``{"error": ..., "status": ...}``; an unexpected exception becomes a
  500 whose traceback goes to the log only.

The context object ``ctx`` is the worker's: ``ctx.live.settings`` (current
settings, replaced on reload), ``ctx.layout`` and ``ctx.token`` (the token in
force, or None when tokens are off). Both pieces read them at every
connection or request, so a reload takes effect without restarting.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import os
import posixpath
import resource
import sqlite3
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from rayserver.common import tokens
from rayserver.common.credentials import (
    CredentialsError,
    ensure_token,
    read_server_token,
    server_ssl_context,
    tokens_equal,
)
from rayserver.server import counters

__all__ = [
    "CredentialsError",
    "ensure_token",
    "filtered_factory",
    "is_allowed",
    "middlewares",
    "read_server_token",
    "server_ssl_context",
]

log = logging.getLogger("rayserver.server.security")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Who sent a request, set by the token check: a named token's user and role,
# or the shared token's (tokens.SHARED_USER, "admin").
USER_KEY: web.RequestKey[str] = web.RequestKey("user", str)
ROLE_KEY: web.RequestKey[str] = web.RequestKey("role", str)

# Paths anyone allowed to connect may GET without a token: no job data in them.
_OPEN_PATHS = frozenset({"/", "/v1/info", "/v1/openapi.yaml"})
_OPEN_PREFIX = "/static/"

# One warning per refused address per interval, so a port scan cannot flood the log.
_REFUSAL_LOG_INTERVAL = 60.0


# ----------------------------------------------------------------- allow-list


@functools.lru_cache(maxsize=8)
def _networks(allow: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in allow)


def is_allowed(address: str, allow: tuple[str, ...] | list[str]) -> bool:
    """True if ``address`` lies in one of the ``allow`` networks.

    An IPv4-mapped IPv6 address (``::ffff:10.1.2.3``, what a dual-stack socket
    reports for an IPv4 client) is checked as the IPv4 address it carries.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    nets = _networks(tuple(allow))
    return any(c in net for c in candidates for net in nets if c.version == net.version)


class _RefusalLog:
    """Warn once per address and kind of refusal per interval; count what was left out.

    Used for every refusal a client can repeat at will: connections from
    outside ``allow``, connections over the limits, requests without the
    right token. One line a minute per address is enough to act on, and a
    scan or a script in a loop cannot fill the disk.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def refused(self, address: str, kind: str, message: str, *args: Any) -> bool:
        """Log ``message % args`` unless ``(address, kind)`` was logged within the interval.

        Returns True when the line was written.
        """
        counters.count_refusal(kind)
        now = time.monotonic()
        key = (address, kind)
        last = self._last.get(key)
        if last is not None and now - last[0] < _REFUSAL_LOG_INTERVAL:
            self._last[key] = (last[0], last[1] + 1)
            return False
        extra = f" ({last[1]} more refused since the last warning)" if last and last[1] else ""
        log.warning(message + "%s", *args, extra)
        self._last[key] = (now, 0)
        if len(self._last) > 4096:
            # Forget the oldest half; a scan across many addresses must not grow memory.
            for old in sorted(self._last, key=lambda k: self._last[k][0])[:2048]:
                del self._last[old]
        return True


_refusals = _RefusalLog()


class _Census:
    """The open connections of one listening server, by client address.

    A guard is counted from its address check to ``connection_lost``. A
    guard whose transport closed without telling it (possible when a TLS
    handshake fails) is pruned when a limit is reached, so the count cannot
    creep up and lock everyone out.
    """

    def __init__(self) -> None:
        self._by_address: dict[str, set[_Guard]] = {}
        self._total = 0
        self._nofile_for = 0

    def admit(self, guard: _Guard, address: str, settings: Any) -> str | None:
        """Count ``guard`` in, or the reason it is over a limit (then it is not counted)."""
        self.fd_room(settings)
        mine = self._by_address.get(address, set())
        if len(mine) >= settings.max_connections_per_client or (
            self._total >= settings.max_connections
        ):
            self._prune()
            mine = self._by_address.get(address, set())
        if len(mine) >= settings.max_connections_per_client:
            return (
                f"{len(mine)} connections from this address are open, the most one client "
                "may keep (setting max_connections_per_client)"
            )
        if self._total >= settings.max_connections:
            return (
                f"{self._total} connections are open, the most this server keeps "
                "(setting max_connections)"
            )
        self._by_address.setdefault(address, set()).add(guard)
        self._total += 1
        return None

    def fd_room(self, settings: Any) -> None:
        """Make room for ``max_connections`` file descriptors (again after a reload changed it)."""
        if settings.max_connections != self._nofile_for:
            self._nofile_for = settings.max_connections
            ensure_fd_room(settings.max_connections)

    def release(self, guard: _Guard, address: str) -> None:
        mine = self._by_address.get(address)
        if mine is None or guard not in mine:
            return
        mine.discard(guard)
        self._total -= 1
        if not mine:
            del self._by_address[address]

    def _prune(self) -> None:
        for address, guards in list(self._by_address.items()):
            for guard in [g for g in guards if g.stale()]:
                self.release(guard, address)


# File descriptors kept free for everything but client connections: the job
# database, log files, procwrap pipes, the configuration watcher.
_FD_RESERVE = 256


def ensure_fd_room(max_connections: int) -> None:
    """Raise the soft open-file limit so ``max_connections`` sockets fit, if the hard limit allows.

    Many systems start daemons with a soft limit of 1024; without this, the
    1024th connection would fail in accept() (EMFILE) rather than be refused
    by the limit, and so would the server's own files.
    """
    want = max_connections + _FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, new, exc)
            new = soft
        if new < want:
            log.warning(
                "the open-file limit (%d, hard limit %d) is below max_connections (%d) plus "
                "%d for the server's own files: raise it (LimitNOFILE= in the systemd unit, "
                "ulimit -n) or lower max_connections",
                new,
                hard,
                max_connections,
                _FD_RESERVE,
            )


# --------------------------------------------------------- connection guard

# Guard of each live connection, keyed by id() of aiohttp's protocol object
# (which has __slots__ and cannot be weakly referenced); entries are removed
# in connection_lost. The middleware finds a request's guard through it.
_GUARDS: dict[int, _Guard] = {}


class _TLSCache:
    """The server TLS context, rebuilt when the settings or the files change.

    A certificate renewed on disk takes effect for new connections; a broken
    renewal keeps the last good context and logs why.
    """

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._ctx: ssl.SSLContext | None = None

    def get(self, settings: Any) -> ssl.SSLContext | None:
        if not (settings.tls_cert and settings.tls_key):
            return None
        key: tuple[Any, ...] = (settings.tls_cert, settings.tls_key)
        for name in key:
            try:
                st = os.stat(os.path.expanduser(name))
                key += (st.st_mtime_ns, st.st_size)
            except OSError:
                key += (None,)
        if key != self._key:
            try:
                self._ctx = server_ssl_context(settings)
            except CredentialsError as exc:
                if self._ctx is None:
                    raise
                log.error("keeping the previous TLS certificate: %s", exc)
            self._key = key
        return self._ctx


class _Guard(asyncio.Protocol):
    """Wraps one aiohttp RequestHandler: allow-list, optional TLS, client timeouts."""

    def __init__(self, inner: Any, ctx: Any, tls: _TLSCache, census: _Census) -> None:
        self._inner = inner
        self._ctx = ctx
        self._tls = tls
        self._census = census
        self._counted: str | None = None  # the address this connection is counted under
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._attached = False
        self._closed = False
        self._pending: list[bytes] = []
        self._pending_eof = False
        self._tls_task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._peer = "?"
        # Client-timeout bookkeeping (loop.time() values).
        self._idle_since: float | None = None
        self._request_since: float | None = None
        self._write_paused_since: float | None = None
        self.handling = 0  # handlers running (set by the middleware)
        self.streaming = 0  # of which stream handlers: their reader may pause (see streams.py)
        self.reading_body = False  # the middleware is receiving a body

    # ---- connection set-up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if not self._admit(transport):
            self._refuse()
            return
        if transport.get_extra_info("sslcontext") is None:
            try:
                tls = self._tls.get(self._ctx.live.settings)
            except CredentialsError as exc:
                log.error("refusing connection from %s: %s", self._peer, exc)
                self._refuse()
                return
            if tls is not None:
                # Hold the bytes in the kernel until the TLS layer takes over.
                transport.pause_reading()
                self._tls_task = self._loop.create_task(self._start_tls(transport, tls))
                self._arm()
                return
        self._attach(transport)

    def _admit(self, transport: asyncio.Transport) -> bool:
        """The allow-list, then the connection limits; False (logged) to close at once."""
        settings = self._ctx.live.settings
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            host, port = str(peer[0]), peer[1]
            self._peer = f"{host} port {port}"
            if not is_allowed(host, settings.allow):
                _refusals.refused(
                    host,
                    "allow",
                    "refused connection from %s port %s: address not in allow",
                    host,
                    port,
                )
                return False
        else:
            # A Unix socket, reachable only through file permissions: counted in the total.
            host = "local"
        reason = self._census.admit(self, host, settings)
        if reason is not None:
            _refusals.refused(
                host, "limit", "closed connection from %s before HTTP: %s", self._peer, reason
            )
            return False
        self._counted = host
        return True

    def _refuse(self) -> None:
        self._closed = True
        self._uncount()
        assert self._transport is not None
        self._transport.abort()

    def _uncount(self) -> None:
        if self._counted is not None:
            self._census.release(self, self._counted)
            self._counted = None

    def stale(self) -> bool:
        """True when the connection is gone but was never reported lost."""
        return self._closed or self._transport is None or self._transport.is_closing()

    async def _start_tls(self, transport: asyncio.Transport, tls: ssl.SSLContext) -> None:
        timeout = self._timeout()
        try:
            new = await self._loop.start_tls(
                transport,
                self,
                tls,
                server_side=True,
                ssl_handshake_timeout=timeout if timeout > 0 else None,
            )
        except asyncio.CancelledError:
            transport.abort()
            raise
        except (OSError, ConnectionError, ssl.SSLError) as exc:
            log.info("TLS handshake with %s failed: %s", self._peer, exc or type(exc).__name__)
            self._uncount()
            transport.abort()
            return
        finally:
            self._tls_task = None
        if new is None or self._closed:
            self._uncount()
            transport.abort()
            return
        self._attach(new)

    def _attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._attached = True
        _GUARDS[id(self._inner)] = self
        self._idle_since = self._loop.time()
        self._inner.connection_made(transport)
        # Data the TLS layer decrypted before start_tls() returned.
        pending, self._pending = self._pending, []
        for data in pending:
            self._note_data()
            self._inner.data_received(data)
        if self._pending_eof:
            self._inner.eof_received()
        self._arm()

    # ---- protocol calls, passed on to aiohttp

    def data_received(self, data: bytes) -> None:
        if not self._attached:
            self._pending.append(data)
            return
        self._note_data()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if not self._attached:
            self._pending_eof = True
            return None
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._write_paused_since = self._loop.time()
        if self._attached:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused_since = None
        if self._attached:
            self._inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closed = True
        self._uncount()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._tls_task is not None:
            self._tls_task.cancel()
        if self._attached:
            self._attached = False
            _GUARDS.pop(id(self._inner), None)
            self._inner.connection_lost(exc)

    # ---- client timeouts

    def _timeout(self) -> float:
        return float(self._ctx.live.settings.client_timeout)

    def _busy(self) -> bool:
        """True while the server, not the client, is the one to act."""
        if self.handling:
            return True
        # aiohttp sets this from the start of a request to the end of its answer.
        in_progress = bool(getattr(self._inner, "_request_in_progress", False))
        return in_progress and not self.reading_body

    def _note_data(self) -> None:
        if self._request_since is None and not self._busy():
            self._request_since = self._loop.time()

    def _arm(self) -> None:
        if self._closed:
            return
        timeout = self._timeout()
        # Check a few times per timeout: state changes (request done, body read)
        # are noticed within a quarter of it without a callback per byte.
        interval = min(max(timeout / 4, 0.05), 15.0) if timeout > 0 else 15.0
        self._timer = self._loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._closed or self._transport is None:
            return
        timeout = self._timeout()
        now = self._loop.time()
        if timeout > 0:
            reason = self._overdue(now, timeout)
            if reason:
                level = logging.DEBUG if reason.startswith("idle") else logging.WARNING
                log.log(level, "closed connection from %s: %s", self._peer, reason)
                self._closed = True
                self._transport.abort()
                return
        self._arm()

    def _overdue(self, now: float, timeout: float) -> str | None:
        if not self._attached:
            # Still in the TLS handshake; start_tls has its own timeout, this is a backstop.
            if self._idle_since is None:
                self._idle_since = now
            if now - self._idle_since >= 2 * timeout:
                return f"TLS handshake not done within {timeout:g} s"
            return None
        if (
            self._write_paused_since is not None
            and not self.streaming
            and now - self._write_paused_since >= timeout
        ):
            return f"client stopped reading its answer for {timeout:g} s"
        if self._busy():
            self._idle_since = None
            self._request_since = None
            return None
        if self._request_since is not None:
            if now - self._request_since >= timeout:
                return f"request not received completely within {timeout:g} s (slow client)"
            return None
        if self._idle_since is None:
            self._idle_since = now
        elif now - self._idle_since >= timeout:
            return f"idle for {timeout:g} s"
        return None


def filtered_factory(
    server_factory: Callable[[], asyncio.BaseProtocol], ctx: Any
) -> Callable[[], asyncio.Protocol]:
    """Wrap aiohttp's ``web.Server`` (``runner.server``) for ``loop.create_server``.

    Connections from addresses outside ``ctx.live.settings.allow`` are
    aborted in ``connection_made``. When tls_cert/tls_key are set, the TLS
    handshake is done here, after the address check, so do not pass ``ssl=``
    to ``create_server`` (if you do, it still works, but refused clients get
    their handshake first). Raises :class:`CredentialsError` at once for a
    bad certificate or key, so a worker fails while booting, not per
    connection.
    """
    tls = _TLSCache()
    tls.get(ctx.live.settings)
    census = _Census()
    census.fd_room(ctx.live.settings)

    def factory() -> asyncio.Protocol:
        return _Guard(server_factory(), ctx, tls, census)

    return factory


# ---------------------------------------------------------------- middlewares


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status, headers=headers)


def _is_open(request: web.Request, ctx: Any) -> bool:
    if request.method not in ("GET", "HEAD"):
        return False
    path = request.path
    if path in _OPEN_PATHS:
        return True
    if path == "/metrics":
        return getattr(ctx.live.settings, "metrics_auth", "allow-list") == "allow-list"
    # normpath: "/static/../v1/jobs" must not count as a static file.
    return path.startswith(_OPEN_PREFIX) and posixpath.normpath(path) == path.rstrip("/")


def _message_for(request: web.Request, exc: web.HTTPException, limit: int) -> str:
    if exc.status == 404:
        return f"not found: {request.method} {request.path}"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"method {request.method} is not allowed on {request.path}" + (
            f"; allowed: {allowed}" if allowed else ""
        )
    if exc.status == 413:
        return f"request body too large: at most {limit} bytes are accepted"
    text = (exc.text or "").strip()
    if text and not text.startswith(f"{exc.status}:"):
        return text
    return exc.reason or f"HTTP {exc.status}"


class _TokenWatch:
    """Notices a changed token file, so `rayfront token new` works without a restart.

    One stat per request that needs a token. The first signature is taken
    when the middlewares are built, right after the worker read the token.
    A changed file that fails the checks (world-readable, empty...) makes
    the server refuse token-protected requests until it is fixed: failing
    open would keep a possibly exposed token valid.
    """

    def __init__(self, ctx: Any) -> None:
        self.problem: str | None = None
        self._sig = self._signature(ctx)

    @staticmethod
    def _signature(ctx: Any) -> tuple[Any, ...] | None:
        path = ctx.live.settings.token_path(ctx.layout.default_token_file)
        if path is None:
            return None
        try:
            st = os.stat(path)
        except OSError as exc:
            return (str(path), exc.errno)
        return (str(path), st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode)

    def current(self, ctx: Any) -> str | None:
        sig = self._signature(ctx)
        if sig is None or sig == self._sig:
            return ctx.token
        self._sig = sig
        try:
            new = read_server_token(ctx.layout, ctx.live.settings)
        except CredentialsError as exc:
            self.problem = str(exc)
            log.error(
                "token file changed and cannot be used: %s; requests that need a "
                "token are refused until it is fixed",
                exc,
            )
            return ctx.token
        self.problem = None
        if new != ctx.token:
            log.info("token file %s changed: the new token is in force", sig[0])
            ctx.token = new
        return new


class _NamedTokens:
    """The named tokens of ``<home>/config/tokens``, re-read when the file changes.

    One stat per request that needs a token. A changed file that cannot be
    used (a broken hand edit, a world-readable mode) is logged and the last
    good entries stay in force; a deleted file means no named tokens.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._sig: tuple[Any, ...] | None = None
        self.entries: dict[str, tokens.NamedToken] = {}
        self._refresh()

    def _signature(self) -> tuple[Any, ...]:
        try:
            st = os.stat(self._path)
        except OSError as exc:
            return (exc.errno,)
        return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode)

    def _refresh(self) -> None:
        sig = self._signature()
        if sig == self._sig:
            return
        self._sig = sig
        try:
            entries = tokens.load(self._path)
        except tokens.TokensFileError as exc:
            log.error("%s; the named tokens read before stay in force until it is fixed", exc)
            return
        if self.entries or entries:
            log.info("named tokens from %s: %d user(s)", self._path, len(entries))
        self.entries = entries

    def match(self, request: web.Request) -> tokens.NamedToken | None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            return None
        self._refresh()
        return tokens.find(self.entries, given) if self.entries else None


def middlewares(ctx: Any) -> list[Any]:
    """The aiohttp middlewares, outermost first: counting, errors, token, body."""
    named = _NamedTokens(ctx.layout.tokens_file)
    return [
        _count_requests,
        _json_errors(ctx),
        _bearer_token(ctx, _TokenWatch(ctx), named),
        _body_limit(ctx),
    ]


@web.middleware
async def _count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts each answer by method and status for GET /metrics."""
    resp = await handler(request)
    counters.count_request(request.method, resp.status)
    return resp


def _json_errors(ctx: Any) -> Any:
    """Every error answer in the API's JSON shape; an unexpected exception a logged 500."""

    @web.middleware
    async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400 or (exc.content_type or "").endswith("json"):
                raise
            return _http_error(request, exc, ctx.live.settings.max_body_bytes)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:
            full = _disk_full(exc, ctx)
            if full is not None:
                log.error("%s %s from %s: %s", request.method, request.path, request.remote, full)
                return _error(507, full)
            log.exception(
                "internal error on %s %s from %s", request.method, request.path, request.remote
            )
            return _error(500, "internal server error; the details are in the server log")

    return json_errors


def _http_error(request: web.Request, exc: web.HTTPException, limit: int) -> web.Response:
    headers = {
        k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")
    }
    resp = _error(exc.status, _message_for(request, exc, limit), headers)
    if exc.status == 413:
        # The rest of the body is not read; this connection cannot be reused.
        resp.force_close()
    return resp


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def _disk_full(exc: BaseException, ctx: Any) -> str | None:
    """The 507 message when ``exc`` (or what it was raised from) is a full disk, else None.

    SQLite reports ENOSPC as "database or disk is full"; a failed ROLLBACK
    after it may be what arrives, with the real cause as its context.
    """
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        if isinstance(seen, sqlite3.OperationalError) and "full" in str(seen):
            folder = ctx.layout.db_path.parent
            return (
                f"no space left in {folder}, the folder of the job database ({seen}); "
                "nothing was changed: free space there and try again"
            )
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            where = os.path.dirname(str(seen.filename)) if seen.filename else "the server's disk"
            return (
                f"no space left in {where} ({seen.strerror}); "
                "nothing was changed: free space there and try again"
            )
        seen = seen.__cause__ or seen.__context__
    return None


def _bearer_token(ctx: Any, watch: _TokenWatch, named: _NamedTokens) -> Any:
    """The token check; refusals are logged at most once a minute per client address.

    Sets ``request[USER_KEY]`` and ``request[ROLE_KEY]``: a named token's, else
    the shared token's (:data:`~rayserver.common.tokens.SHARED_USER`, admin),
    which is also who every request is when tokens are switched off.
    """

    @web.middleware
    async def bearer_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        request[USER_KEY], request[ROLE_KEY] = tokens.SHARED_USER, "admin"
        if _is_open(request, ctx):
            return await handler(request)
        entry = named.match(request)
        if entry is not None:
            request[USER_KEY], request[ROLE_KEY] = entry.user, entry.role
            return await handler(request)
        token = watch.current(ctx)
        if token is None:
            return await handler(request)
        if watch.problem:
            return _error(
                503, "the server's token file cannot be used; the reason is in the server log"
            )
        refusal = _token_refusal(request, token)
        if refusal is None:
            return await handler(request)
        problem, message = refusal
        address = request.remote or "?"
        _refusals.refused(
            address,
            "token",
            "refused %s %s from %s: %s",
            request.method,
            request.path,
            address,
            problem,
        )
        return _error(401, message, {"WWW-Authenticate": 'Bearer realm="rayserver"'})

    return bearer_token


def _token_refusal(request: web.Request, token: str) -> tuple[str, str] | None:
    """(what the log says, what the client is told) when the request's token is not ``token``."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        return "no token", (
            "a token is required: send 'Authorization: Bearer <token>' "
            "(rayfront reads it from <home>/config/token or $RAYFRONT_TOKEN)"
        )
    if not tokens_equal(given, token):
        return "wrong token", (
            "wrong token: neither the server's shared token nor a named token (it may "
            "have been rotated with `rayfront token new` or revoked with `rayfront token revoke`)"
        )
    return None


def _body_limit(ctx: Any) -> Any:
    """Reads the whole body up to max_body_bytes, so receiving it counts against the client."""

    @web.middleware
    async def body_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        guard = _GUARDS.get(id(request.protocol))
        # A stream handler reads its body as it comes (and may answer slowly, like ssh).
        stream = getattr(request.match_info.handler, "streams_body", False)
        if request.body_exists and not stream:
            request = await _read_body(request, guard, ctx.live.settings.max_body_bytes)
        if guard is None:
            return await handler(request)
        guard.handling += 1
        guard.streaming += bool(stream)
        try:
            return await handler(request)
        finally:
            guard.handling -= 1
            guard.streaming -= bool(stream)

    return body_limit


async def _read_body(request: web.Request, guard: _Guard | None, limit: int) -> web.Request:
    length = request.content_length
    if length is not None and length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=length)
    # Read the whole body here, so the time it takes counts against the
    # client's timeout and the limit holds for chunked bodies too.
    request = request.clone(client_max_size=limit)
    if guard is not None:
        guard.reading_body = True
    try:
        await request.read()
    finally:
        if guard is not None:
            guard.reading_body = False
    return request
