"""The share probe, ``POST /v1/share-probe``: does this server see the client's project
folder, and do whole-file fcntl locks taken on one server reach the others?

Radiance's ambient files (``-af``) are shared by the processes of a split
simulation through blocking whole-file fcntl write locks. On a share that
does not pass locks between hosts (a synced folder, NFS without a lock
manager) two servers would append to the same file at once and scramble it,
so the client checks first:

1. it creates ``<project>/.rayfront-probe-<hex>`` (mode 0664) holding a nonce;
2. ``read`` on every server: the server sees that very file (same nonce);
3. ``hold`` on one server: the worker takes an exclusive lock (F_SETLK) and
   keeps the descriptor open until ``release`` or ``hold_seconds``;
4. ``test`` on each other server: a shared lock attempt must fail there.

The server never creates, writes or deletes the file; the client does.
Holds live in the worker only: a restarted worker has none, and the kernel
dropped their locks with the old process.

fcntl locks belong to the process, not to the descriptor: closing *any*
descriptor of a file drops every lock this process holds on it, and a lock
request of the process itself never conflicts with its own locks. So a file
this worker holds is never opened and closed again while the hold lasts (its
inode is looked up first and the held descriptor read instead), and all
probe file work runs under one asyncio lock so two requests cannot interleave
between that look-up and the registry update.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from jsonschema.exceptions import best_match

from rayserver.server import jobspec, jsonbody
from rayserver.server.jobspec import JobSpecError, describe_error

log = logging.getLogger("rayserver.server.shareprobe")

FILE_RE = re.compile(r"\.rayfront-probe-[0-9a-f]{16,64}")
NONCE_RE = re.compile(r"[0-9a-f]{16,128}")
HOLD_ID_RE = re.compile(r"[0-9a-f]{32}")
OPS = ("read", "hold", "test", "release")
MAX_HOLDS = 32
DEFAULT_HOLD_SECONDS = 30.0
# A share (NFS attribute cache, a sync client) may show a new file late.
READ_WAIT = 3.0
READ_POLL = 0.1
# The nonce is at most 128 characters; a little more shows "other content".
READ_LIMIT = 4096

_FORMS = {
    "file": "a plain file name of the form .rayfront-probe-<16 to 64 lowercase hex digits> "
    "in the project directory",
    "nonce": "16 to 128 lowercase hex digits",
    "hold_id": "the hold_id of a 'hold' answer (32 lowercase hex digits)",
}
_PATTERNS = {"file": FILE_RE, "nonce": NONCE_RE, "hold_id": HOLD_ID_RE}
_LOCKED_ERRNOS = (errno.EAGAIN, errno.EACCES)


@dataclass
class Hold:
    """One exclusive lock this worker keeps for a client."""

    hold_id: str
    fd: int
    path: str
    key: tuple[int, int]  # (st_dev, st_ino) of the locked file
    nonce: str
    client: str
    timer: asyncio.TimerHandle | None = None
    # Descriptors of the held file opened by a racing request (path renamed
    # between look-up and open): closing them would drop the lock, so they
    # are closed with the hold.
    extra_fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in (*self.extra_fds, self.fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.extra_fds.clear()


class _Opened:
    """A descriptor of the probe file, or the reason there is none."""

    def __init__(
        self, fd: int | None, hold: Hold | None, detail: str, missing: bool = False
    ) -> None:
        self.fd = fd  # our own descriptor, to close after use
        self.hold = hold  # the file is held by this worker: use hold.fd
        self.detail = detail
        self.missing = missing

    @property
    def readable_fd(self) -> int | None:
        return self.hold.fd if self.hold is not None else self.fd

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def _open_error(path: str, exc: OSError, write: bool) -> str:
    if exc.errno == errno.ELOOP:
        return (
            f"{path} is a symbolic link; the probe file must be the plain file the client created"
        )
    if exc.errno == errno.EACCES:
        how = "for writing" if write else "for reading"
        access = "write" if write else "read"
        return (
            f"cannot open {path} {how}: permission denied; the server's user/group needs "
            f"{access} access to the project directory"
        )
    if exc.errno == errno.EROFS:
        return f"cannot open {path} for writing: the share is mounted read-only on this server"
    return f"cannot open {path}: {exc.strerror or exc}"


def _describe_nonce_mismatch(path: str, content: bytes | None) -> str:
    if content is None:
        return f"{path} does not exist on this server"
    return (
        f"{path} holds something other than the client's nonce ({len(content)} bytes): "
        "this server sees a different folder under that location"
    )


class ShareProbes:
    """The route handler and the worker's registry of holds."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx  # rayserver.server.api.AppContext (live config)
        self.holds: dict[str, Hold] = {}
        self._by_key: dict[tuple[int, int], Hold] = {}
        self._lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ request

    async def _read_json(self, request: web.Request) -> dict[str, Any]:
        if request.content_type != "application/json":
            raise JobSpecError(
                415,
                "send the probe as JSON with 'Content-Type: "
                f"application/json' (got {request.content_type or 'no content type'!r})",
            )
        data = jsonbody.parse(await request.read(), "a JSON probe object")
        return check_probe(data)

    async def handle(self, request: web.Request) -> web.Response:
        """POST /v1/share-probe."""
        data = await self._read_json(request)
        client = request.remote or "?"
        op = data["op"]
        if op == "release":
            return web.json_response(await self._release(data, client))
        if op == "hold" and len(self.holds) >= MAX_HOLDS:
            log.info("share probe: refused a hold for %s: %d holds already", client, MAX_HOLDS)
            raise JobSpecError(
                429,
                f"this server already keeps {MAX_HOLDS} probe locks, the most it holds at "
                "once; release some (op 'release') or wait until they expire",
            )
        live = self.ctx.live
        _root, project_dir = await asyncio.to_thread(
            jobspec.resolve_project,
            data["location"],
            data["project"],
            record=lambda: live.record,
            reload=live.reload_if_changed,
            client=client,
        )
        path = str(project_dir / data["file"])
        if op == "read":
            answer = await self._read(path, data["nonce"], client)
        elif op == "hold":
            answer = await self._hold(path, data, client)
        else:
            answer = await self._test(path, data["nonce"], client)
        return web.json_response(answer)

    # ------------------------------------------------------------ file work (threads)

    def _open(self, path: str, flags: int) -> _Opened:
        """The probe file opened with ``flags``, or this worker's hold on it (run in a thread)."""
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return _Opened(None, None, f"{path} does not exist on this server", missing=True)
        except OSError as exc:
            return _Opened(None, None, f"cannot look at {path}: {exc.strerror or exc}")
        held = self._by_key.get((st.st_dev, st.st_ino))
        if held is not None:
            return _Opened(None, held, "")
        try:
            fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return _Opened(None, None, f"{path} does not exist on this server", missing=True)
        except OSError as exc:
            return _Opened(None, None, _open_error(path, exc, (flags & os.O_RDWR) != 0))
        st = os.fstat(fd)
        held = self._by_key.get((st.st_dev, st.st_ino))
        if held is not None:
            # Renamed onto a held file since the stat: closing fd would drop that lock.
            held.extra_fds.append(fd)
            return _Opened(None, held, "")
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return _Opened(None, None, f"{path} is not a regular file")
        return _Opened(fd, None, "")

    @staticmethod
    def _content(fd: int) -> bytes:
        return os.pread(fd, READ_LIMIT + 1, 0)

    def _look(self, path: str, nonce: str) -> tuple[bool, str]:
        opened = self._open(path, os.O_RDONLY)
        try:
            fd = opened.readable_fd
            if fd is None:
                return False, opened.detail
            try:
                content = self._content(fd)
            except OSError as exc:
                return False, f"cannot read {path}: {exc.strerror or exc}"
            if content.strip() != nonce.encode():
                return False, _describe_nonce_mismatch(path, content)
            return True, ""
        finally:
            opened.close()

    def _try_hold(self, path: str, nonce: str) -> tuple[int, tuple[int, int]] | str:
        """(descriptor, file key) with the exclusive lock taken, or why not."""
        opened = self._open(path, os.O_RDWR)
        if opened.hold is not None:
            return (
                f"{path} is already locked by this server (hold {opened.hold.hold_id}); "
                "release it first"
            )
        if opened.fd is None:
            return opened.detail
        fd = opened.fd
        try:
            content = self._content(fd)
            if content.strip() != nonce.encode():
                return _describe_nonce_mismatch(path, content)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in _LOCKED_ERRNOS:
                    return "already locked by another process"
                return _lock_error(path, exc)
            st = os.fstat(fd)
            opened.fd = None  # the hold owns it now
            return fd, (st.st_dev, st.st_ino)
        except OSError as exc:
            return f"cannot read {path}: {exc.strerror or exc}"
        finally:
            opened.close()

    def _try_test(self, path: str, nonce: str) -> tuple[bool, str]:
        opened = self._open(path, os.O_RDONLY)
        try:
            if opened.hold is not None:
                return False, (
                    f"this server holds that lock itself (hold {opened.hold.hold_id}):"
                    " the server asked to hold and the one asked to test are the "
                    "same; test from another server"
                )
            if opened.fd is None:
                return False, opened.detail
            fd = opened.fd
            try:
                content = self._content(fd)
            except OSError as exc:
                return False, f"cannot read {path}: {exc.strerror or exc}"
            if content.strip() != nonce.encode():
                return False, _describe_nonce_mismatch(path, content)
            try:
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in _LOCKED_ERRNOS:
                    return True, ""
                return False, _lock_error(path, exc)
            fcntl.lockf(fd, fcntl.LOCK_UN)
            return False, "no lock seen although another server holds one"
        finally:
            opened.close()

    # ------------------------------------------------------------ operations

    def _mutex(self) -> asyncio.Lock:
        # Created on first use, inside the worker's running loop.
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def _read(self, path: str, nonce: str, client: str) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READ_WAIT
        while True:
            async with self._mutex():
                seen, detail = await asyncio.to_thread(self._look, path, nonce)
            if seen or loop.time() + READ_POLL > deadline:
                break
            await asyncio.sleep(READ_POLL)
        if seen:
            log.debug("share probe: %s read %s: seen", client, path)
        else:
            detail = f"{detail} (waited {READ_WAIT:g} s)"
            log.info("share probe: %s read %s: not seen: %s", client, path, detail)
        return {"op": "read", "seen": seen, "detail": detail, "path": path}

    async def _hold(self, path: str, data: dict[str, Any], client: str) -> dict[str, Any]:
        seconds = float(data.get("hold_seconds", DEFAULT_HOLD_SECONDS))
        async with self._mutex():
            if len(self.holds) >= MAX_HOLDS:  # filled while this request waited
                raise JobSpecError(
                    429,
                    f"this server already keeps {MAX_HOLDS} probe locks, the most it holds "
                    "at once; release some (op 'release') or wait until they expire",
                )
            result = await asyncio.to_thread(self._try_hold, path, data["nonce"])
            if isinstance(result, str):
                log.info("share probe: %s hold %s refused: %s", client, path, result)
                return {"op": "hold", "held": False, "detail": result}
            fd, key = result
            hold = Hold(secrets.token_hex(16), fd, path, key, data["nonce"], client)
            hold.timer = asyncio.get_running_loop().call_later(seconds, self._expire, hold.hold_id)
            self.holds[hold.hold_id] = hold
            self._by_key[key] = hold
        log.debug("share probe: %s holds %s (hold %s, %g s)", client, path, hold.hold_id, seconds)
        return {"op": "hold", "held": True, "hold_id": hold.hold_id, "expires_in": seconds}

    async def _test(self, path: str, nonce: str, client: str) -> dict[str, Any]:
        async with self._mutex():
            locked, detail = await asyncio.to_thread(self._try_test, path, nonce)
        if locked:
            log.debug("share probe: %s test %s: locked elsewhere", client, path)
        else:
            log.info("share probe: %s test %s: not locked: %s", client, path, detail)
        return {"op": "test", "locked": locked, "detail": detail}

    async def _release(self, data: dict[str, Any], client: str) -> dict[str, Any]:
        hold_id = data["hold_id"]
        async with self._mutex():
            hold = self.holds.get(hold_id)
            if hold is None:
                detail = (
                    f"no hold {hold_id} on this server: it was released already, it "
                    "expired (hold_seconds), or the server restarted"
                )
            elif hold.nonce != data["nonce"]:
                hold, detail = None, f"hold {hold_id} belongs to another probe (other nonce)"
            else:
                await self._drop(hold)
        if hold is None:
            log.info("share probe: %s release refused: %s", client, detail)
            return {"op": "release", "released": False, "detail": detail}
        log.debug("share probe: %s released hold %s on %s", client, hold_id, hold.path)
        return {"op": "release", "released": True}

    async def _drop(self, hold: Hold) -> None:
        """Forget ``hold`` and close its descriptors (which drops the lock); under the mutex."""
        self.holds.pop(hold.hold_id, None)
        if self._by_key.get(hold.key) is hold:
            del self._by_key[hold.key]
        if hold.timer is not None:
            hold.timer.cancel()
            hold.timer = None
        # On a network share the unlock is a round trip: keep it off the loop.
        await asyncio.to_thread(hold.close)

    def _expire(self, hold_id: str) -> None:
        async def expire() -> None:
            async with self._mutex():
                hold = self.holds.get(hold_id)
                if hold is not None:
                    await self._drop(hold)
                    log.debug("share probe: hold %s on %s expired", hold_id, hold.path)

        task = asyncio.get_running_loop().create_task(expire())
        self._tasks.add(task)  # the loop keeps only weak references
        task.add_done_callback(self._tasks.discard)

    async def cleanup(self, _app: web.Application | None = None) -> None:
        """Close every held descriptor (aiohttp ``on_cleanup``)."""
        for task in list(self._tasks):
            task.cancel()
        for hold in list(self.holds.values()):
            if hold.timer is not None:
                hold.timer.cancel()
            hold.close()
        self.holds.clear()
        self._by_key.clear()


