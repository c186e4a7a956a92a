"""Security of the server: allow-list, token, body limits, slow clients.

Two layers: a small aiohttp server in a thread of the test process, built
with the worker's own pieces (``security.middlewares`` and
``security.filtered_factory`` around ``web.Server``), serving on real
sockets on 127.0.0.x; and the real ``rayserver -f`` process (conftest
fixtures) for what only the whole server shows: refusing to start on a
world-readable token file, creating the token at first start, the warning
when tokens are off, and the allow-list on the real listening socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import ready

from rayserver.common import credentials
from rayserver.common.credentials import CredentialsError
from rayserver.common.paths import Layout
from rayserver.common.settings import Settings
from rayserver.server import security

TOKEN = "test-token-0123456789abcdefghij"


@dataclass
class Live:
    settings: Settings


@dataclass
class Ctx:
    """The attributes of the worker's context that security.py reads."""

    live: Live
    layout: Layout
    token: str | None = TOKEN


@dataclass
class AppServer:
    """An aiohttp app behind security.filtered_factory, served from a thread."""

    ctx: Ctx
    port: int
    host: str
    loop: asyncio.AbstractEventLoop
    records: list[logging.LogRecord] = field(default_factory=list)

    def log_text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)

    def wait_log(self, text: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in list(self.records):
                if text in r.getMessage():
                    return r.getMessage()
            time.sleep(0.02)
        raise AssertionError(f"no log line with {text!r}; log:\n{self.log_text()}")

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = TOKEN,
        source: str | None = None,
    ) -> tuple[int, Any, http.client.HTTPResponse]:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        conn = http.client.HTTPConnection(
            self.host, self.port, timeout=10, source_address=(source, 0) if source else None
        )
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        if resp.getheader("Content-Type", "").startswith("application/json"):
            return resp.status, json.loads(raw), resp
        return resp.status, raw.decode(), resp


class _Collect(logging.Handler):
    def __init__(self, sink: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record)


def build_app(ctx: Ctx) -> web.Application:
    """Routes shaped like the API's: open info, protected jobs, a slow one, a crash."""
    app = web.Application(middlewares=security.middlewares(ctx))

    async def info(_r: web.Request) -> web.Response:
        return web.json_response({"hostname": "testhost"})

    async def jobs(r: web.Request) -> web.Response:
        body = await r.json()
        return web.json_response({"got": body}, status=201)

    async def list_jobs(_r: web.Request) -> web.Response:
        return web.json_response({"jobs": []})

    async def wait(r: web.Request) -> web.Response:
        # A long poll: the server is silent, the client is waiting legitimately.
        await asyncio.sleep(float(r.query.get("s", "1")))
        return web.json_response({"waited": True})

    async def crash(_r: web.Request) -> web.Response:
        raise RuntimeError("secret detail 4711")

    async def big(r: web.Request) -> web.Response:
        return web.Response(body=b"x" * int(r.query["n"]))

    app.router.add_get("/v1/info", info)
    app.router.add_get("/v1/big", big)
    app.router.add_post("/v1/jobs", jobs)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/wait", wait)
    app.router.add_get("/v1/crash", crash)
    return app


