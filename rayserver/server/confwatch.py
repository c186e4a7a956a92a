"""Live configuration: the hosts file and rayserver.toml, reloaded on change.

:class:`LiveConfig` holds the last good configuration. :meth:`LiveConfig.reload`
re-reads both files and swaps them in only if both parse and this server still
has a record (matched by the ``name`` setting, else the machine's name, and
the port it listens on); otherwise it logs the error (file and line) at ERROR and keeps
what it had, so a half-saved edit or a deleted hosts file never takes the
server down. :meth:`LiveConfig.start_watching` runs a watchdog observer on
``<home>/config`` (and the folders of included hosts files) and reloads,
debounced, when one of the files changes. SIGHUP handling calls ``reload``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rayserver.common.hosts import HostRecord, HostsConfig, HostsFileError, parse_hosts
from rayserver.common.paths import Layout
from rayserver.common.settings import Settings, SettingsError, load_settings

log = logging.getLogger("rayserver.server.confwatch")

DEBOUNCE_SECS = 0.3


class NoHostRecordError(HostsFileError):
    """The hosts file has no record for this server's name and port."""

    def __init__(
        self,
        path: Path | str,
        host: str,
        port: int | None = None,
        settings_file: Path | str | None = None,
        others: list[HostRecord] | None = None,
    ) -> None:
        written = f"[{host}]" if ":" in host else host
        settings = settings_file or "rayserver.toml"
        if port is None:
            expected = (
                f"expected a line '{written} <number_of_cpus> [<location>=\"<local path>\" ...]'"
            )
            where = ""
        else:
            where = f" on port {port}"
            expected = (
                f"expected a line '{written}:{port} <number_of_cpus> "
                f"[<location>=\"<local path>\" ...]' (or '{written} <number_of_cpus> ...' "
                f"without a port, which means the port of {settings})"
            )
        seen = ""
        if others:
            seen = "; records with that name but other ports: " + ", ".join(
                f"{r.name} ({r.source}:{r.line})" for r in others
            )
        super().__init__(
            path,
            None,
            f"no record for this host {host!r}{where}; {expected}, or set `name` in {settings} "
            f"to the name of this server's record (RAYFRONT_HOSTNAME overrides the machine's "
            f"name){seen}",
        )
        self.host = host
        self.port = port


@dataclass(frozen=True)
class ConfigSnapshot:
    """One consistent configuration: read all fields from the same snapshot."""

    hosts: HostsConfig
    settings: Settings
    record: HostRecord
    generation: int


def server_name(layout: Layout, settings: Settings) -> str:
    """The name of this server's own record: the ``name`` setting, else the machine's name."""
    return settings.name or layout.host


def own_record(
    layout: Layout, hosts: HostsConfig, settings: Settings, port: int | None = None
) -> HostRecord:
    """This server's record: matched by :func:`server_name` and the port it listens on.

    ``port`` defaults to the settings' port. A record without a port means
    "the port of rayserver.toml", so a one-server installation matches
    whatever port it is configured with.
    """
    name = server_name(layout, settings)
    port = settings.port if port is None else port
    # A record without a port means the port this server listens on.
    record = hosts.record_for(name, port=port, default_port=port)
    if record is None:
        # Name the records this name has on other ports: the usual slip.
        others = [
            r
            for r in hosts.records.values()
            if HostsConfig(records={r.name: r}).record_for(name) is not None
        ]
        raise NoHostRecordError(layout.hosts_file, name, port, layout.settings_file, others)
    return record


def load_config(layout: Layout, generation: int = 0, port: int | None = None) -> ConfigSnapshot:
    """Read hosts and settings; raises HostsFileError (incl. NoHostRecordError) or SettingsError.

    ``port``: the port the server listens on, when it is running already (a
    changed port in rayserver.toml only takes effect at the next start, so
    the record stays the one of the port in use).
    """
    hosts = parse_hosts(layout.hosts_file)
    settings = load_settings(layout.settings_file)
    record = own_record(layout, hosts, settings, port)
    return ConfigSnapshot(hosts, settings, record, generation)