def _lock_error(path: str, exc: OSError) -> str:
    if exc.errno == errno.ENOLCK:
        return (
            f"cannot lock {path}: no locks available (the share has no working lock "
            "manager on this server)"
        )
    return f"cannot lock {path}: {exc.strerror or exc}"


def check_probe(data: Any) -> dict[str, Any]:
    """The request body checked against ShareProbeRequest and the per-op field rules (422)."""
    if not isinstance(data, dict):
        raise JobSpecError(
            422,
            "the probe must be a JSON object with location, project, file, "
            f"nonce and op; got {type(data).__name__}",
        )
    error = best_match(jobspec.schema_validator("ShareProbeRequest").iter_errors(data))
    if error is not None:
        where, message = describe_error(error)
        if error.validator == "pattern" and where in _FORMS:
            message = f"{where}: expected {_FORMS[where]}, got {error.instance!r}"
        elif error.validator == "enum" and where == "op":
            message = f"op: expected one of {', '.join(OPS)}, got {error.instance!r}"
        raise JobSpecError(422, message, where or None)
    # jsonschema's pattern is a search, where '$' also matches before a final
    # newline: match whole strings here.
    for name, pattern in _PATTERNS.items():
        value = data.get(name)
        if value is not None and not pattern.fullmatch(value):
            raise JobSpecError(422, f"{name}: expected {_FORMS[name]}, got {value!r}", name)
    op = data["op"]
    if op == "release" and "hold_id" not in data:
        raise JobSpecError(
            422,
            "missing required field 'hold_id' (op 'release' names the "
            "hold_id a 'hold' answer gave)",
            "hold_id",
        )
    if op != "release" and "hold_id" in data:
        raise JobSpecError(422, f"hold_id: only for op 'release', not {op!r}", "hold_id")
    if op != "hold" and "hold_seconds" in data:
        raise JobSpecError(422, f"hold_seconds: only for op 'hold', not {op!r}", "hold_seconds")
    return data
