"""The shim's one exchange with a server (``POST /v1/jobs/run``), at the cost of a few imports.

A shim is started for every Radiance command a tool runs, so its start-up
is most of its overhead: ``http.client`` (with ``email``), ``json`` (with
``re``), ``socket`` (with ``enum``) and ``threading`` cost 20-40 ms of
imports on the 2-core machine, more than the whole job on the server
(bench/run.py row 11). This module uses their C halves instead (``_socket``,
``_json``, ``_thread``) and speaks just the HTTP/1.1 the run needs: one
chunked request, one chunked answer of frames (see
:mod:`rayserver.server.runstream`), and a ``DELETE`` to cancel.

Standard input goes up in a second thread while the main thread reads the
answer, so a program that writes while it reads never waits for us.
"""

from __future__ import annotations

import _json
import _socket
import _thread
import os

CHUNK = 1 << 18
RUN_TYPE = "application/octet-stream"


class HttpError(Exception):
    """The server could not be reached, or the exchange broke (``str()`` says how)."""


class Refused(Exception):
    """An answer of 400 or more before the job was queued."""

    def __init__(self, status: int, message: str, is_api: bool) -> None:
        super().__init__(message)
        self.status = status
        self.is_api = is_api  # the API's JSON error (not an older server's plain 404)


# ---------------------------------------------------------------- JSON without re


