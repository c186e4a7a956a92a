"""Server settings from ``<home>/config/rayserver.toml``.

Every key is documented, with its default, in ``conf/rayserver.toml``. A
missing file means all defaults. An unknown key, a value of the wrong type or
a TOML syntax error raises :class:`SettingsError` naming the file (and the
line, where TOML says it) and what was expected, so a broken edit never
silently changes behaviour.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rayserver.common.hosts import DEFAULT_PORT, split_host

__all__ = [
    "DEFAULT_PORT",
    "Settings",
    "SettingsError",
    "known_keys",
    "load_settings",
    "settings_from_dict",
]
DEFAULT_ALLOW = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "fc00::/7",
    "fe80::/10",
)


class SettingsError(Exception):
    """A settings file that cannot be used; the message names file and problem."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = str(path)
        self.detail = message
        super().__init__(f"{path}: {message}")


@dataclass(frozen=True)
class Settings:
    """Every server and client setting, with the shipped defaults."""

    bind: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    # The server's own host record is found by this name and `port`.
    # "": the machine's name (RAYFRONT_HOSTNAME, else the system's host name).
    name: str = ""
    allow: tuple[str, ...] = DEFAULT_ALLOW
    # None: <home>/config/token, created at first start. "": tokens switched off.
    token_file: str | None = None
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    radiance_bin: str = ""
    raypath: tuple[str, ...] = ()
    max_body_bytes: int = 1_048_576
    max_steps: int = 32
    max_args: int = 256
    max_arg_length: int = 4096
    client_timeout: float = 60.0
    # Open connections: per client address, and in all (see docs/security.md).
    max_connections_per_client: int = 64
    max_connections: int = 1024
    cancel_grace: float = 5.0
    log_level: str = "INFO"
    server_nice: int = 5
    executor: str = "local"
    slurm_partition: str = ""
    slurm_options: tuple[str, ...] = ()
    slurm_bin: str = ""
    slurm_poll_interval: float = 2.0
    # Longest the worker's event loop may stay silent before the supervisor
    # kills and replaces it; 0: never.
    worker_timeout: float = 30.0
    # Who may GET /metrics: "allow-list" (every address of allow, no token) or
    # "token" (any valid token, shared or named).
    metrics_auth: str = "allow-list"
    # Client: programs a shim (rayfront shim) runs locally; None: the built-in list.
    shim_local: tuple[str, ...] | None = None
    # The box around every job step (docs/security.md): "on" confines, "off" does not.
    sandbox: str = "on"
    max_job_processes: int = 64
    max_job_memory: int = 8 * 1024**3
    max_log_bytes: int = 16 * 1024**2
    max_output_bytes: int = 16 * 1024**3
    # A job that would end interrupted (crash, shutdown, lost Slurm job) is queued again
    # and continues from what it already computed (docs/operations.md, "Resume").
    resume_interrupted: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def token_path(self, default: Path) -> Path | None:
        """The token file in force: None when tokens are switched off."""
        if self.token_file is None:
            return default
        if self.token_file == "":
            return None
        return Path(self.token_file).expanduser()

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert and self.tls_key)


_INT_KEYS = {
    "port",
    "max_body_bytes",
    "max_steps",
    "max_args",
    "max_arg_length",
    "server_nice",
    "max_connections_per_client",
    "max_connections",
    "max_job_processes",
}
# Sizes: a whole number of bytes or a string such as "8G" (K, M, G, T: powers of 1024); 0 = no limit.
_SIZE_KEYS = {"max_job_memory", "max_log_bytes", "max_output_bytes"}
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_FLOAT_KEYS = {"client_timeout", "cancel_grace", "slurm_poll_interval", "worker_timeout"}
# Below this a busy machine could leave a healthy worker's loop silent that long.
MIN_WORKER_TIMEOUT = 2.0
_STR_KEYS = {
    "bind",
    "name",
    "tls_cert",
    "tls_key",
    "tls_ca",
    "radiance_bin",
    "log_level",
    "executor",
    "slurm_partition",
    "slurm_bin",
    "metrics_auth",
    "sandbox",
}
_BOOL_KEYS = {"resume_interrupted"}
_LIST_KEYS = {"allow", "raypath", "slurm_options", "shim_local"}
_LOG_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def known_keys() -> set[str]:
    return {f.name for f in fields(Settings)} - {"extra"}


