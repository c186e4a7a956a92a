"""LiveConfig: first load, reload keeping the last good configuration, watching with watchdog."""

from __future__ import annotations

import logging
import time

import pytest

from rayserver.common.hosts import HostsFileError
from rayserver.common.paths import Layout
from rayserver.common.settings import SettingsError
from rayserver.server.confwatch import LiveConfig, NoHostRecordError
from tests.conftest import RayHome


def layout(home: RayHome) -> Layout:
    return Layout(home.path, home.host)


def test_first_load_and_errors(rayhome: RayHome) -> None:
    live = LiveConfig(layout(rayhome))
    assert live.record.name == "testhost" and live.record.cpus == 2
    assert live.settings.port == rayhome.port and live.generation == 0
    rayhome.write_hosts('other 1 projects="/srv"\n')
    with pytest.raises(NoHostRecordError, match="no record for this host 'testhost'"):
        LiveConfig(layout(rayhome))
    rayhome.write_hosts("testhost x\n")
    with pytest.raises(HostsFileError, match=r"hosts:1: "):
        LiveConfig(layout(rayhome))
    rayhome.write_hosts("testhost 1\n")
    rayhome.write_settings("port = [\n")
    with pytest.raises(SettingsError, match="rayserver.toml"):
        LiveConfig(layout(rayhome))


def test_reload_keeps_last_good(rayhome: RayHome, caplog: pytest.LogCaptureFixture) -> None:
    live = LiveConfig(layout(rayhome))
    rayhome.write_hosts("testhost 6\n")
    assert live.reload() is True
    assert live.generation == 1 and live.record.cpus == 6
    caplog.set_level(logging.ERROR, "rayserver.server.confwatch")
    rayhome.write_hosts("# fine\ntesthost 6 bad\n")
    assert live.reload() is False
    assert f"{rayhome.path}/config/hosts:2:" in caplog.text
    (rayhome.path / "config" / "hosts").unlink()
    assert live.reload() is False
    rayhome.write_hosts("testhost 3\n")
    rayhome.write_settings('log_level = "LOUD"\n')
    assert live.reload() is False
    assert live.generation == 1 and live.record.cpus == 6, "last good configuration kept"
    snap = live.current
    assert (snap.record, snap.settings) == (live.record, live.settings)


def test_watching_reloads_after_an_edit(rayhome: RayHome) -> None:
    live = LiveConfig(layout(rayhome), debounce=0.2)
    live.start_watching()
    try:
        for cpus in range(3, 8):  # a burst of saves: debounced into few reloads
            rayhome.write_hosts(f"testhost {cpus}\n")
        deadline = time.monotonic() + 10
        while live.record.cpus != 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live.record.cpus == 7
        assert 1 <= live.generation <= 2
        (rayhome.path / "config" / "token").write_text("x")  # not a config file: no reload
        time.sleep(0.6)
        gen = live.generation
        rayhome.write_settings('bind = "127.0.0.1"\nport = 1\n')
        deadline = time.monotonic() + 10
        while live.settings.port != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live.settings.port == 1 and live.generation == gen + 1
    finally:
        live.stop_watching()


def test_reload_if_changed_rereads_only_for_a_change_or_after_a_second(rayhome: RayHome) -> None:
    """Unknown-location requests call this: a flood must not re-parse the files each time."""
    live = LiveConfig(Layout(rayhome.path, rayhome.host))
    assert live.reload_if_changed() is False, "nothing changed a moment after loading"
    assert live.generation == 0
    hosts = rayhome.path / "config" / "hosts"
    hosts.write_text(hosts.read_text() + 'extra 1 p="/x"\n')
    assert live.reload_if_changed() is True, "an edit is read at once"
    assert live.generation == 1 and "extra" in live.hosts.records
    assert live.reload_if_changed() is False
    assert live.reload_if_changed(min_interval=0.0) is True, "after the interval: re-read"
    assert live.generation == 2