def dumps(value: object) -> str:
    """JSON text of dicts, lists, strings, ints, bools and None (as json.dumps, compact)."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _json.encode_basestring_ascii(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (_json.encode_basestring_ascii(str(k)) + ":" + dumps(v) for k, v in value.items())
        return "{" + ",".join(items) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


class _ScanContext:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity


_scan = _json.make_scanner(_ScanContext())


def loads(data: bytes) -> object:
    """The JSON value of ``data`` (the C scanner json.loads uses); ValueError if it is none."""
    text = data.decode("utf-8").strip()
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError("not JSON") from None
    if end != len(text):
        raise ValueError("extra data after the JSON value")
    return value


# ---------------------------------------------------------------- the wire


class Connection:
    """One HTTP/1.1 connection to a server: request out, answer read as it comes."""

    def __init__(
        self, label: str, address: str, port: int, token: str | None, timeout: float | None = None
    ) -> None:
        self.label = label
        self.token = token
        self.buf = bytearray()
        self.body_left = 0  # bytes left in the current chunk of a chunked answer
        self.chunked = False
        # An ASCII name as bytes: a str would be encoded with "idna", whose import
        # (with re) costs more than the whole exchange.
        host: str | bytes = address.encode() if address.isascii() else address
        try:
            family, kind, proto, _, sockaddr = _socket.getaddrinfo(
                host, port, 0, _socket.SOCK_STREAM
            )[0]
            self.sock = _socket.socket(family, kind, proto)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(sockaddr)
            except OSError:
                self.sock.close()
                raise
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise HttpError(f"rayserver on {label} is not answering ({reason})") from None
        if family != _socket.AF_UNIX:
            self.sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def head(self, method: str, path: str, extra: str) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.label}", "User-Agent: rayfront-shim"]
        if self.token:
            lines.append(f"Authorization: Bearer {self.token}")
        return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    # -- reading
    def _fill(self) -> None:
        data = self.sock.recv(CHUNK)
        if not data:
            raise HttpError(f"rayserver on {self.label} closed the connection mid-answer")
        self.buf += data

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def _exact(self, size: int) -> bytes:
        while len(self.buf) < size:
            self._fill()
        data = bytes(self.buf[:size])
        del self.buf[:size]
        return data

    def answer(self) -> tuple[int, dict[str, str]]:
        """The status and headers (names in lower case) of the answer."""
        words = self._line().split(None, 2)
        if len(words) < 2 or not words[1].isdigit():
            raise HttpError(f"rayserver on {self.label} answered something other than HTTP")
        headers = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self.body_left = 0 if self.chunked else int(headers.get("content-length") or 0)
        return int(words[1]), headers

    def body(self, size: int) -> bytes:
        """Exactly ``size`` bytes of the answer's body (across chunks)."""
        out = bytearray()
        while len(out) < size:
            if self.body_left == 0:
                if not self.chunked:
                    raise HttpError(f"the answer of rayserver on {self.label} ended early")
                self.body_left = int(self._line().split(b";")[0] or b"0", 16)
                if self.body_left == 0:
                    raise HttpError(f"the answer of rayserver on {self.label} ended early")
            take = min(size - len(out), self.body_left)
            out += self._exact(take)
            self.body_left -= take
            if self.body_left == 0 and self.chunked:
                self._exact(2)  # the CRLF after a chunk's data
        return bytes(out)

    def whole_body(self) -> bytes:
        """The rest of a short answer (an error), at most 64 KiB."""
        if not self.chunked:
            return self.body(min(self.body_left, 65536))
        out = b""
        while len(out) < 65536:
            size = int(self._line().split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out += self._exact(size)
            self._exact(2)
        return out


def refused(conn: Connection, status: int) -> Refused:
    raw = conn.whole_body()
    try:
        data = loads(raw)
        message = str(data["error"]) if isinstance(data, dict) and data.get("error") else ""
    except (ValueError, UnicodeDecodeError):
        data, message = None, raw.decode("utf-8", "replace").strip()[:300]
    text = f"rayserver on {conn.label} refused: {message or 'no reason given'} (HTTP {status})"
    return Refused(status, text, isinstance(data, dict) and "error" in data)


def start_run(conn: Connection, job: dict, more_body: bool) -> int:
    """Send the job (and, unless ``more_body``, the end of the body); the queued job's id."""
    line = (dumps(job) + "\n").encode()
    extra = f"Content-Type: {RUN_TYPE}\r\nTransfer-Encoding: chunked\r\n"
    data = conn.head("POST", "/v1/jobs/run", extra) + b"%x\r\n%s\r\n" % (len(line), line)
    conn.send(data if more_body else data + b"0\r\n\r\n")
    status, headers = conn.answer()
    if status >= 400:
        raise refused(conn, status)
    location = headers.get("location", "")
    tail = location.rsplit("/", 1)[-1]
    if status != 201 or not tail.isdigit():
        raise HttpError(f"rayserver on {conn.label} answered {status} without a job")
    return int(tail)


def upload_stdin(conn: Connection, done: _thread.LockType) -> None:
    """In a thread: our fd 0 as the rest of the request body, then its end; ``done`` released."""
    try:
        while chunk := os.read(0, CHUNK):
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
    except OSError:
        pass  # the server stopped reading: the program ended (its state tells) or we did
    finally:
        done.release()


def start_upload(conn: Connection) -> _thread.LockType:
    done = _thread.allocate_lock()
    done.acquire()
    _thread.start_new_thread(upload_stdin, (conn, done))
    return done


def next_frame(conn: Connection) -> tuple[bytes, bytes]:
    """(kind, payload) of the answer's next frame."""
    head = conn.body(5)
    return head[:1], conn.body(int.from_bytes(head[1:5], "big"))


def cancel(label: str, address: str, port: int, token: str | None, job_id: int) -> str | None:
    """DELETE the job; None when the server took it, else what went wrong."""
    try:
        conn = Connection(label, address, port, token)
    except HttpError as exc:
        return str(exc)
    try:
        conn.send(conn.head("DELETE", f"/v1/jobs/{job_id}", "Content-Length: 0\r\n"))
        status, _ = conn.answer()
        return str(refused(conn, status)) if status >= 400 else None
    except (OSError, HttpError) as exc:
        return str(exc)
    finally:
        conn.close()


def free_cpus(server: list, token: str | None, timeout: float) -> int | None:
    """A server's cpus not taken by its running and queued jobs (GET /v1/info); None: no answer.

    ``server`` is [label, address, port, cpus of its record] (the rule of
    rayserver.client.fairshare, which the full path uses).
    """
    label, address, port, cpus = server
    try:
        conn = Connection(label, address, port, token, timeout)
    except HttpError:
        return None
    try:
        conn.send(conn.head("GET", "/v1/info", "Accept: application/json\r\n"))
        status, _ = conn.answer()
        info = loads(conn.whole_body()) if status == 200 else None
    except (OSError, HttpError, ValueError, UnicodeDecodeError):
        return None
    finally:
        conn.close()
    if not isinstance(info, dict):
        return None
    return (
        int(info.get("cpus") or cpus) - int(info.get("running") or 0) - int(info.get("queued") or 0)
    )


def least_busy(servers: list[list], token: str | None, timeout: float = 3.0) -> list | None:
    """The answering server with the most free cpus (ties spread by our pid); None: none answers.

    All are asked at once, each in a thread of its own.
    """
    free: list[int | None] = [None] * len(servers)
    done = [_thread.allocate_lock() for _ in servers]

    def probe(i: int) -> None:
        try:
            free[i] = free_cpus(servers[i], token, timeout)
        finally:
            done[i].release()

    for i, lock in enumerate(done):
        lock.acquire()
        _thread.start_new_thread(probe, (i,))
    for lock in done:
        lock.acquire(timeout=timeout + 1.0)
    answering = [i for i, f in enumerate(free) if f is not None]
    if not answering:
        return None
    turn = os.getpid()
    best = max(answering, key=lambda i: (free[i], -((i - turn) % len(servers))))
    return servers[best][:3]
