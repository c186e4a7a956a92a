"""The shared host configuration file (``<home>/config/hosts``).

One record per line::

    <hostname> <number_of_cpus> [<location>="<local path>" ...]
    __include__ <path of another hosts file>
    __library__ <relative path of a shared library directory>

Comments start with ``#``; blank lines are ignored. A malformed line raises
:class:`HostsFileError` naming the file, the line number and what was
expected. ``__include__`` paths are relative to the including file's folder;
an include loop is an error, not a hang.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LOCATION_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
MAX_INCLUDE_DEPTH = 16


class HostsFileError(Exception):
    """A hosts file that cannot be used; the message names file and line."""

    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.detail = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class HostRecord:
    """One host: how many simulations it runs at once and where it mounts each location."""

    name: str
    cpus: int
    locations: dict[str, str] = field(default_factory=dict)
    source: str = ""
    line: int = 0

    @property
    def is_server(self) -> bool:
        return self.cpus > 0


@dataclass
class HostsConfig:
    """All records of a hosts file with its includes spliced in."""

    records: dict[str, HostRecord] = field(default_factory=dict)
    libraries: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def record_for(self, host: str) -> HostRecord | None:
        """The record of ``host``: exact name first, then case-insensitive, then short name."""
        if host in self.records:
            return self.records[host]
        lowered = {name.lower(): rec for name, rec in self.records.items()}
        if host.lower() in lowered:
            return lowered[host.lower()]
        short = host.split(".", 1)[0].lower()
        if short in lowered:
            return lowered[short]
        for name, rec in lowered.items():
            if name.split(".", 1)[0] == short:
                return rec
        return None

    def servers(self) -> list[HostRecord]:
        return [rec for rec in self.records.values() if rec.is_server]

    def library_dirs(self, location_root: str | Path) -> list[Path]:
        """The ``__library__`` directories below one location's local root."""
        root = Path(location_root)
        return [root / lib for lib in self.libraries]


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
            if len(words) != 2:
                raise HostsFileError(
                    path, number, "expected '__include__ <path of another hosts file>'"
                )
            target = Path(words[1]).expanduser()
            if not target.is_absolute():
                target = path.parent / target
            try:
                _parse_into(target, config, stack)
            except HostsFileError as exc:
                raise HostsFileError(
                    path, number, f"in included file {exc.path}"
                    + (f" line {exc.line}" if exc.line else "") + f": {exc.detail}"
                ) from exc
            continue
        if keyword == "__library__":
            if len(words) != 2:
                raise HostsFileError(
                    path, number, "expected '__library__ <relative path of a library directory>'"
                )
            lib = PurePosixPath(words[1])
            if lib.is_absolute() or ".." in lib.parts:
                raise HostsFileError(
                    path, number,
                    f"library path {words[1]!r} must be relative to the location root, without '..'",
                )
            if words[1] not in config.libraries:
                config.libraries.append(words[1])
            continue
        if keyword.startswith("__"):
            raise HostsFileError(
                path, number,
                f"unknown directive {keyword!r}; expected '__include__' or '__library__'",
            )
        config_record = _parse_record(words, path, number)
        if config_record.name in config.records:
            first = config.records[config_record.name]
            raise HostsFileError(
                path, number,
                f"host {config_record.name!r} already defined at {first.source}:{first.line}",
            )
        config.records[config_record.name] = config_record


def _parse_record(words: list[str], path: Path, number: int) -> HostRecord:
    name = words[0]
    if not _HOSTNAME_RE.match(name):
        raise HostsFileError(
            path, number, f"bad host name {name!r}; expected '<hostname> <number_of_cpus> "
            "[<location>=\"<local path>\" ...]'"
        )
    if len(words) < 2:
        raise HostsFileError(
            path, number, f"missing cpu count after host {name!r}; expected "
            "'<hostname> <number_of_cpus> [<location>=\"<local path>\" ...]'"
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
            raise HostsFileError(
                path, number, f"expected <location>=\"<local path>\", got {word!r}"
            )
        if not _LOCATION_RE.match(key):
            raise HostsFileError(
                path, number, f"bad location name {key!r}; expected letters, digits, '_', '.', '-'"
            )
        if not value:
            raise HostsFileError(path, number, f"location {key!r} has an empty path")
        if not value.startswith("/"):
            raise HostsFileError(
                path, number, f"location {key!r} path {value!r} must be absolute"
            )
        if key in locations:
            raise HostsFileError(path, number, f"location {key!r} given twice for host {name!r}")
        locations[key] = value
    return HostRecord(name, cpus, locations, str(path), number)


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
