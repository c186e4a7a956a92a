"""The rayserver command line: every error of the manual, verbatim, in a real process.

Also: start-up refusals (hosts file missing, no record for this host,
malformed line, bad settings), the platform check, and the shipped
rayserver.toml documenting every settings key with its default.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from rayserver.common.settings import Settings, settings_from_dict
from rayserver.daemon import cli
from tests.conftest import REPO, RayHome


def run_cli(home: RayHome, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rayserver", *args],
        env=home.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=home.path.parent,
    )


MISSING_UID = "4000000123"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-u", "a", "-u", "b"], "Duplicate user name argument."),
        (["-g", "a", "-g", "b"], "Duplicate group name argument."),
        (["-m", "022", "-m", "022"], "Duplicate umask argument."),
        (["-d", "-f"], "-d and -f options are mutually exclusive."),
        (["-f", "-d"], "-f and -d options are mutually exclusive."),
        (["-x"], 'Unknown option "-x".'),
        (["-f", "extra"], 'Unknown option "extra".'),
        (["-u"], 'Missing user after "-u".'),
        (["-g"], 'Missing group after "-g".'),
        (["-m"], 'Missing umask after "-m".'),
        (["-u", "-f"], 'Missing user after "-u".'),
        (["-m", "22"], "umask must be three digits between 0 and 7."),
        (["-m", "028"], "umask must be three digits between 0 and 7."),
        (["-m", "0022"], "umask must be three digits between 0 and 7."),
        (["-f", "-u", "no_such_user_rs"], 'User name "no_such_user_rs" not found.'),
        (["-f", "-u", MISSING_UID], f'User ID "{MISSING_UID}" not found.'),
        (["-f", "-g", "no_such_group_rs"], 'group name "no_such_group_rs" not found.'),
        (["-f", "-g", MISSING_UID], f'group ID "{MISSING_UID}" not found.'),
    ],
)
def test_command_line_errors_verbatim(rayhome: RayHome, args: list[str], message: str) -> None:
    out = run_cli(rayhome, *args)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [message], out.stderr
    assert out.stdout == ""
    assert not rayhome.log_file.exists(), "an argument error must not start anything"


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_prints_usage(rayhome: RayHome, flag: str) -> None:
    out = run_cli(rayhome, flag)
    assert out.returncode == 0
    assert out.stdout.startswith("usage: rayserver [-f | -d] [-u user] [-g group] [-m mask]")
    assert "-m mask   set the umask to mask (default 002)" in out.stdout


def test_repeated_same_mode_is_not_an_error() -> None:
    assert cli.parse_args(["-f", "-f"]).mode == "f"
    assert cli.parse_args([]).daemon
    assert cli.parse_args(["-m", "027"]).umask == 0o027


def test_missing_hosts_file_refuses_to_start(rayhome: RayHome) -> None:
    (rayhome.path / "config" / "hosts").unlink()
    out = run_cli(rayhome, "-f")
    assert out.returncode == 1
    assert str(rayhome.path / "config" / "hosts") in out.stderr
    assert "file not found" in out.stderr


def test_no_record_for_this_host_refuses_to_start(rayhome: RayHome) -> None:
    rayhome.write_hosts('otherhost 4 projects="/srv"\n')
    out = run_cli(rayhome, "-d")
    assert out.returncode == 1
    assert str(rayhome.path / "config" / "hosts") in out.stderr
    assert "no record for this host 'testhost'" in out.stderr


def test_malformed_hosts_line_names_file_line_and_expectation(rayhome: RayHome) -> None:
    rayhome.write_hosts('# comment\ntesthost 2 projects="/srv"\nbroken many\n')
    out = run_cli(rayhome, "-f")
    assert out.returncode == 1
    assert f"{rayhome.path / 'config' / 'hosts'}:3:" in out.stderr
    assert "is not a whole number" in out.stderr


def test_bad_settings_refuse_to_start(rayhome: RayHome) -> None:
    rayhome.write_settings('port = "high"\n')
    out = run_cli(rayhome, "-f")
    assert out.returncode == 1
    assert str(rayhome.path / "config" / "rayserver.toml") in out.stderr
    assert "port must be a whole number" in out.stderr


def test_platform_without_daemon_mode(
    rayhome: RayHome, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A platform without fork/setsid/setuid cannot exist here, so the check is replaced."""
    monkeypatch.setenv("RAYFRONT_HOME", str(rayhome.path))
    monkeypatch.setenv("RAYFRONT_HOSTNAME", "testhost")
    no = lambda: False  # noqa: E731
    for args in (["-d"], ["-f", "-u", "root"], ["-f", "-g", "root"]):
        assert cli.main(args, platform_ok=no) == 1
        assert capsys.readouterr().err.strip() == cli.PLATFORM_MESSAGE
    # Without -d the default daemon mode falls back to the foreground: with the
    # hosts file gone the start fails at the next step, after the notice.
    (rayhome.path / "config" / "hosts").unlink()
    assert cli.main([], platform_ok=no) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == cli.PLATFORM_MESSAGE
    assert "cannot start" in err[1]


def test_retry_env_must_be_a_number(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(cli.RETRY_ENV, "soon")
    assert cli._retry_secs() == cli.DEFAULT_RETRY_SECS
    assert "RAYSERVER_BIND_RETRY_SECS='soon' is not a number" in capsys.readouterr().err
    monkeypatch.setenv(cli.RETRY_ENV, "0.5")
    assert cli._retry_secs() == 0.5


def test_shipped_settings_file_documents_every_key_with_its_default() -> None:
    text = (REPO / "conf" / "rayserver.toml").read_text()
    assert tomllib.loads(text) == {}, "every key in the shipped file is commented out"
    documented = dict(re.findall(r"^# ([a-z_]+) = (.+)$", text, re.M))
    keys = {f.name for f in fields(Settings)} - {"extra"}
    assert keys <= set(documented), f"undocumented keys: {keys - set(documented)}"
    # Uncommented, the defaults shown are the real defaults (token_file and shim_local
    # have no TOML default: unset means the built-in choice).
    shown = tomllib.loads(
        "\n".join(
            f"{k} = {v}" for k, v in documented.items() if k not in ("token_file", "shim_local")
        )
    )
    assert settings_from_dict(shown) == Settings()


def test_hosts_example_parses_and_the_package_runs_as_module() -> None:
    from rayserver.common.hosts import parse_hosts

    config = parse_hosts(REPO / "conf" / "hosts.example")
    assert config.record_for("renderbox").cpus == 8  # type: ignore[union-attr]
    assert (REPO / "rayserver" / "__main__.py").exists()
    assert os.access(REPO / "conf" / "rayserver.service", os.R_OK)


def test_default_home_is_rayfront_in_the_home_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAYFRONT_HOME"}
    env["HOME"] = str(tmp_path)
    env["RAYFRONT_HOSTNAME"] = "testhost"
    out = subprocess.run(
        [sys.executable, "-m", "rayserver", "-f"],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 1
    assert str(tmp_path / "rayfront" / "config" / "hosts") in out.stderr
