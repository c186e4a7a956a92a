"""Settings from rayserver.toml: defaults, validation messages, and the shipped example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rayserver.common.settings import (
    DEFAULT_PORT,
    Settings,
    SettingsError,
    known_keys,
    load_settings,
)

REPO = Path(__file__).resolve().parent.parent


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    s = load_settings(tmp_path / "none.toml")
    assert s == Settings()
    assert s.bind == "0.0.0.0" and s.port == DEFAULT_PORT == 9182
    assert "127.0.0.0/8" in s.allow and "192.168.0.0/16" in s.allow
    assert s.worker_timeout == 30.0


def test_worker_timeout_zero_switches_the_watch_off(tmp_path: Path) -> None:
    path = tmp_path / "rayserver.toml"
    path.write_text("worker_timeout = 0\n")
    assert load_settings(path).worker_timeout == 0.0
    path.write_text("worker_timeout = 2\n")
    assert load_settings(path).worker_timeout == 2.0


def test_token_path_modes(tmp_path: Path) -> None:
    default = tmp_path / "token"
    assert Settings().token_path(default) == default
    assert Settings(token_file="").token_path(default) is None
    assert Settings(token_file="/x/t").token_path(default) == Path("/x/t")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("port = 'x'", "port must be a whole number"),
        ("port = 70000", "between 0 and 65535"),
        ("bind = 'not-an-ip'", "bind must be an IP address"),
        ("allow = ['10.0.0.0/8', 'nonsense']", "allow entry 'nonsense'"),
        ("colour = 'red'", "unknown key 'colour'"),
        ("executor = 'k8s'", 'executor must be "local" or "slurm"'),
        ("tls_cert = '/c.pem'", "tls_cert and tls_key must be given together"),
        ("port = ", "TOML syntax error"),
        ("cancel_grace = -1", "cancel_grace must be a number of seconds"),
        ("log_level = 'LOUD'", "log_level must be one of"),
        (
            "worker_timeout = 0.5",
            "worker_timeout must be 0 (never replace a silent worker) or "
            "at least 2 seconds, got 0.5",
        ),
        ("worker_timeout = '30'", "worker_timeout must be a number of seconds >= 0, got '30'"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "rayserver.toml"
    path.write_text(text + "\n")
    with pytest.raises(SettingsError) as err:
        load_settings(path)
    assert str(err.value).startswith(str(path))
    assert expected in str(err.value)


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "rayserver.toml"
    path.write_text('bind = "127.0.0.1"\nport = = 3\n')
    with pytest.raises(SettingsError, match="line 2"):
        load_settings(path)


def test_shipped_example_documents_every_key(tmp_path: Path) -> None:
    example = REPO / "conf" / "rayserver.toml"
    if not example.exists():
        pytest.fail("conf/rayserver.toml is missing")
    text = example.read_text()
    undocumented = [k for k in sorted(known_keys()) if f"{k} =" not in text]
    assert not undocumented, f"keys not documented in conf/rayserver.toml: {undocumented}"
    # Uncommented, the example must still be valid settings.
    setting = re.compile(r"^# ([a-z_]+ = .*)$")
    active = "\n".join(
        m.group(1)
        for line in text.splitlines()
        if (m := setting.match(line)) and not line.startswith("# token_file")
    )
    tmp = tmp_path / "example-check.toml"
    tmp.write_text(active)
    load_settings(tmp)