@contextlib.contextmanager
def app_server(
    tmp_path: Path,
    settings: Settings,
    token: str | None = TOKEN,
    host: str = "127.0.0.1",
    ssl_ctx: Any = None,
) -> Iterator[AppServer]:
    """Serve build_app() on ``host`` (port 0) from a thread; stopped on exit."""
    ctx = Ctx(Live(settings), Layout(tmp_path / "home", "testhost"), token)
    # Refusals are logged once a minute per address; each test starts afresh.
    security._refusals = security._RefusalLog()
    records: list[logging.LogRecord] = []
    handler = _Collect(records)
    logger = logging.getLogger("rayserver.server.security")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        runner = web.AppRunner(build_app(ctx), handle_signals=False, access_log=None)
        await runner.setup()
        assert runner.server is not None
        factory = security.filtered_factory(runner.server, ctx)
        srv = await loop.create_server(factory, host, 0, ssl=ssl_ctx)
        state["port"] = srv.sockets[0].getsockname()[1]
        state["stop"] = asyncio.Event()
        started.set()
        await state["stop"].wait()
        srv.close()
        await runner.cleanup()

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # reported to the test below
            state["error"] = exc
            started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(10)
    try:
        if "error" in state:
            raise state["error"]
        yield AppServer(ctx, state["port"], host, loop, records)
    finally:
        if "stop" in state:
            loop.call_soon_threadsafe(state["stop"].set)
        thread.join(10)
        loop.close()
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def connect_from(source: str, port: int, timeout: float = 5.0) -> socket.socket:
    """Connect to 127.0.0.1:port from ``source``.

    The servers listen on 127.0.0.1 only; Linux accepts a connection to it
    from any 127/8 source address, so 127.0.0.2 plays a host outside the
    allow-list without exposing anything beyond loopback.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes; a reset counts as closed."""
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


# ------------------------------------------------------------------ allow-list


def test_is_allowed_networks_and_mapped_ipv6() -> None:
    allow = ("127.0.0.1/32", "10.0.0.0/8", "fd00::/8")
    assert security.is_allowed("127.0.0.1", allow)
    assert not security.is_allowed("127.0.0.2", allow)
    assert security.is_allowed("10.200.3.4", allow)
    assert security.is_allowed("::ffff:127.0.0.1", allow)
    assert security.is_allowed("::ffff:10.1.1.1", allow)
    assert not security.is_allowed("::ffff:192.168.1.1", allow)
    assert security.is_allowed("fd12::1", allow)
    assert not security.is_allowed("fe80::1%eth0", allow)
    assert security.is_allowed("fe80::1%eth0", ("fe80::/10",))
    assert not security.is_allowed("not-an-address", allow)
    assert not security.is_allowed("8.8.8.8", Settings().allow)
    assert security.is_allowed("192.168.7.9", Settings().allow)


def test_refused_address_gets_no_http_answer_and_is_logged(tmp_path: Path) -> None:
    settings = Settings(allow=("127.0.0.1/32",), client_timeout=5)
    with app_server(tmp_path, settings) as srv:
        # Allowed source: a normal answer.
        ok = connect_from("127.0.0.1", srv.port)
        ok.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_all(ok).startswith(b"HTTP/1.1 200")
        ok.close()
        # 127.0.0.2 is outside the allow-list: closed before any answer.
        bad = connect_from("127.0.0.2", srv.port)
        with contextlib.suppress(OSError):
            bad.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_all(bad) == b""
        bad.close()
        line = srv.wait_log("refused connection from 127.0.0.2")
        assert "not in allow" in line
        assert "127.0.0.1 port" not in srv.log_text()


def test_refusals_are_logged_once_per_address_per_interval(tmp_path: Path) -> None:
    with app_server(tmp_path, Settings(allow=("127.0.0.1/32",))) as srv:
        for _ in range(5):
            s = connect_from("127.0.0.2", srv.port)
            assert read_all(s) == b""
            s.close()
        s = connect_from("127.0.0.3", srv.port)
        assert read_all(s) == b""
        s.close()
        srv.wait_log("refused connection from 127.0.0.3")
        assert srv.log_text().count("refused connection from 127.0.0.2") == 1