class LiveConfig:
    """The configuration in force, reloaded on demand or when the files change."""

    def __init__(
        self, layout: Layout, debounce: float = DEBOUNCE_SECS, port: int | None = None
    ) -> None:
        """``port``: the port the server listens on, when known (default: the settings')."""
        self.layout = layout
        self.debounce = debounce
        self._lock = threading.Lock()
        self._current = load_config(layout, 0, port)
        # bind/port changes wait for the next start: keep matching the port in use.
        self._port = self._current.settings.port if port is None else port
        self._observer = None  # watchdog Observer while watching
        self._timer: threading.Timer | None = None
        self._listeners: list[Callable[[ConfigSnapshot], None]] = []
        self._seen = self._signature()
        self._tried_at = time.monotonic()

    def _signature(self) -> tuple:
        """What the config files look like on disk now (None for a missing file)."""
        paths = [
            self.layout.settings_file,
            self.layout.hosts_file,
            *(Path(f) for f in self._current.hosts.files),
        ]
        sig = []
        for path in paths:
            try:
                st = path.stat()
                sig.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                sig.append((str(path), None))
        return tuple(sig)

    def reload_if_changed(self, min_interval: float = 1.0) -> bool:
        """:meth:`reload`, unless it was tried under ``min_interval`` s ago and no file changed.

        A client naming an unknown location triggers this, so a flood of bad
        requests re-parses (and re-logs) the configuration at most once a
        second. After that second it re-reads even when stat() shows no change:
        on NFS stat() may answer from the attribute cache, while opening the
        file revalidates it.
        """
        recent = time.monotonic() - self._tried_at < min_interval
        if recent and self._signature() == self._seen:
            return False
        return self.reload()

    @property
    def current(self) -> ConfigSnapshot:
        return self._current

    @property
    def hosts(self) -> HostsConfig:
        return self._current.hosts

    @property
    def settings(self) -> Settings:
        return self._current.settings

    @property
    def record(self) -> HostRecord:
        return self._current.record

    @property
    def generation(self) -> int:
        return self._current.generation

    def add_listener(self, callback: Callable[[ConfigSnapshot], None]) -> None:
        """Call ``callback(snapshot)`` after each successful reload (from the reloading thread)."""
        self._listeners.append(callback)

    def reload(self) -> bool:
        """Re-read both files; True if the new configuration is in force."""
        with self._lock:
            self._seen = self._signature()
            self._tried_at = time.monotonic()
            try:
                fresh = load_config(self.layout, self._current.generation + 1, self._port)
            except (HostsFileError, SettingsError) as exc:
                log.error("configuration not reloaded, keeping the last good one: %s", exc)
                return False
            old = self._current
            self._current = fresh
            self._seen = self._signature()  # the include list may have changed
        if fresh.settings.bind != old.settings.bind or fresh.settings.port != old.settings.port:
            log.warning(
                "bind/port changed in %s; this takes effect at the next server start",
                self.layout.settings_file,
            )
        if fresh.settings.sandbox != old.settings.sandbox:
            log.warning(
                'sandbox = "%s" in %s: jobs started from now on run %s',
                fresh.settings.sandbox,
                self.layout.settings_file,
                "UNCONFINED, with every right of the server's user"
                if fresh.settings.sandbox == "off"
                else "confined (a job fails if this machine cannot confine it)",
            )
        log.info("configuration reloaded (generation %d)", fresh.generation)
        for callback in list(self._listeners):
            try:
                callback(fresh)
            except Exception:
                log.exception("configuration listener failed")
        return True

    # ----------------------------------------------------------------- watching

    def _watched(self) -> tuple[set[Path], set[Path]]:
        files = {self.layout.hosts_file, self.layout.settings_file}
        files.update(Path(f) for f in self._current.hosts.files)
        resolved = {f.absolute() for f in files}
        return resolved, {f.parent for f in resolved}

    def start_watching(self) -> None:
        """Watch the config folder (and included files' folders); reload on change."""
        if self._observer is not None:
            return
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        files, folders = self._watched()
        outer = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                paths = {Path(str(event.src_path)).absolute()}
                dest = getattr(event, "dest_path", "")
                if dest:
                    paths.add(Path(str(dest)).absolute())
                if paths & files and event.event_type not in ("opened", "closed_no_write"):
                    outer._schedule()

        observer = Observer()
        for folder in folders:
            if folder.is_dir():
                observer.schedule(Handler(), str(folder), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def _schedule(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.debounce, self._reload_from_watch)
            self._timer.daemon = True
            self._timer.start()

    def _reload_from_watch(self) -> None:
        self.reload()

    def stop_watching(self) -> None:
        """Stop the observer and any pending reload."""
        observer, self._observer = self._observer, None
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if observer is not None:
            observer.stop()
            observer.join(5)
