"""Where things live: the installation directory (RAYFRONT_HOME) and this host's name.

Everything the server and the client read or write is found from one
installation directory, shared between machines that mount it:

    <home>/config/hosts           host records and locations
    <home>/config/rayserver.toml  server settings
    <home>/config/token           shared submission token (created at first start)
    <home>/config/tokens          named tokens, stored as sha256 (rayfront token new --user)
    <home>/srvlogs/<hostname>     server log, and <hostname>.pid
    <home>/srvstate/              job database and per-job folders

The default home, when RAYFRONT_HOME is not set, is ``~/rayfront`` (the
original product's installation folder was called ``rayfront`` too).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "RAYFRONT_HOME"
HOSTNAME_ENV = "RAYFRONT_HOSTNAME"
DEFAULT_HOME = "~/rayfront"
JOBS_FOLDER = "jobs"  # in the state folder: one folder a job (its log, previews)


def home_dir() -> Path:
    """The installation directory: $RAYFRONT_HOME, else ~/rayfront."""
    raw = os.environ.get(HOME_ENV) or DEFAULT_HOME
    return Path(raw).expanduser().absolute()


def job_folder(state_dir: Path, job_id: int) -> Path:
    """``<state dir>/jobs/<id>``: where a job's log and previews are kept."""
    return state_dir / JOBS_FOLDER / str(int(job_id))


def is_inside(path: Path, root: Path) -> bool:
    """True when ``path`` is ``root`` or below it (both as given: resolve them first)."""
    return path == root or root in path.parents


def hostname() -> str:
    """This machine's name as the hosts file knows it.

    RAYFRONT_HOSTNAME overrides it, so one machine can play two hosts of a
    shared installation (tests, and a workstation whose DNS name differs
    from the name in the hosts file).
    """
    return os.environ.get(HOSTNAME_ENV) or socket.gethostname()


@dataclass(frozen=True)
class Layout:
    """The files of one installation directory, as seen by one host."""

    home: Path
    host: str

    @classmethod
    def current(cls) -> Layout:
        return cls(home_dir(), hostname())

    @property
    def config_dir(self) -> Path:
        return self.home / "config"

    @property
    def hosts_file(self) -> Path:
        return self.config_dir / "hosts"

    @property
    def settings_file(self) -> Path:
        return self.config_dir / "rayserver.toml"

    @property
    def default_token_file(self) -> Path:
        return self.config_dir / "token"

    @property
    def tokens_file(self) -> Path:
        return self.config_dir / "tokens"

    @property
    def log_dir(self) -> Path:
        return self.home / "srvlogs"

    @property
    def log_file(self) -> Path:
        return self.log_dir / self.host

    @property
    def pid_file(self) -> Path:
        return self.log_dir / f"{self.host}.pid"

    @property
    def state_dir(self) -> Path:
        return self.home / "srvstate"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "jobs.sqlite3"

    @property
    def jobs_dir(self) -> Path:
        return self.state_dir / JOBS_FOLDER

    def job_dir(self, job_id: int) -> Path:
        return job_folder(self.state_dir, job_id)

    # Process titles: `ps x` tells the roles apart by these paths (see the manual).
    @property
    def server_title(self) -> str:
        return f"rfcore -O {self.home}/server/start.pyo"

    @property
    def editor_title(self) -> str:
        return f"rfcore -O {self.home}/editor/start.pyo"

    @property
    def procwrap_title(self) -> str:
        return f"rfcore -O {self.home}/procwrap.pyo"
