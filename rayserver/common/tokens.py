"""Named tokens: who submitted what (``<home>/config/tokens``).

One line per user, written by ``rayfront token new --user NAME``::

    # user role created sha256-of-token
    alice user 2026-12-01T22:30:00Z 5f1e...c0

Only the sha256 of each token is stored. A slow, salted hash (scrypt,
pbkdf2) protects passwords that people choose, which are short enough to
guess; these tokens are 32 random bytes (256 bits), so a preimage search
is as hopeless against a plain sha256 as against scrypt, and checking a
request costs microseconds instead of the tens of milliseconds a slow
hash would add to every request. Anyone who can read the file still learns
nobody's token.

The file has mode 0640 like the shared token file; the server refuses one
the world may read or write. The shared token of ``<home>/config/token``
stays what it was and is the user :data:`SHARED_USER` with role admin;
that name cannot be given to a named token. Standard library only: the
client imports this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# hashlib, hmac and secrets are imported where used: they load OpenSSL's
# libcrypto (~4 MiB), and the fork server imports this module (for SHARED_USER).
TOKENS_MODE = 0o640
SHARED_USER = "admin"
ROLES = ("user", "admin")
_USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}\Z")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_HEADER = (
    "# rayserver named tokens: user role created sha256-of-token\n"
    "# written by `rayfront token new --user NAME`; the tokens themselves are not stored\n"
)


class TokensFileError(Exception):
    """The tokens file or a requested change cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class NamedToken:
    """One user's token as stored: its sha256, never the token."""

    user: str
    role: str
    created: str  # UTC, e.g. 2026-12-01T22:30:00Z
    digest: str

    def line(self) -> str:
        return f"{self.user} {self.role} {self.created} {self.digest}"


def digest(token: str) -> str:
    """The stored form of ``token``: its sha256 in hex."""
    import hashlib

    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_user(name: str) -> str:
    """``name`` if it can be a token's user; else TokensFileError saying what is expected."""
    if name == SHARED_USER:
        raise TokensFileError(
            f"the user name {SHARED_USER!r} belongs to the shared token (<home>/config/token, "
            "rotated with `rayfront token new`); pick another name, with --role admin "
            "for another administrator"
        )
    if not _USER_RE.match(name):
        raise TokensFileError(
            f"user name {name!r} is not usable; expected 1-64 letters, digits and ._@- "
            "starting with a letter or digit"
        )
    return name


def _parse_line(path: Path, number: int, line: str) -> NamedToken:
    words = line.split()
    if len(words) != 4:
        raise TokensFileError(
            f"{path} line {number}: expected 'user role created sha256' (4 words), "
            f"got {len(words)} words"
        )
    user, role, created, hexdigest = words
    where = f"{path} line {number}"
    try:
        check_user(user)
    except TokensFileError as exc:
        raise TokensFileError(f"{where}: {exc}") from None
    if role not in ROLES:
        raise TokensFileError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    try:
        time.strptime(created, _TIME_FORMAT)
    except ValueError:
        raise TokensFileError(
            f"{where}: created time {created!r} is not like 2026-12-01T22:30:00Z"
        ) from None
    if not _DIGEST_RE.match(hexdigest):
        raise TokensFileError(f"{where}: expected a sha256 of 64 lowercase hex digits")
    return NamedToken(user, role, created, hexdigest)


def parse(text: str, path: Path) -> dict[str, NamedToken]:
    """The entries of a tokens file's text, by user; TokensFileError names the bad line."""
    entries: dict[str, NamedToken] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        entry = _parse_line(path, number, line)
        if entry.user in entries:
            raise TokensFileError(f"{path} line {number}: user {entry.user!r} appears twice")
        entries[entry.user] = entry
    return entries


def load(path: Path) -> dict[str, NamedToken]:
    """The tokens file's entries; {} when it does not exist. Refuses a world-accessible file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise TokensFileError(f"cannot read tokens file {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            raise TokensFileError(f"tokens file {path} is not a regular file")
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            raise TokensFileError(
                f"tokens file {path} has mode {mode:04o}: every user of this machine could "
                f"read or change it; run `chmod 640 {path}`"
            )
        raw = f.read(1 << 20)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise TokensFileError(f"tokens file {path} is not plain ASCII text") from None
    return parse(text, path)


def find(entries: dict[str, NamedToken], token: str) -> NamedToken | None:
    """The entry whose token is ``token``; every entry is compared, in constant time each."""
    import hmac

    wanted = digest(token)
    found = None
    for entry in entries.values():
        if hmac.compare_digest(entry.digest, wanted):
            found = entry
    return found


def _write(path: Path, entries: dict[str, NamedToken]) -> None:
    """Replace ``path`` atomically with ``entries`` (mode 0640, the old file's group kept)."""
    text = _HEADER + "".join(e.line() + "\n" for e in sorted(entries.values(), key=_by_user))
    try:
        old_gid: int | None = path.stat().st_gid
    except OSError:
        old_gid = None
    import secrets

    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, TOKENS_MODE)  # not the open mode: the umask must not decide
        if old_gid is not None:
            with contextlib.suppress(PermissionError):
                os.fchown(fd, -1, old_gid)
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _by_user(entry: NamedToken) -> str:
    return entry.user


def update(path: Path, change: Callable[[dict[str, NamedToken]], None]) -> None:
    """Read, ``change`` in place and write the tokens file, under a lock file beside it.

    The lock keeps two `rayfront token` commands run at once from losing
    each other's change.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o640)
    except OSError as exc:
        raise TokensFileError(f"cannot lock tokens file {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        entries = load(path)
        change(entries)
        try:
            _write(path, entries)
        except OSError as exc:
            raise TokensFileError(
                f"cannot write tokens file {path}: {exc.strerror or exc}"
            ) from exc
    finally:
        os.close(lock_fd)


def add(path: Path, user: str, role: str = "user") -> str:
    """Give ``user`` a new random token (replacing any it had) and return the token."""
    check_user(user)
    if role not in ROLES:
        raise TokensFileError(f"role {role!r} is not one of {', '.join(ROLES)}")
    import secrets

    token = secrets.token_urlsafe(32)
    created = time.strftime(_TIME_FORMAT, time.gmtime())

    def change(entries: dict[str, NamedToken]) -> None:
        entries[user] = NamedToken(user, role, created, digest(token))

    update(path, change)
    return token


def revoke(path: Path, user: str) -> NamedToken:
    """Remove ``user``'s token and return what was removed."""
    if user == SHARED_USER:
        raise TokensFileError(
            f"{SHARED_USER!r} is the shared token; it cannot be revoked, only rotated "
            'with `rayfront token new` (or switched off with token_file = "")'
        )
    removed: list[NamedToken] = []

    def change(entries: dict[str, NamedToken]) -> None:
        if user not in entries:
            known = ", ".join(sorted(entries)) or "none"
            raise TokensFileError(f"no token of user {user!r} in {path} (users: {known})")
        removed.append(entries.pop(user))

    update(path, change)
    return removed[0]
