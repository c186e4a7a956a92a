"""The shared host configuration file (``<home>/config/hosts``).

One record per line::

    <hostname>[:<port>] <number_of_cpus> [<location>="<local path>" ...]
    __include__ <path of another hosts file>
    __library__ <relative path of a shared library directory>

Comments start with ``#``; blank lines are ignored. A malformed line raises
:class:`HostsFileError` naming the file, the line number and what was
expected. ``__include__`` paths are relative to the including file's folder;
an include loop is an error, not a hang.

A record's first word names the host: a host name, an IPv4 address or an
IPv6 address (``[::1]``, or bare ``::1`` when no port follows), optionally
with ``:<port>`` so several servers can share one machine. A record without
a port means "the port in rayserver.toml" (:data:`DEFAULT_PORT` unless set).
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LOCATION_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
MAX_INCLUDE_DEPTH = 16
DEFAULT_PORT = 9182
_RECORD_SYNTAX = "'<hostname>[:<port>] <number_of_cpus> [<location>=\"<local path>\" ...]'"


class HostsFileError(Exception):
    """A hosts file that cannot be used; the message names file and line."""

    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.detail = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


def split_host(text: str) -> tuple[str, int | None]:
    """``HOST[:PORT]`` -> (address without brackets, port or None).

    HOST is a host name, an IPv4 address, ``[IPv6]`` or a bare IPv6 address
    (then without a port: ``::1:9183`` would be ambiguous). Raises ValueError
    saying what was wrong and what was expected.
    """
    expected = (
        "expected a host name, an IPv4 address or [IPv6 address], "
        "optionally followed by :<port> (1-65535)"
    )
    if not text:
        raise ValueError(f"empty host; {expected}")
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r} has no closing ']'; {expected}")
        try:
            ipaddress.IPv6Address(inner)
        except ValueError as exc:
            raise ValueError(f"{inner!r} in brackets is not an IPv6 address; {expected}") from exc
        if not rest:
            return inner, None
        if not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after ']' in {text!r}; {expected}")
        return inner, _port(rest[1:], text)
    if text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text)
        except ValueError as exc:
            raise ValueError(
                f"{text!r} is not an IPv6 address; write an IPv6 address with a port as "
                "[address]:port"
            ) from exc
        return text, None
    host, sep, port_text = text.partition(":")
    if not _HOSTNAME_RE.match(host):
        raise ValueError(f"bad host name {host!r}; {expected}")
    return host, (_port(port_text, text) if sep else None)


def _port(text: str, whole: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ValueError(f"port {text!r} of {whole!r} is not a whole number from 1 to 65535")
    return int(text)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _address_key(address: str) -> str:
    """How two addresses compare: IPs in canonical form, names case-insensitively."""
    ip = _ip(address)
    return ip.compressed if ip is not None else address.lower()


@dataclass(frozen=True)
class HostRecord:
    """One host: how many simulations it runs at once and where it mounts each location.

    ``name`` is the first word as written (``renderbox:9183``); ``address``
    is its host part without brackets or port; ``port`` is None when the
    record gives none (then the port of rayserver.toml applies).
    """

    name: str
    cpus: int
    locations: dict[str, str] = field(default_factory=dict)
    source: str = ""
    line: int = 0
    address: str = ""
    port: int | None = None

    def __post_init__(self) -> None:
        # Records built in code (tests, tools) may give only the name.
        if not self.address:
            try:
                address, port = split_host(self.name)
            except ValueError:
                address, port = self.name, None
            object.__setattr__(self, "address", address)
            if self.port is None:
                object.__setattr__(self, "port", port)

    @property
    def is_server(self) -> bool:
        return self.cpus > 0

    def effective_port(self, default_port: int) -> int:
        """The port this host's server listens on: its own, else ``default_port``."""
        return self.port if self.port is not None else default_port


