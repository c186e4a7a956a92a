"""Credentials shared by server and client: the token file and TLS contexts.

Standard library only: the client (``rayfront``) imports this module and must
start fast and never pull in aiohttp.

The token file holds one random line. The server refuses a file that the
world may read or write (anyone on the machine could then submit jobs), and
creates ``<home>/config/token`` with mode 0640 at its first start, so the
members of the server's group (the users of a shared installation directory)
can read it and nobody else can.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

# ssl, secrets and hmac are imported where used: they load OpenSSL's libraries
# (~5 MiB), which the supervisor, importing this module, never needs.
if TYPE_CHECKING:
    import ssl

    from rayserver.common.paths import Layout
    from rayserver.common.settings import Settings

log = logging.getLogger("rayserver.server.security")

TOKEN_ENV = "RAYFRONT_TOKEN"
TOKEN_MODE = 0o640
# Letters, digits and the punctuation that is safe in an HTTP header value.
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")
_MIN_TOKEN_LENGTH = 16


class CredentialsError(Exception):
    """A token file or TLS file that cannot be used; the message says what to do."""


# --------------------------------------------------------------------- tokens


def _token_path(layout: Layout, settings: Settings) -> Path | None:
    return settings.token_path(layout.default_token_file)


def _check_token_text(path: Path, text: str) -> str:
    token = text.strip()
    if not token:
        raise CredentialsError(
            f"token file {path} is empty; write a token into it with `rayfront token new` "
            f"(or delete it and restart the server, which creates a new one)"
        )
    bad = sorted(set(token) - _TOKEN_CHARS)
    if bad:
        raise CredentialsError(
            f"token file {path} holds characters not allowed in a token ({''.join(bad)!r}); "
            f"expected one line of letters, digits and -._~+/= (`rayfront token new` writes one)"
        )
    if len(token) < _MIN_TOKEN_LENGTH:
        raise CredentialsError(
            f"token in {path} is {len(token)} characters long; at least {_MIN_TOKEN_LENGTH} "
            f"are needed to resist guessing (`rayfront token new` writes a good one)"
        )
    return token


def _read_checked(path: Path) -> str:
    """Read a token file after checking that the world can neither read nor write it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
    except FileNotFoundError as exc:
        raise CredentialsError(
            f"token file {path} does not exist; create it with `rayfront token new` "
            f'or set token_file = "" in rayserver.toml to switch tokens off'
        ) from exc
    except OSError as exc:
        raise CredentialsError(f"cannot read token file {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as f:
        # fstat on the open file, so the mode checked is the mode of what is read.
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CredentialsError(f"token file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            raise CredentialsError(
                f"token file {path} has mode {mode:04o}: readable or writable by every user "
                f"of this machine, who could then submit jobs. Run `chmod 640 {path}` "
                f"(owner and group only) and start again"
            )
        raw = f.read(4096)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise CredentialsError(
            f"token file {path} is not plain ASCII text; `rayfront token new` writes a good one"
        ) from exc
    return _check_token_text(path, text)


def _write_new(path: Path, token: str) -> Path:
    """Write ``token`` to a fresh temporary file next to ``path`` with mode 0640."""
    import secrets

    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        # fchmod, not the open mode: the umask must not decide who can read it.
        os.fchmod(fd, TOKEN_MODE)
        os.write(fd, (token + "\n").encode("ascii"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    return tmp


def _create_token_file(path: Path) -> bool:
    """Create ``path`` with a new token unless it exists; True if this call created it.

    The token is written to a temporary file and then hard-linked into place:
    the link fails if the file exists (exclusive like O_EXCL), and a reader never
    sees a half-written file, even when two servers start at the same moment.
    """
    if path.exists():
        # Nothing to create; a server switched away from root may not write the folder.
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    import secrets

    tmp = _write_new(path, secrets.token_urlsafe(32))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        # A file system without hard links: fall back to an exclusive create.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), TOKEN_MODE)
            f.write(tmp.read_bytes())
        return True
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def ensure_token(layout: Layout, settings: Settings) -> str | None:
    """The server's token at start: create the default file if missing, check it, read it.

    Returns None when tokens are switched off (``token_file = ""``), with a
    warning in the log, every time. A configured (non-default) token file is
    never created: a typo in its path must not silently make a new token.
    """
    path = _token_path(layout, settings)
    if path is None:
        log.warning(
            'tokens are switched off (token_file = "" in %s): every client allowed by '
            "the allow-list may submit jobs",
            layout.settings_file,
        )
        return None
    if settings.token_file is None:
        try:
            created = _create_token_file(path)
        except OSError as exc:
            raise CredentialsError(
                f"cannot create token file {path}: {exc.strerror or exc}"
            ) from exc
        if created:
            log.info("created token file %s (mode 0640: owner and group may read it)", path)
    return _read_checked(path)


def read_server_token(layout: Layout, settings: Settings) -> str | None:
    """The server's token on reload: the same checks as :func:`ensure_token`, never creates."""
    path = _token_path(layout, settings)
    if path is None:
        return None
    return _read_checked(path)


def read_client_token(layout: Layout, settings: Settings) -> str | None:
    """The token a client sends: $RAYFRONT_TOKEN, else the token file if readable, else None."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    path = _token_path(layout, settings)
    if path is None:
        return None
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def new_token(path: Path) -> str:
    """Rotate: write a new random token to ``path`` atomically and return it.

    The new file has mode 0640 and, where the caller may, keeps the group of
    the file it replaces, so the same users can read it after rotation.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import secrets

    token = secrets.token_urlsafe(32)
    try:
        old_gid = path.stat().st_gid
    except OSError:
        old_gid = None
    try:
        tmp = _write_new(path, token)
    except OSError as exc:
        raise CredentialsError(f"cannot write token file {path}: {exc.strerror or exc}") from exc
    try:
        if old_gid is not None and old_gid != tmp.stat().st_gid:
            try:
                os.chown(tmp, -1, old_gid)
            except PermissionError:
                log.warning(
                    "new token file %s could not keep group id %d (not a member); "
                    "run `chgrp` on it so the server's group can read it",
                    path,
                    old_gid,
                )
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CredentialsError(f"cannot replace token file {path}: {exc.strerror or exc}") from exc
    return token


def tokens_equal(a: str, b: str) -> bool:
    """Compare two tokens in constant time (no timing hint about a wrong token's prefix)."""
    import hmac

    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


# ------------------------------------------------------------------------ TLS


def _check_readable(kind: str, setting: str, path: Path) -> None:
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a file"
        raise CredentialsError(f"{kind} file {path} ({setting}) {what}")
    if not os.access(path, os.R_OK):
        raise CredentialsError(f"{kind} file {path} ({setting}) is not readable by this user")


def _pem_has(path: Path, marker: str) -> bool:
    try:
        return marker.encode() in path.read_bytes()
    except OSError:
        return False


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context from tls_cert and tls_key, or None when TLS is off."""
    if not (settings.tls_cert or settings.tls_key):
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise CredentialsError("tls_cert and tls_key must be given together")
    cert = Path(settings.tls_cert).expanduser()
    key = Path(settings.tls_key).expanduser()
    _check_readable("certificate", "tls_cert", cert)
    _check_readable("private key", "tls_key", key)
    if not _pem_has(cert, "-----BEGIN CERTIFICATE-----"):
        raise CredentialsError(
            f"certificate file {cert} (tls_cert) holds no PEM certificate "
            f"(expected a '-----BEGIN CERTIFICATE-----' block)"
        )
    if not _pem_has(key, "PRIVATE KEY-----"):
        raise CredentialsError(
            f"private key file {key} (tls_key) holds no PEM private key "
            f"(expected a '-----BEGIN PRIVATE KEY-----' block)"
        )
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    encrypted = False

    def no_password() -> bytes:
        # Without this callback OpenSSL would prompt on the terminal and hang a daemon.
        nonlocal encrypted
        encrypted = True
        return b""

    try:
        ctx.load_cert_chain(str(cert), str(key), password=no_password)
    except ssl.SSLError as exc:
        if encrypted:
            raise CredentialsError(
                f"private key file {key} (tls_key) is protected by a passphrase; the server "
                f"starts unattended, so store the key without one (openssl pkey -in KEY -out NEW)"
            ) from exc
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise CredentialsError(
                f"private key {key} (tls_key) does not belong to the certificate {cert} (tls_cert)"
            ) from exc
        raise CredentialsError(
            f"cannot load certificate {cert} (tls_cert) with key {key} (tls_key): {exc.reason or exc}"
        ) from exc
    return ctx


def client_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The client's TLS context that verifies the server, or None for plain HTTP.

    With tls_ca set, the server must present a certificate issued by that CA;
    otherwise, when the (shared) settings say the server uses TLS, the
    system's trusted CAs are used. Host names are always checked.
    """
    import ssl

    if settings.tls_ca:
        ca = Path(settings.tls_ca).expanduser()
        _check_readable("CA certificate", "tls_ca", ca)
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        except ssl.SSLError as exc:
            raise CredentialsError(
                f"CA certificate file {ca} (tls_ca) cannot be used: {exc.reason or exc}"
            ) from exc
    elif settings.tls_cert and settings.tls_key:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        return None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
