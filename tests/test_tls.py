"""TLS: the server's and the client's contexts, and requests over TLS.

Certificates are made by the test itself with trustme (a throw-away CA).
The in-process server (test_security.app_server: the worker's security
pieces on a real socket) checks the contexts and the allow-list-before-
handshake order; the whole job flow over TLS runs against the real
``rayserver -f`` process further down.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import exchange
from cryptography.hazmat.primitives import serialization
from test_security import TOKEN, app_server, connect_from, read_all

from rayserver.common.credentials import CredentialsError, client_ssl_context, server_ssl_context
from rayserver.common.settings import Settings

# One xdist worker runs this module: its module-scoped fixture is built once.
pytestmark = pytest.mark.xdist_group("tls")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pki(ca: trustme.CA, where: Path) -> dict[str, str]:
    """Server certificate for 127.0.0.1 and localhost, its key, and the CA file."""
    where.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {
        "tls_cert": where / "server.crt",
        "tls_key": where / "server.key",
        "tls_ca": where / "ca.pem",
    }
    cert.cert_chain_pems[0].write_to_path(str(paths["tls_cert"]))
    cert.private_key_pem.write_to_path(str(paths["tls_key"]))
    ca.cert_pem.write_to_path(str(paths["tls_ca"]))
    return {k: str(v) for k, v in paths.items()}


def https_get(
    port: int, path: str, ctx: ssl.SSLContext, token: str | None = TOKEN, host: str = "127.0.0.1"
) -> tuple[int, dict]:
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


# ------------------------------------------------------------------- contexts


def test_contexts_are_none_without_tls() -> None:
    assert server_ssl_context(Settings()) is None
    assert client_ssl_context(Settings()) is None


def test_server_context_names_the_bad_file(ca: trustme.CA, tmp_path: Path) -> None:
    pki = write_pki(ca, tmp_path)
    assert isinstance(
        server_ssl_context(Settings(tls_cert=pki["tls_cert"], tls_key=pki["tls_key"])),
        ssl.SSLContext,
    )

    missing = str(tmp_path / "nope.crt")
    with pytest.raises(CredentialsError, match=rf"{missing} \(tls_cert\) does not exist"):
        server_ssl_context(Settings(tls_cert=missing, tls_key=pki["tls_key"]))

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    with pytest.raises(CredentialsError, match=rf"{garbage} \(tls_cert\) holds no PEM"):
        server_ssl_context(Settings(tls_cert=str(garbage), tls_key=pki["tls_key"]))
    with pytest.raises(CredentialsError, match=rf"{garbage} \(tls_key\) holds no PEM"):
        server_ssl_context(Settings(tls_cert=pki["tls_cert"], tls_key=str(garbage)))

    other = write_pki(ca, tmp_path / "other")
    with pytest.raises(CredentialsError, match=r"does not belong to the certificate"):
        server_ssl_context(Settings(tls_cert=pki["tls_cert"], tls_key=other["tls_key"]))

    # A passphrase-protected key must fail fast, not prompt on the terminal.
    key = serialization.load_pem_private_key(Path(pki["tls_key"]).read_bytes(), None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(
        CredentialsError, match=r"locked.key \(tls_key\) is protected by a passphrase"
    ):
        server_ssl_context(Settings(tls_cert=pki["tls_cert"], tls_key=str(locked)))


def test_client_context(ca: trustme.CA, tmp_path: Path) -> None:
    pki = write_pki(ca, tmp_path)
    ctx = client_ssl_context(Settings(tls_ca=pki["tls_ca"]))
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    # No CA setting but the shared settings say TLS: the system's CAs.
    ctx = client_ssl_context(Settings(tls_cert=pki["tls_cert"], tls_key=pki["tls_key"]))
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(CredentialsError, match=r"missing.pem \(tls_ca\) does not exist"):
        client_ssl_context(Settings(tls_ca=str(tmp_path / "missing.pem")))
    bad = tmp_path / "bad-ca.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n")
    with pytest.raises(CredentialsError, match=r"bad-ca.pem \(tls_ca\) cannot be used"):
        client_ssl_context(Settings(tls_ca=str(bad)))


# ------------------------------------------------- TLS on the security layer


@pytest.mark.parametrize("tls_in", ["guard", "create_server"])
def test_requests_over_tls(ca: trustme.CA, tmp_path: Path, tls_in: str) -> None:
    """TLS done by the guard (after the address check) or by create_server(ssl=...)."""
    pki = write_pki(ca, tmp_path / "pki")
    settings = Settings(tls_cert=pki["tls_cert"], tls_key=pki["tls_key"], tls_ca=pki["tls_ca"])
    outer = server_ssl_context(settings) if tls_in == "create_server" else None
    with app_server(tmp_path, settings, ssl_ctx=outer) as srv:
        ctx = client_ssl_context(settings)
        assert ctx is not None
        assert https_get(srv.port, "/v1/info", ctx, token=None) == (200, {"hostname": "testhost"})
        assert https_get(srv.port, "/v1/jobs", ctx) == (200, {"jobs": []})
        assert https_get(srv.port, "/v1/jobs", ctx, token="wrong-token-abcdefghijk")[0] == 401
        assert https_get(srv.port, "/v1/jobs", ctx, host="localhost")[0] == 200

        # A client that does not trust our CA refuses the server.
        with pytest.raises(ssl.SSLCertVerificationError):
            https_get(srv.port, "/v1/info", ssl.create_default_context())
        # Plain HTTP to a TLS port gets no HTTP answer.
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.request("GET", "/v1/info")
            conn.getresponse()
        conn.close()


def test_wrong_host_name_is_refused_by_the_client(tmp_path: Path) -> None:
    other_ca = trustme.CA()
    pki = tmp_path / "pki"
    pki.mkdir()
    cert = other_ca.issue_cert("render-7.example")
    cert.cert_chain_pems[0].write_to_path(str(pki / "c.crt"))
    cert.private_key_pem.write_to_path(str(pki / "c.key"))
    other_ca.cert_pem.write_to_path(str(pki / "ca.pem"))
    settings = Settings(
        tls_cert=str(pki / "c.crt"), tls_key=str(pki / "c.key"), tls_ca=str(pki / "ca.pem")
    )
    with app_server(tmp_path, settings) as srv:
        ctx = client_ssl_context(settings)
        assert ctx is not None
        with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch|match"):
            https_get(srv.port, "/v1/info", ctx)


def test_refused_address_gets_no_tls_handshake(ca: trustme.CA, tmp_path: Path) -> None:
    pki = write_pki(ca, tmp_path / "pki")
    settings = Settings(
        tls_cert=pki["tls_cert"],
        tls_key=pki["tls_key"],
        tls_ca=pki["tls_ca"],
        allow=("127.0.0.1/32",),
    )
    with app_server(tmp_path, settings) as srv:
        ctx = client_ssl_context(settings)
        assert ctx is not None
        raw = connect_from("127.0.0.2", srv.port)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n")
                assert tls.recv(100) == b""
                raise ConnectionError("closed without an answer")
        raw.close()
        srv.wait_log("refused connection from 127.0.0.2")
        assert "TLS handshake" not in srv.log_text()


def test_stalled_tls_handshake_is_closed(ca: trustme.CA, tmp_path: Path) -> None:
    pki = write_pki(ca, tmp_path / "pki")
    settings = Settings(tls_cert=pki["tls_cert"], tls_key=pki["tls_key"], client_timeout=1.0)
    with app_server(tmp_path, settings) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        start = time.monotonic()
        s.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        assert read_all(s) == b""
        assert time.monotonic() - start < 4.0
        s.close()


def test_failed_handshakes_do_not_count_against_the_connection_limit(
    ca: trustme.CA, tmp_path: Path
) -> None:
    """A failed or abandoned handshake releases its place (asyncio may never report it lost)."""
    pki = write_pki(ca, tmp_path / "pki")
    settings = Settings(
        tls_cert=pki["tls_cert"],
        tls_key=pki["tls_key"],
        tls_ca=pki["tls_ca"],
        max_connections_per_client=2,
        max_connections=3,
    )
    with app_server(tmp_path, settings) as srv:
        for _ in range(6):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not a ClientHello
            assert read_all(s) == b""
            s.close()
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.sendall(b"\x16\x03\x01")  # a ClientHello begun, then the client leaves
            s.close()
        ctx = client_ssl_context(settings)
        assert ctx is not None
        deadline = time.monotonic() + 5
        while True:
            try:
                assert https_get(srv.port, "/v1/info", ctx, token=None)[0] == 200
                break
            except (ssl.SSLError, ConnectionError):
                # The server may not have noticed the last abandoned handshake yet.
                assert time.monotonic() < deadline, srv.log_text()
                time.sleep(0.05)


# ----------------------------------------------- the whole job flow over TLS

SCENE = """\
void light bright 0 0 3 100 100 100
bright sphere lamp 0 0 4 0 0 3 0.5
void plastic grey 0 0 5 .5 .5 .5 0 0
grey polygon floor 0 0 12 -5 -5 -1 5 -5 -1 5 5 -1 -5 5 -1
"""
VIEW = [
    "-vp",
    "0",
    "-6",
    "1",
    "-vd",
    "0",
    "1",
    "-0.2",
    "-vh",
    "50",
    "-vv",
    "40",
    "-x",
    "32",
    "-y",
    "32",
    "-ab",
    "0",
]


def https(
    port: int,
    ctx: ssl.SSLContext,
    method: str,
    path: str,
    body: object = None,
    token: str | None = None,
) -> tuple[int, dict | str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    return exchange(
        http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=60),
        method,
        path,
        data,
        headers,
    )


def test_job_flow_over_tls(
    ca: trustme.CA, rayhome: Any, server_factory: Any, tmp_path: Path
) -> None:
    pki = write_pki(ca, tmp_path / "pki")
    rayhome.write_settings(
        f'bind = "127.0.0.1"\nport = {rayhome.port}\n'
        f'tls_cert = "{pki["tls_cert"]}"\ntls_key = "{pki["tls_key"]}"\ntls_ca = "{pki["tls_ca"]}"\n'
    )
    project = rayhome.projects / "tlsdemo"
    project.mkdir()
    (project / "s.rad").write_text(SCENE)
    srv = server_factory("-f")
    ctx = client_ssl_context(
        Settings(tls_cert=pki["tls_cert"], tls_key=pki["tls_key"], tls_ca=pki["tls_ca"])
    )
    assert ctx is not None
    deadline = time.monotonic() + 20
    while True:
        try:
            status, info = https(rayhome.port, ctx, "GET", "/v1/info")
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert status == 200 and info["tls"] is True and info["auth"] is True
    token = rayhome.token()
    assert token

    status, job = https(
        rayhome.port,
        ctx,
        "POST",
        "/v1/jobs",
        {
            "location": "projects",
            "project": "tlsdemo",
            "name": "over tls",
            "steps": [
                {"program": "oconv", "args": ["s.rad"], "stdin": None, "stdout": "s.oct"},
                {"program": "rpict", "args": [*VIEW, "s.oct"], "stdin": None, "stdout": "s.hdr"},
            ],
        },
        token=token,
    )
    assert status == 201, job
    assert isinstance(job, dict)
    status, done = https(rayhome.port, ctx, "GET", f"/v1/jobs/{job['id']}?wait=60", token=token)
    assert status == 200 and isinstance(done, dict)
    assert done["state"] == "done", done
    assert (project / "s.hdr").read_bytes().startswith(b"#?RADIANCE")
    status, log_text = https(rayhome.port, ctx, "GET", f"/v1/jobs/{job['id']}/log", token=token)
    assert status == 200 and "rpict" in str(log_text)

    # Without the token, over TLS: still 401; without TLS: no HTTP at all.
    assert https(rayhome.port, ctx, "GET", "/v1/jobs")[0] == 401
    plain = http.client.HTTPConnection("127.0.0.1", rayhome.port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain.request("GET", "/v1/info")
        plain.getresponse()
    plain.close()
    assert srv.proc.poll() is None
