"""Talking to one rayserver over HTTP(S) with the standard library only.

``http.client`` keeps ``rayfront status`` fast to start (no aiohttp, no
event loop). Every failure becomes a :class:`ClientError` whose message a
person understands: a refused connection names the server and port, an HTTP
error carries the server's own ``error`` text.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

if TYPE_CHECKING:
    import ssl

#: exit codes of rayfront (a job's own exit status is used by ``run``)
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_LOCAL_ONLY = 3
# A streamed stdin/stdout waits on the queue and on the program: no practical limit.
STREAM_TIMEOUT = 7 * 24 * 3600.0


class ClientError(Exception):
    """Something rayfront cannot do; ``str()`` is the message for the user."""

    def __init__(
        self, message: str, *, status: int | None = None, exit_code: int = EXIT_ERROR
    ) -> None:
        super().__init__(message)
        self.status = status
        self.exit_code = exit_code

    def as_json(self) -> dict[str, Any]:
        return {"error": str(self), "status": self.status}


@dataclass(frozen=True)
class Target:
    """Where a rayserver answers: ``host`` is the name we show, ``address`` what we dial."""

    host: str
    address: str
    port: int
    ssl_context: ssl.SSLContext | None = None

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context else "http"


class _TLSConnection(http.client.HTTPSConnection):
    """HTTPS to ``address`` while checking the certificate against the host *name*.

    The local server is dialled as 127.0.0.1 but its certificate names the
    host, so the name used for SNI and the check must differ from the address.
    """

    def __init__(
        self, address: str, port: int, server_name: str, context: ssl.SSLContext, timeout: float
    ) -> None:
        super().__init__(address, port, timeout=timeout, context=context)
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(  # type: ignore[attr-defined]
            self.sock, server_hostname=self._server_name
        )


class Client:
    """JSON requests to one server, with the bearer token when there is one."""

    def __init__(self, target: Target, token: str | None, timeout: float = 30.0) -> None:
        self.target = target
        self.token = token
        self.timeout = timeout

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        t = self.target
        if t.ssl_context is not None:
            return _TLSConnection(t.address, t.port, t.host, t.ssl_context, timeout or self.timeout)
        return http.client.HTTPConnection(t.address, t.port, timeout=timeout or self.timeout)

    def _headers(self, body: bytes | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "rayfront"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            headers["Content-Type"] = "application/json"
        return headers

    def _not_answering(self, exc: BaseException) -> ClientError:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        if isinstance(exc, socket.gaierror):
            reason = f"host name not found: {exc.strerror or exc}"
        elif isinstance(exc, TimeoutError | socket.timeout):
            reason = "timed out"
        return ClientError(f"rayserver on {self.target.label} is not answering ({reason})")

    def _open(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        data = None if body is None else json.dumps(body).encode()
        conn = self._connection(timeout)
        try:
            conn.request(method, path, body=data, headers=self._headers(data))
            resp = conn.getresponse()
        except ClientError:
            conn.close()
            raise
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if _is_tls_error(exc):
                raise ClientError(
                    f"TLS handshake with rayserver on {self.target.label} failed ({exc})"
                ) from exc
            raise self._not_answering(exc) from exc
        _raise_for_status(conn, resp, self.target.label)
        return conn, resp

    def request(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> Any:
        """The decoded JSON answer; raises ClientError on any failure."""
        conn, resp = self._open(method, path, body, timeout)
        try:
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._not_answering(exc) from exc
        finally:
            conn.close()
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ClientError(
                f"rayserver on {self.target.label} sent something that is not JSON "
                f"for {method} {path}: {raw[:200]!r}"
            ) from exc

    def text(self, path: str, timeout: float | None = None) -> bytes:
        """A non-JSON answer (the log) as bytes."""
        conn, resp = self._open("GET", path, None, timeout)
        try:
            return resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._not_answering(exc) from exc
        finally:
            conn.close()

    def open_stream(
        self, method: str, path: str, body: Iterable[bytes] | None = None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """A request whose body (chunked) or answer is a stream of any length and pace.

        No timeout: the job may wait in the queue, and a program may read or
        write nothing for hours. An answer of 400 or more raises ClientError.
        """
        conn = self._connection(STREAM_TIMEOUT)
        headers = {"User-Agent": "rayfront", "Accept": "application/octet-stream"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
        try:
            conn.request(method, path, body=body, headers=headers, encode_chunked=body is not None)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if isinstance(exc, BrokenPipeError | ConnectionResetError) and body is not None:
                # The server may have answered (refused) before reading the whole body.
                raise ClientError(
                    f"rayserver on {self.target.label} closed the connection while "
                    f"receiving {path} ({exc})"
                ) from exc
            raise self._not_answering(exc) from exc
        _raise_for_status(conn, resp, self.target.label)
        return conn, resp

    def stream(self, path: str, timeout: float | None = None) -> Iterator[bytes]:
        """The body of a streaming answer, chunk by chunk as the server sends it."""
        conn, resp = self._open("GET", path, None, timeout)
        try:
            while True:
                try:
                    chunk = resp.read1(65536)
                except (OSError, http.client.HTTPException) as exc:
                    raise self._not_answering(exc) from exc
                if not chunk:
                    return
                yield chunk
        finally:
            conn.close()

    # The API, one method per route used by rayfront.
    def info(self, timeout: float | None = None) -> dict[str, Any]:
        return self.request("GET", "/v1/info", timeout=timeout)

    def submit(self, job: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/v1/jobs", job)

    def submit_batch(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Queue ``jobs`` in one request, all or none; the job objects in the same order."""
        return self.request("POST", "/v1/jobs/batch", {"jobs": jobs})["jobs"]

    def job(
        self, job_id: int, wait: float | None = None, since: int | None = None
    ) -> dict[str, Any]:
        """The job object; ``wait``: once final (with ``since``: once its version is newer)."""
        query = f"?wait={wait:g}" if wait else ""
        if wait and since is not None:
            query += f"&since={int(since)}"
        timeout = (wait + 30) if wait else None
        return self.request("GET", f"/v1/jobs/{job_id}{query}", timeout=timeout)

    def jobs(
        self, states: list[str] | None = None, limit: int = 50, before: int | None = None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if states:
            params["state"] = ",".join(states)
        if before is not None:
            params["before"] = before
        return self.request("GET", f"/v1/jobs?{urlencode(params)}")

    def share_probe(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/share-probe (see docs/api-contract.md, 'Share probe')."""
        # A read may wait up to 3 s on the server before it answers.
        return self.request("POST", "/v1/share-probe", body, timeout=max(self.timeout, 15.0))

    def cancel(self, job_id: int) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/jobs/{job_id}")

    def log(self, job_id: int, offset: int = 0) -> bytes:
        return self.text(f"/v1/jobs/{job_id}/log?offset={offset}")

    def follow_log(self, job_id: int, offset: int = 0) -> Iterator[bytes]:
        # No read timeout worth the name: a quiet render may print nothing for minutes.
        return self.stream(f"/v1/jobs/{job_id}/log?offset={offset}&follow=1", timeout=3600)


def _is_tls_error(exc: BaseException) -> bool:
    import sys

    ssl_mod = sys.modules.get("ssl")
    return ssl_mod is not None and isinstance(exc, ssl_mod.SSLError)


def _raise_for_status(
    conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, label: str
) -> None:
    """An answer of 400 or more as ClientError (closing the connection)."""
    if resp.status >= 400:
        try:
            raise _http_error(resp, label)
        finally:
            conn.close()


def _http_error(resp: http.client.HTTPResponse, label: str) -> ClientError:
    raw = resp.read(65536)
    message = ""
    try:
        data = json.loads(raw)
        if isinstance(data, dict) and data.get("error"):
            message = str(data["error"])
    except ValueError:
        message = raw.decode("utf-8", "replace").strip()[:300]
    if not message:
        message = resp.reason or "no reason given"
    return ClientError(
        f"rayserver on {label} refused: {message} (HTTP {resp.status})", status=resp.status
    )