@dataclass
class HostsConfig:
    """All records of a hosts file with its includes spliced in."""

    records: dict[str, HostRecord] = field(default_factory=dict)
    libraries: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def record_for(
        self, host: str, port: int | None = None, default_port: int = DEFAULT_PORT
    ) -> HostRecord | None:
        """The record of ``host`` (optionally on ``port``), or None.

        ``host`` is matched against the records' full names first (so
        ``renderbox:9183`` finds that record), then against their addresses:
        exact, case-insensitive, then by short name (``box.lan`` ~ ``box``;
        never for IP addresses). ``host`` may itself carry ``:PORT``.
        Without a port the record without an explicit port is preferred
        (else the first in file order); with a port only records whose
        effective port (their own, else ``default_port``) equals it match,
        an explicit one before an implicit one.
        """
        records = list(self.records.values())
        for exact in (True, False):
            named = [
                r for r in records if (r.name == host if exact else r.name.lower() == host.lower())
            ]
            chosen = _pick(named, port, default_port)
            if chosen is not None:
                return chosen
        try:
            address, own_port = split_host(host)
        except ValueError:
            return None
        if own_port is not None:
            if port is not None and port != own_port:
                return None
            port = own_port
        key = _address_key(address)
        short = None if _ip(address) else key.split(".", 1)[0]
        levels = [
            lambda r: r.address == address,
            lambda r: _address_key(r.address) == key,
        ]
        if short is not None:
            levels += [
                lambda r: not _ip(r.address) and r.address.lower() == short,
                lambda r: not _ip(r.address) and r.address.lower().split(".", 1)[0] == short,
            ]
        for matches in levels:
            chosen = _pick([r for r in records if matches(r)], port, default_port)
            if chosen is not None:
                return chosen
        return None

    def servers(self) -> list[HostRecord]:
        return [rec for rec in self.records.values() if rec.is_server]

    def library_dirs(self, location_root: str | Path) -> list[Path]:
        """The ``__library__`` directories below one location's local root."""
        root = Path(location_root)
        return [root / lib for lib in self.libraries]


def _pick(candidates: list[HostRecord], port: int | None, default_port: int) -> HostRecord | None:
    if port is None:
        plain = [r for r in candidates if r.port is None]
        return (plain or candidates or [None])[0]
    explicit = [r for r in candidates if r.port == port]
    implicit = [r for r in candidates if r.port is None and default_port == port]
    return (explicit or implicit or [None])[0]


def parse_hosts(path: str | Path) -> HostsConfig:
    """Read a hosts file and its includes. Raises HostsFileError on any problem."""
    config = HostsConfig()
    _parse_into(Path(path), config, stack=[])
    return config


def parse_hosts_text(text: str, source: str = "<hosts>") -> HostsConfig:
    """Parse hosts-file text that is not on disk (includes are resolved against the cwd)."""
    config = HostsConfig()
    _parse_lines(text.splitlines(), Path(source), config, stack=[])
    return config