def load_settings(path: str | Path) -> Settings:
    """Read a settings file; a missing file gives the defaults."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Settings()
    except OSError as exc:
        raise SettingsError(path, f"cannot read: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SettingsError(path, f"not UTF-8 text ({exc.reason})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(path, f"TOML syntax error: {exc}") from exc
    return settings_from_dict(data, path)


def settings_from_dict(data: dict[str, Any], path: str | Path = "<settings>") -> Settings:
    """Validate a parsed TOML table into Settings."""
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known_keys():
            raise SettingsError(
                path, f"unknown key {key!r}; known keys: {', '.join(sorted(known_keys()))}"
            )
        values[key] = _check(path, key, value)
    settings = Settings(**values)
    _check_combination(path, settings)
    return settings


def _check(path: str | Path, key: str, value: Any) -> Any:
    """One setting's value, checked and normalised; SettingsError naming what was expected."""
    if key in _INT_KEYS:
        return _check_int(path, key, value)
    if key in _SIZE_KEYS:
        return parse_size(path, key, value)
    if key in _FLOAT_KEYS:
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise SettingsError(path, f"{key} must be a number of seconds >= 0, got {value!r}")
        if key == "worker_timeout" and 0 < value < MIN_WORKER_TIMEOUT:
            raise SettingsError(
                path,
                f"worker_timeout must be 0 (never replace a silent worker) or at least "
                f"{MIN_WORKER_TIMEOUT:g} seconds, got {value!r}",
            )
        return float(value)
    if key == "token_file":
        if not isinstance(value, str):
            raise SettingsError(path, f'token_file must be a path string ("" = off), got {value!r}')
        return value
    if key in _STR_KEYS:
        return _check_str(path, key, value)
    if key in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise SettingsError(path, f"{key} must be true or false, got {value!r}")
        return value
    if key in _LIST_KEYS:
        if isinstance(value, str) and key != "allow":
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SettingsError(path, f"{key} must be a list of strings, got {value!r}")
        if key == "allow":
            for item in value:
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError as exc:
                    raise SettingsError(
                        path, f'allow entry {item!r} is not a network (CIDR, e.g. "10.0.0.0/8")'
                    ) from exc
        return tuple(value)
    raise SettingsError(path, f"unknown key {key!r}")


def _check_int(path: str | Path, key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SettingsError(path, f"{key} must be a whole number, got {value!r}")
    if key == "port" and not 0 <= value <= 65535:
        raise SettingsError(path, f"port must be between 0 and 65535, got {value}")
    if key == "server_nice" and not 0 <= value <= 19:
        raise SettingsError(path, f"server_nice must be between 0 and 19, got {value}")
    if key == "max_job_processes" and value < 0:
        raise SettingsError(path, f"{key} must be 0 (no limit) or more, got {value}")
    if key not in ("port", "server_nice", "max_job_processes") and value < 1:
        raise SettingsError(path, f"{key} must be at least 1, got {value}")
    return value


def _check_str(path: str | Path, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise SettingsError(path, f"{key} must be a string, got {value!r}")
    if key == "log_level" and value.upper() not in _LOG_LEVELS:
        raise SettingsError(
            path, f"log_level must be one of {', '.join(sorted(_LOG_LEVELS))}, got {value!r}"
        )
    if key == "metrics_auth" and value not in ("allow-list", "token"):
        raise SettingsError(path, f'metrics_auth must be "allow-list" or "token", got {value!r}')
    if key == "sandbox" and value not in ("on", "off"):
        raise SettingsError(
            path, f'sandbox must be "on" (confine every job) or "off", got {value!r}'
        )
    if key == "executor" and value not in ("local", "slurm"):
        raise SettingsError(path, f'executor must be "local" or "slurm", got {value!r}')
    if key == "bind" and value:
        try:
            ipaddress.ip_address(value)
        except ValueError as exc:
            raise SettingsError(
                path, f'bind must be an IP address such as "0.0.0.0" or "::", got {value!r}'
            ) from exc
    if key == "name" and value:
        return _check_name(path, value)
    return value.upper() if key == "log_level" else value


def parse_size(path: str | Path, key: str, value: Any) -> int:
    """A size setting in bytes: a whole number, or a string like "512M" or "8G"."""
    expected = f'{key} must be a number of bytes or a size such as "512M" or "8G" (0 = no limit)'
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = value, ""
    elif isinstance(value, str):
        text = value.strip().upper().removesuffix("IB").removesuffix("B")
        unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
        number_text = text[: len(text) - len(unit)].strip()
        if not number_text.isdigit():
            raise SettingsError(path, f"{expected}, got {value!r}")
        number = int(number_text)
    else:
        raise SettingsError(path, f"{expected}, got {value!r}")
    if number < 0:
        raise SettingsError(path, f"{expected}, got {value!r}")
    return number * _SIZE_UNITS[unit]


def _check_name(path: str | Path, value: str) -> str:
    expected = (
        "expected a host name or IP address without a port, as in the hosts file "
        '(the port is the `port` setting), or "" for this machine\'s name'
    )
    try:
        address, port = split_host(value)
    except ValueError as exc:
        raise SettingsError(path, f"name {value!r} is not usable: {exc}; {expected}") from exc
    if port is not None or value.startswith("["):
        raise SettingsError(path, f"name {value!r} carries a port or brackets; {expected}")
    return address


def _check_combination(path: str | Path, settings: Settings) -> None:
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise SettingsError(path, "tls_cert and tls_key must be given together")
