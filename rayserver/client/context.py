"""What rayfront needs to know before it talks to a server.

The installation (``RAYFRONT_HOME``), its settings (port, TLS, token file),
the hosts file, which server to talk to, and where the current project lies
in terms of a *location* that every host can translate to its own mount.
No hosts file, no record for this host or no location covering the current
directory: the project is local only, and the error says which it was.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from rayserver.client.connection import EXIT_LOCAL_ONLY, EXIT_USAGE, Client, ClientError, Target
from rayserver.common.hosts import (
    HostRecord,
    HostsConfig,
    HostsFileError,
    locate,
    parse_hosts,
    split_host,
)
from rayserver.common.paths import Layout
from rayserver.common.settings import Settings, SettingsError, load_settings

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
                f"(RAYFRONT_HOME is {self.layout.home})",
                exit_code=EXIT_LOCAL_ONLY,
            )
        # By the machine's name only: the `name` setting is the server's, and a
        # workstation that also runs a server still mounts the volumes once.
        record = hosts.record_for(self.layout.host)
        if record is None:
            raise ClientError(
                f"this project is local only: the hosts file {self.layout.hosts_file} has no "
                f"record for this host {self.layout.host!r} (set RAYFRONT_HOSTNAME if this "
                "machine is known there under another name)",
                exit_code=EXIT_LOCAL_ONLY,
            )
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
                f"(its locations: {mounts})",
                exit_code=EXIT_LOCAL_ONLY,
            )
        return Project(found[0], found[1], directory)

    # Which server, and how to reach it.
    def servers(self) -> list[HostRecord]:
        return self.hosts.servers() if self.hosts else []

    def is_this_host(self, name: str) -> bool:
        if _is_ip(name):
            return False  # an address is dialled as written, never swapped for 127.0.0.1
        names = {self.layout.host.lower(), socket.gethostname().lower()}
        shorts = {n.split(".", 1)[0] for n in names}
        return name.lower() in names or name.lower().split(".", 1)[0] in shorts

    def target(self, host: str | None = None) -> Target:
        """The server named by ``--host``, or the default.

        ``host`` is a record of the hosts file, by its full name
        (``box:9183``) or its address, or ADDRESS[:PORT] / [IPv6]:PORT of a
        server not in the file. The default is the first server record
        (cpus > 0). Dialling rules: see :meth:`target_for`.
        """
        if host is None:
            servers = self.servers()
            if not servers:
                why = (
                    "there is no hosts file at " + str(self.layout.hosts_file)
                    if self.hosts is None
                    else f"the hosts file {self.layout.hosts_file} has no server (cpus > 0)"
                )
                raise ClientError(
                    f"no rayserver to talk to: {why}; name one with --host",
                    exit_code=EXIT_LOCAL_ONLY,
                )
            return self.target_for(servers[0])
        try:
            address, port = split_host(host)
        except ValueError as exc:
            raise ClientError(
                f"--host {host!r}: {exc}; expected a server of the hosts file, "
                "NAME, NAME:PORT, IP:PORT or [IPv6]:PORT",
                exit_code=EXIT_USAGE,
            ) from exc
        record = (
            self.hosts.record_for(host, default_port=self.settings.port) if self.hosts else None
        )
        if record is not None:
            self._check_server(record)
            return self.target_for(record)
        dial = "127.0.0.1" if self.is_this_host(address) else address
        return Target(address, dial, port or self.settings.port, self.ssl_context())

    def target_for(self, record: HostRecord) -> Target:
        """How to reach ``record``'s server: its address and port (else the settings' port).

        This host is dialled as 127.0.0.1; the certificate is checked against
        the record's address (host name or IP).
        """
        dial = "127.0.0.1" if self.is_this_host(record.address) else record.address
        return Target(
            record.address, dial, record.effective_port(self.settings.port), self.ssl_context()
        )

    def server_records(self, names: list[str] | None = None) -> list[HostRecord]:
        """The servers named (full record name or address), in order, without repeats.

        None or ``["all"]``: every record with cpus > 0. An unknown name or a
        client-only (0 cpus) record is a usage error naming it and the servers.
        """
        if names is None or names == ["all"]:
            servers = self.servers()
            if not servers:
                why = (
                    "there is no hosts file at " + str(self.layout.hosts_file)
                    if self.hosts is None
                    else f"the hosts file {self.layout.hosts_file} has no server (cpus > 0)"
                )
                raise ClientError(f"no rayserver to talk to: {why}", exit_code=EXIT_LOCAL_ONLY)
            return servers
        chosen: list[HostRecord] = []
        for name in names:
            record = (
                self.hosts.record_for(name, default_port=self.settings.port) if self.hosts else None
            )
            if record is None:
                where = (
                    f"the hosts file {self.layout.hosts_file}"
                    if self.hosts is not None
                    else f"the hosts file (there is none at {self.layout.hosts_file})"
                )
                raise ClientError(
                    f"host {name!r} is not a server of {where}; expected one of: "
                    + (", ".join(r.name for r in self.servers()) or "none")
                    + " (or 'all')",
                    exit_code=EXIT_USAGE,
                )
            self._check_server(record)
            if record not in chosen:
                chosen.append(record)
        return chosen

    def _check_server(self, record: HostRecord) -> None:
        if not record.is_server:
            raise ClientError(
                f"host {record.name!r} has 0 cpus in {record.source}: it is a client "
                "only, not a server; servers: "
                + (", ".join(r.name for r in self.servers()) or "none"),
                exit_code=EXIT_USAGE,
            )

    def ssl_context(self) -> ssl.SSLContext | None:
        """TLS when the installation's settings say the server uses it."""
        s = self.settings
        if not (s.tls_ca or s.tls_enabled):
            return None
        from rayserver.common.credentials import CredentialsError, client_ssl_context

        try:
            return client_ssl_context(s)
        except CredentialsError as exc:
            raise ClientError(f"cannot set up TLS: {exc}", exit_code=EXIT_USAGE) from exc

    def token(self) -> str | None:
        """$RAYFRONT_TOKEN, else the installation's token file, else None (tokens off)."""
        # credentials imports ssl; loaded here, not at start-up, to keep `status` quick.
        from rayserver.common.credentials import read_client_token

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


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