def _parse_into(path: Path, config: HostsConfig, stack: list[Path]) -> None:
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:
        raise HostsFileError(path, None, f"cannot resolve path: {exc}") from exc
    if resolved in stack:
        chain = " -> ".join(str(p) for p in [*stack, resolved])
        raise HostsFileError(path, None, f"include loop: {chain}")
    if len(stack) >= MAX_INCLUDE_DEPTH:
        raise HostsFileError(path, None, f"includes nested deeper than {MAX_INCLUDE_DEPTH}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise HostsFileError(path, None, "file not found") from exc
    except UnicodeDecodeError as exc:
        raise HostsFileError(path, None, f"not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise HostsFileError(path, None, f"cannot read: {exc.strerror or exc}") from exc
    config.files.append(str(path))
    _parse_lines(text.splitlines(), path, config, [*stack, resolved])


def _parse_lines(lines: list[str], path: Path, config: HostsConfig, stack: list[Path]) -> None:
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "\x00" in line:
            raise HostsFileError(path, number, "NUL character in line")
        try:
            words = shlex.split(line, comments=True, posix=True)
        except ValueError as exc:
            raise HostsFileError(path, number, f"unbalanced quotes ({exc})") from exc
        if not words:
            continue
        keyword = words[0]
        if keyword == "__include__":
            _include(words, path, number, config, stack)
        elif keyword == "__library__":
            _library(words, path, number, config)
        elif keyword.startswith("__"):
            raise HostsFileError(
                path,
                number,
                f"unknown directive {keyword!r}; expected '__include__' or '__library__'",
            )
        else:
            _add_record(_parse_record(words, path, number), path, number, config)


def _include(
    words: list[str], path: Path, number: int, config: HostsConfig, stack: list[Path]
) -> None:
    """``__include__ <path>``: that file's records and libraries, errors named by both files."""
    if len(words) != 2:
        raise HostsFileError(path, number, "expected '__include__ <path of another hosts file>'")
    target = Path(words[1]).expanduser()
    if not target.is_absolute():
        target = path.parent / target
    try:
        _parse_into(target, config, stack)
    except HostsFileError as exc:
        raise HostsFileError(
            path,
            number,
            f"in included file {exc.path}"
            + (f" line {exc.line}" if exc.line else "")
            + f": {exc.detail}",
        ) from exc


def _library(words: list[str], path: Path, number: int, config: HostsConfig) -> None:
    """``__library__ <relative path>``: a library directory of every location."""
    if len(words) != 2:
        raise HostsFileError(
            path, number, "expected '__library__ <relative path of a library directory>'"
        )
    lib = PurePosixPath(words[1])
    if lib.is_absolute() or ".." in lib.parts:
        raise HostsFileError(
            path,
            number,
            f"library path {words[1]!r} must be relative to the location root, without '..'",
        )
    if words[1] not in config.libraries:
        config.libraries.append(words[1])


def _add_record(record: HostRecord, path: Path, number: int, config: HostsConfig) -> None:
    """One host record; refused when its name, or its address and port, are taken."""
    if record.name in config.records:
        first = config.records[record.name]
        raise HostsFileError(
            path,
            number,
            f"host {record.name!r} already defined at {first.source}:{first.line}",
        )
    if record.port is not None:
        key = _address_key(record.address)
        for first in config.records.values():
            if first.port == record.port and _address_key(first.address) == key:
                raise HostsFileError(
                    path,
                    number,
                    f"host {record.name!r} is the same address and port as "
                    f"{first.name!r} at {first.source}:{first.line}; expected one record "
                    "per server (address and port)",
                )
    config.records[record.name] = record


def _parse_record(words: list[str], path: Path, number: int) -> HostRecord:
    name = words[0]
    try:
        address, port = split_host(name)
    except ValueError as exc:
        raise HostsFileError(path, number, f"{exc}; a record is {_RECORD_SYNTAX}") from exc
    if len(words) < 2:
        raise HostsFileError(
            path, number, f"missing cpu count after host {name!r}; expected {_RECORD_SYNTAX}"
        )
    cpus_text = words[1]
    if not cpus_text.isdigit() or not cpus_text.isascii():
        raise HostsFileError(
            path, number, f"cpu count {cpus_text!r} of host {name!r} is not a whole number >= 0"
        )
    cpus = int(cpus_text)
    if cpus > 4096:
        raise HostsFileError(path, number, f"cpu count {cpus} of host {name!r} is above 4096")
    locations: dict[str, str] = {}
    for word in words[2:]:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise HostsFileError(path, number, f'expected <location>="<local path>", got {word!r}')
        if not _LOCATION_RE.match(key):
            raise HostsFileError(
                path, number, f"bad location name {key!r}; expected letters, digits, '_', '.', '-'"
            )
        if not value:
            raise HostsFileError(path, number, f"location {key!r} has an empty path")
        if not value.startswith("/"):
            raise HostsFileError(path, number, f"location {key!r} path {value!r} must be absolute")
        if key in locations:
            raise HostsFileError(path, number, f"location {key!r} given twice for host {name!r}")
        locations[key] = value
    return HostRecord(name, cpus, locations, str(path), number, address, port)


def locate(record: HostRecord, directory: str | Path) -> tuple[str, str] | None:
    """(location, path relative to it) for a directory below one of ``record``'s locations.

    The longest matching mount wins, so nested locations resolve to the
    innermost one. Paths are compared after resolving symlinks on both sides.
    """
    target = Path(directory).resolve()
    best: tuple[int, str, str] | None = None
    for name, mount in record.locations.items():
        root = Path(mount).resolve()
        if target == root or root in target.parents:
            rel = target.relative_to(root).as_posix()
            depth = len(root.parts)
            if best is None or depth > best[0]:
                best = (depth, name, "." if rel == "." else rel)
    return (best[1], best[2]) if best else None