def test_refusals_left_out_are_counted_in_the_next_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Token refusals share the once-per-interval rule; the next line says how many were left out."""
    monkeypatch.setattr(security, "_REFUSAL_LOG_INTERVAL", 1.0)
    with app_server(tmp_path, Settings()) as srv:
        for i in range(20):
            assert srv.request("GET", "/v1/jobs", token=None if i % 2 else "w" * 20)[0] == 401
        time.sleep(1.1)
        assert srv.request("GET", "/v1/jobs", token=None)[0] == 401
        line = srv.wait_log("19 more refused since the last warning")
        assert line.startswith("refused GET /v1/jobs from 127.0.0.1: no token"), line
        assert srv.log_text().count("refused GET /v1/jobs") == 2


def test_allow_list_change_applies_to_next_connection(tmp_path: Path) -> None:
    with app_server(tmp_path, Settings()) as srv:
        assert srv.request("GET", "/v1/info")[0] == 200
        srv.ctx.live.settings = replace(srv.ctx.live.settings, allow=("10.0.0.0/8",))
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            srv.request("GET", "/v1/info")
        srv.wait_log("refused connection from 127.0.0.1")


# ----------------------------------------------------------------------- token


def test_token_missing_or_wrong_gives_401_and_is_logged(tmp_path: Path) -> None:
    with app_server(tmp_path, Settings()) as srv:
        status, body, resp = srv.request("GET", "/v1/jobs", token=None)
        assert status == 401 and body["status"] == 401 and "token" in body["error"]
        assert resp.getheader("WWW-Authenticate", "").startswith("Bearer")
        srv.wait_log("refused GET /v1/jobs from 127.0.0.1: no token")

        # From another address: refusals are logged once a minute per address.
        status, body, _ = srv.request(
            "POST",
            "/v1/jobs",
            b"{}",
            token="x" * 43,
            headers={"Content-Type": "application/json"},
            source="127.0.0.2",
        )
        assert status == 401 and "wrong token" in body["error"]
        srv.wait_log("refused POST /v1/jobs from 127.0.0.2: wrong token")
        assert "x" * 43 not in srv.log_text()  # a guessed token never lands in the log

        status, body, _ = srv.request(
            "GET", "/v1/jobs", headers={"Authorization": f"Basic {TOKEN}"}, token=None
        )
        assert status == 401

        status, body, _ = srv.request("GET", "/v1/jobs")
        assert status == 200 and body == {"jobs": []}


def test_open_paths_need_no_token(tmp_path: Path) -> None:
    with app_server(tmp_path, Settings()) as srv:
        assert srv.request("GET", "/v1/info", token=None)[0] == 200
        # Unknown paths are not open: no way to probe the routes without a token.
        assert srv.request("GET", "/v1/nothing", token=None)[0] == 401
        assert srv.request("GET", "/static/../v1/jobs", token=None)[0] == 401
        assert srv.request("POST", "/v1/info", b"{}", token=None)[0] == 401


def test_tokens_off_lets_everyone_allowed_in(tmp_path: Path) -> None:
    with app_server(tmp_path, Settings(), token=None) as srv:
        assert srv.request("GET", "/v1/jobs", token=None)[0] == 200


def test_rotated_token_is_in_force_without_restart(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "home", "testhost")
    first = credentials.ensure_token(layout, Settings())
    with app_server(tmp_path, Settings(), token=first) as srv:
        assert srv.request("GET", "/v1/jobs", token=first)[0] == 200
        second = credentials.new_token(layout.default_token_file)
        assert srv.request("GET", "/v1/jobs", token=first)[0] == 401
        assert srv.request("GET", "/v1/jobs", token=second)[0] == 200
        assert srv.ctx.token == second
        srv.wait_log("changed: the new token is in force")
        # Made world-readable: fail closed until it is fixed.
        layout.default_token_file.chmod(0o644)
        status, body, _ = srv.request("GET", "/v1/jobs", token=second)
        assert status == 503 and "token file" in body["error"]
        srv.wait_log("chmod 640")
        assert srv.request("GET", "/v1/info", token=None)[0] == 200
        layout.default_token_file.chmod(0o640)
        assert srv.request("GET", "/v1/jobs", token=second)[0] == 200


# ------------------------------------------------------------ errors as JSON


def test_aiohttp_errors_are_json_in_the_api_shape(tmp_path: Path) -> None:
    with app_server(tmp_path, Settings(max_body_bytes=1000)) as srv:
        status, body, _ = srv.request("GET", "/v1/nothing")
        assert status == 404 and body == {"error": "not found: GET /v1/nothing", "status": 404}

        status, body, resp = srv.request("DELETE", "/v1/info")
        assert status == 405 and body["status"] == 405 and "DELETE" in body["error"]
        assert "GET" in resp.getheader("Allow", "")

        status, body, _ = srv.request("GET", "/v1/crash")
        assert status == 500 and body["status"] == 500
        assert "4711" not in json.dumps(body)  # the traceback stays in the log
        line = srv.wait_log("internal error on GET /v1/crash")
        assert any(r.exc_info and "4711" in str(r.exc_info[1]) for r in srv.records), line


def test_oversize_body_gives_json_413(tmp_path: Path) -> None:
    with app_server(tmp_path, Settings(max_body_bytes=1000)) as srv:
        ok = json.dumps({"a": "x" * 900}).encode()
        status, body, _ = srv.request(
            "POST", "/v1/jobs", ok, headers={"Content-Type": "application/json"}
        )
        assert status == 201 and body["got"]["a"] == "x" * 900

        big = json.dumps({"a": "x" * 5000}).encode()
        status, body, _ = srv.request(
            "POST", "/v1/jobs", big, headers={"Content-Type": "application/json"}
        )
        assert status == 413 and body["status"] == 413 and "1000 bytes" in body["error"]

        # Chunked, so no Content-Length to check up front: the limit holds while reading.
        s = connect_from("127.0.0.1", srv.port)
        chunk = b"x" * 600
        s.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            for _ in range(4):
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            s.sendall(b"0\r\n\r\n")
        answer = read_all(s)
        s.close()
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b'"status": 413' in answer


# ---------------------------------------------------------------- slow clients


def test_slowloris_client_is_closed_after_client_timeout(tmp_path: Path) -> None:
    with app_server(tmp_path, Settings(client_timeout=1.0)) as srv:
        s = connect_from("127.0.0.1", srv.port, timeout=10)
        start = time.monotonic()
        closed_after = None
        # One header byte every 0.2 s: never idle, never complete.
        with contextlib.suppress(OSError):
            s.sendall(b"GET /v1/info HTTP/1.1\r\n")
            for _ in range(50):
                s.sendall(b"X")
                time.sleep(0.2)
        closed_after = time.monotonic() - start
        assert read_all(s) == b""
        s.close()
        assert closed_after < 3.0, closed_after
        srv.wait_log("request not received completely within 1 s")


def test_slow_body_and_idle_connection_are_closed(tmp_path: Path) -> None:
    with app_server(tmp_path, Settings(client_timeout=1.0)) as srv:
        # Headers complete, body trickling in: the time for the body counts too.
        s = connect_from("127.0.0.1", srv.port, timeout=10)
        s.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        start = time.monotonic()
        with contextlib.suppress(OSError):
            for _ in range(50):
                s.sendall(b" ")
                time.sleep(0.2)
        assert time.monotonic() - start < 3.0
        s.close()
        # A connection that never sends anything is dropped too.
        idle = connect_from("127.0.0.1", srv.port, timeout=10)
        start = time.monotonic()
        assert read_all(idle) == b""
        assert 0.9 < time.monotonic() - start < 3.0
        idle.close()


def test_long_poll_is_not_a_slow_client(tmp_path: Path) -> None:
    with app_server(tmp_path, Settings(client_timeout=0.5)) as srv:
        # The handler takes 4 timeouts to answer: the server is busy, not the client.
        status, body, _ = srv.request("GET", "/v1/wait?s=2")
        assert status == 200 and body == {"waited": True}


def test_client_that_stops_reading_is_closed(tmp_path: Path) -> None:
    size = 64 * 1024 * 1024  # far more than the socket buffers hold
    with app_server(tmp_path, Settings(client_timeout=1.0)) as srv:
        s = connect_from("127.0.0.1", srv.port, timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(
            f"GET /v1/big?n={size} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        srv.wait_log("client stopped reading its answer for 1 s")
        got = len(read_all(s))
        s.close()
        assert got < size


# ------------------------------------------------------------- token file unit


def test_token_file_created_0640_and_checked(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "home", "testhost")
    old = os.umask(0o077)  # a strict umask must not make it unreadable for the group
    try:
        tok = credentials.ensure_token(layout, Settings())
    finally:
        os.umask(old)
    path = layout.default_token_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert tok and len(tok) >= 40 and path.read_text().strip() == tok
    assert credentials.ensure_token(layout, Settings()) == tok  # never replaced
    assert credentials.read_server_token(layout, Settings()) == tok
    assert [p.name for p in path.parent.iterdir()] == ["token"]  # no temp files left

    path.chmod(0o644)
    with pytest.raises(CredentialsError, match=r"token .*0644.*chmod 640"):
        credentials.ensure_token(layout, Settings())
    path.chmod(0o642)
    with pytest.raises(CredentialsError, match=str(path)):
        credentials.read_server_token(layout, Settings())
    path.chmod(0o640)
    path.write_text("\n")
    with pytest.raises(CredentialsError, match="empty"):
        credentials.ensure_token(layout, Settings())
    path.write_text("short\n")
    with pytest.raises(CredentialsError, match="at least"):
        credentials.ensure_token(layout, Settings())


def test_configured_token_file_is_never_created(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "home", "testhost")
    missing = tmp_path / "typo" / "tokn"
    with pytest.raises(CredentialsError, match="does not exist"):
        credentials.ensure_token(layout, Settings(token_file=str(missing)))
    assert not missing.exists()


def test_tokens_off_warns_every_time(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    layout = Layout(tmp_path / "home", "testhost")
    with caplog.at_level(logging.WARNING, logger="rayserver.server.security"):
        assert credentials.ensure_token(layout, Settings(token_file="")) is None
        assert credentials.ensure_token(layout, Settings(token_file="")) is None
    assert sum("tokens are switched off" in r.getMessage() for r in caplog.records) == 2
    assert not layout.default_token_file.exists()


def test_rotation_and_client_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = Layout(tmp_path / "home", "testhost")
    monkeypatch.delenv(credentials.TOKEN_ENV, raising=False)
    assert credentials.read_client_token(layout, Settings()) is None
    first = credentials.ensure_token(layout, Settings())
    assert credentials.read_client_token(layout, Settings()) == first
    second = credentials.new_token(layout.default_token_file)
    assert second != first
    assert stat.S_IMODE(layout.default_token_file.stat().st_mode) == 0o640
    assert credentials.read_server_token(layout, Settings()) == second
    assert credentials.read_client_token(layout, Settings()) == second
    monkeypatch.setenv(credentials.TOKEN_ENV, "from-the-environment")
    assert credentials.read_client_token(layout, Settings()) == "from-the-environment"
    monkeypatch.delenv(credentials.TOKEN_ENV)
    assert credentials.read_client_token(layout, Settings(token_file="")) is None
    assert credentials.tokens_equal(second, second)
    assert not credentials.tokens_equal(second, first)
    assert not credentials.tokens_equal(second, second[:-1])


def test_concurrent_first_starts_agree_on_one_token(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "home", "testhost")
    results: list[str | None] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(credentials.ensure_token(layout, Settings()))
        )
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and results[0]


# ------------------------------------------------------- the real rayserver


def settings_text(home: Any, extra: str) -> str:
    return f'bind = "127.0.0.1"\nport = {home.port}\n{extra}'


def server_log(srv: Any) -> str:
    """What the server wrote: its terminal output and its log file."""
    text = srv.output
    with contextlib.suppress(OSError):
        text += "\n" + srv.home.log_file.read_text()
    return text


def wait_server_log(srv: Any, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server_log(srv).splitlines():
            if text in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in the server's log:\n{server_log(srv)}")


def test_server_makes_token_0640_and_demands_it(server: Any) -> None:
    token_file = server.home.path / "config" / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o640
    token = server.home.token()
    assert token and len(token) >= 40

    status, body = server.request("GET", "/v1/jobs", token=False)
    assert status == 401 and body["status"] == 401 and "token" in body["error"]
    wait_server_log(server, "refused GET /v1/jobs from 127.0.0.1: no token")
    status, body = server.request("GET", "/v1/jobs", token="y" * 43)
    assert status == 401 and "wrong token" in body["error"]
    # Within the minute after the first refusal from this address: counted, not logged.
    assert server.home.log_file.read_text().count("refused GET /v1/jobs from 127.0.0.1") == 1
    assert "y" * 43 not in server_log(server)
    assert server.request("GET", "/v1/jobs")[0] == 200
    assert server.request("GET", "/v1/info", token=False)[0] == 200

    # Rotation (what `rayfront token new` does) is in force at the next request.
    rotated = credentials.new_token(token_file)
    assert server.request("GET", "/v1/jobs", token=token)[0] == 401
    assert server.request("GET", "/v1/jobs", token=rotated)[0] == 200


def test_server_refuses_to_start_with_world_readable_token(
    rayhome: Any, server_factory: Any
) -> None:
    token_file = rayhome.path / "config" / "token"
    token_file.write_text("a-perfectly-good-token-but-readable-by-all\n")
    token_file.chmod(0o644)
    srv = server_factory("-f", wait=None)
    code = srv.proc.wait(20)
    if srv._reader is not None:
        srv._reader.join(2)
    assert code != 0
    out = server_log(srv)
    assert str(token_file) in out and "0644" in out and "chmod 640" in out, out


def test_server_with_tokens_off_warns_at_start(rayhome: Any, server_factory: Any) -> None:
    rayhome.write_settings(settings_text(rayhome, 'token_file = ""\n'))
    srv = server_factory("-f")
    ready(srv)
    wait_server_log(srv, "tokens are switched off")
    assert not (rayhome.path / "config" / "token").exists()
    assert srv.request("GET", "/v1/jobs", token=False)[0] == 200


def test_server_refuses_addresses_outside_allow(rayhome: Any, server_factory: Any) -> None:
    # The server listens on 127.0.0.1; 127.0.0.2 as source plays an outside host.
    rayhome.write_settings(settings_text(rayhome, 'allow = ["127.0.0.1/32"]\n'))
    srv = server_factory("-f")
    ready(srv)
    bad = connect_from("127.0.0.2", rayhome.port)
    with contextlib.suppress(OSError):
        bad.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_all(bad) == b""
    bad.close()
    wait_server_log(srv, "refused connection from 127.0.0.2")

    # Now exclude loopback altogether: even 127.0.0.1 gets no HTTP answer.
    rayhome.write_settings(settings_text(rayhome, 'allow = ["10.0.0.0/8"]\n'))
    os.killpg(srv.proc.pid, signal.SIGTERM)  # the fixture's own server, by its group
    srv.proc.wait(20)
    srv2 = server_factory("-f")
    s = connect_from("127.0.0.1", rayhome.port)
    with contextlib.suppress(OSError):
        s.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_all(s) == b""
    s.close()
    wait_server_log(srv2, "refused connection from 127.0.0.1")


def test_server_limits_body_and_slow_clients(rayhome: Any, server_factory: Any) -> None:
    rayhome.write_settings(settings_text(rayhome, "max_body_bytes = 2000\nclient_timeout = 1\n"))
    srv = server_factory("-f")
    ready(srv)
    status, body = srv.request("POST", "/v1/jobs", {"location": "projects", "project": "x" * 5000})
    assert status == 413 and body["status"] == 413 and "2000 bytes" in body["error"]
    status, body = srv.request("GET", "/v1/no-such-thing")
    assert status == 404 and body["status"] == 404

    s = connect_from("127.0.0.1", rayhome.port, timeout=10)
    start = time.monotonic()
    with contextlib.suppress(OSError):
        s.sendall(b"GET /v1/info HTTP/1.1\r\n")
        for _ in range(50):
            s.sendall(b"X")
            time.sleep(0.2)
    assert read_all(s) == b""
    s.close()
    assert time.monotonic() - start < 3.5
    wait_server_log(srv, "slow client")
