"""What rayfront needs to know before it talks to a server.

The installation (``RAYFRONT_HOME``), its settings (port, TLS, token file),
the hosts file, which server to talk to, and where the current project lies
in terms of a *location* that every host can translate to its own mount.
No hosts file, no record for this host or no location covering the current
directory: the project is local only, and the error says which it was.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from rayserver.client.connection import EXIT_LOCAL_ONLY, EXIT_USAGE, Client, ClientError, Target
from rayserver.hosts import HostRecord, HostsConfig, HostsFileError, locate, parse_hosts
from rayserver.paths import Layout
from rayserver.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    import ssl

@dataclass(frozen=True)
class Project:
    """The current directory as a server sees it: location name and relative path."""

    location: str
    path: str
    local_dir: Path


class Context:
    """Installation, settings and hosts file of one rayfront invocation (read lazily)."""

    def __init__(self, layout: Layout | None = None) -> None:
        self.layout = layout or Layout.current()

    @cached_property
    def settings(self) -> Settings:
        try:
            return load_settings(self.layout.settings_file)
        except SettingsError as exc:
            raise ClientError(f"cannot use the settings: {exc}", exit_code=EXIT_USAGE) from exc

    @cached_property
    def hosts(self) -> HostsConfig | None:
        """The hosts file, or None when there is none (local only)."""
        if not self.layout.hosts_file.exists():
            return None
        try:
            return parse_hosts(self.layout.hosts_file)
        except HostsFileError as exc:
            raise ClientError(f"cannot use the hosts file: {exc}", exit_code=EXIT_USAGE) from exc

    def own_record(self) -> HostRecord:
        """This host's record; ClientError (local only) when there is no hosts file or record."""
        hosts = self.hosts
        if hosts is None:
            raise ClientError(
                f"this project is local only: there is no hosts file at {self.layout.hosts_file} "
                f"(RAYFRONT_HOME is {self.layout.home})", exit_code=EXIT_LOCAL_ONLY)
        record = hosts.record_for(self.layout.host)
        if record is None:
            raise ClientError(
                f"this project is local only: the hosts file {self.layout.hosts_file} has no "
                f"record for this host {self.layout.host!r} (set RAYFRONT_HOSTNAME if this "
                "machine is known there under another name)", exit_code=EXIT_LOCAL_ONLY)
        return record

    def project(self, directory: Path | None = None) -> Project:
        """Translate ``directory`` (default: the current one) into (location, relative path)."""
        directory = current_dir() if directory is None else directory
        record = self.own_record()
        found = locate(record, directory)
        if found is None:
            mounts = ", ".join(f'{k}="{v}"' for k, v in record.locations.items()) or "none"
            raise ClientError(
                f"this project is local only: {directory} is not below any location of host "
                f"{record.name!r} in {record.source or self.layout.hosts_file} "
                f"(its locations: {mounts})", exit_code=EXIT_LOCAL_ONLY)
        return Project(found[0], found[1], directory)

    # Which server, and how to reach it.
    def servers(self) -> list[HostRecord]:
        return self.hosts.servers() if self.hosts else []

    def is_this_host(self, name: str) -> bool:
        names = {self.layout.host.lower(), socket.gethostname().lower()}
        shorts = {n.split(".", 1)[0] for n in names}
        return name.lower() in names or name.lower().split(".", 1)[0] in shorts

    def target(self, host: str | None = None) -> Target:
        """The server named by ``--host`` (a hosts-file name or ADDRESS[:PORT]) or the default.

        The default is the first server record (cpus > 0) of the hosts file.
        The local host is dialled as 127.0.0.1; others by their name.
        """
        port = self.settings.port
        if host is None:
            servers = self.servers()
            if not servers:
                why = ("there is no hosts file at " + str(self.layout.hosts_file)
                       if self.hosts is None else
                       f"the hosts file {self.layout.hosts_file} has no server (cpus > 0)")
                raise ClientError(f"no rayserver to talk to: {why}; name one with --host",
                                  exit_code=EXIT_LOCAL_ONLY)
            name = servers[0].name
        else:
            name, port = _split_host_port(host, port)
            record = self.hosts.record_for(name) if self.hosts else None
            if record is not None:
                if not record.is_server:
                    raise ClientError(
                        f"host {record.name!r} has 0 cpus in {record.source}: it is a client "
                        "only, not a server; servers: "
                        + (", ".join(r.name for r in self.servers()) or "none"),
                        exit_code=EXIT_USAGE)
                name = record.name
        address = "127.0.0.1" if self.is_this_host(name) else name
        return Target(name, address, port, self.ssl_context())

    def ssl_context(self) -> ssl.SSLContext | None:
        """TLS when the installation's settings say the server uses it."""
        s = self.settings
        if not (s.tls_ca or s.tls_enabled):
            return None
        from rayserver.credentials import CredentialsError, client_ssl_context

        try:
            return client_ssl_context(s)
        except CredentialsError as exc:
            raise ClientError(f"cannot set up TLS: {exc}", exit_code=EXIT_USAGE) from exc

    def token(self) -> str | None:
        """$RAYFRONT_TOKEN, else the installation's token file, else None (tokens off)."""
        # credentials imports ssl; loaded here, not at start-up, to keep `status` quick.
        from rayserver.credentials import read_client_token

        return read_client_token(self.layout, self.settings)

    def client(self, host: str | None = None, timeout: float = 30.0) -> Client:
        return Client(self.target(host), self.token(), timeout)


def current_dir() -> Path:
    """The current directory as the user's shell names it ($PWD), if that is still right.

    getcwd() gives the physical path; $PWD keeps the path through a symlinked
    mount, which is the one the user's host record is likely to name.
    """
    pwd = os.environ.get("PWD")
    if pwd and os.path.isabs(pwd):
        try:
            if os.path.samefile(pwd, "."):
                return Path(pwd)
        except OSError:
            pass
    return Path.cwd()


def _split_host_port(text: str, default_port: int) -> tuple[str, int]:
    name, sep, port_text = text.rpartition(":")
    if not sep or not name:
        return text, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ClientError(f"--host {text!r}: expected NAME or NAME:PORT with a port 1-65535",
                          exit_code=EXIT_USAGE)
    return name, int(port_text)
