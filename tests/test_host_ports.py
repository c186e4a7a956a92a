"""Host records with ports and IP addresses, and the server setting ``name``.

Parsing and matching are plain unit tests. The end-to-end test starts two
real rayservers on 127.0.0.1 and 127.0.0.2 (both loopback) from separate
installation directories sharing one included hosts file, and asks them and
``rayfront hosts`` who they are.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RayHome, exchange, free_port, make_home

from rayserver.client.connection import EXIT_USAGE, ClientError
from rayserver.client.context import Context
from rayserver.common.hosts import HostsFileError, parse_hosts, parse_hosts_text, split_host
from rayserver.common.paths import Layout
from rayserver.common.settings import SettingsError, settings_from_dict
from rayserver.server.confwatch import NoHostRecordError, load_config

RAYFRONT = [sys.executable, "-m", "rayserver.client.cli"]


# ------------------------------------------------------------------ parsing


def test_records_with_ports_and_ip_addresses() -> None:
    cfg = parse_hosts_text(
        "renderbox 8\n"
        "renderbox:9183 4\n"
        "10.0.0.7:9200 2\n"
        "10.0.0.8 1\n"
        "[fe80::1]:9300 3\n"
        "[::1] 1\n"
        "::2 1\n"
    )
    got = {r.name: (r.address, r.port, r.cpus) for r in cfg.records.values()}
    assert got == {
        "renderbox": ("renderbox", None, 8),
        "renderbox:9183": ("renderbox", 9183, 4),
        "10.0.0.7:9200": ("10.0.0.7", 9200, 2),
        "10.0.0.8": ("10.0.0.8", None, 1),
        "[fe80::1]:9300": ("fe80::1", 9300, 3),
        "[::1]": ("::1", None, 1),
        "::2": ("::2", None, 1),
    }
    assert cfg.records["renderbox"].effective_port(9182) == 9182
    assert cfg.records["renderbox:9183"].effective_port(9182) == 9183


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("box:0 2", "port '0' of 'box:0' is not a whole number from 1 to 65535"),
        ("box:65536 2", "port '65536' of 'box:65536'"),
        ("box:http 2", "port 'http' of 'box:http'"),
        ("box: 2", "port '' of 'box:'"),
        ("box:91:82 2", "is not an IPv6 address"),
        (
            "::1:9183:x 2",
            "is not an IPv6 address; write an IPv6 address with a port as [address]:port",
        ),
        ("[10.0.0.1]:9183 2", "in brackets is not an IPv6 address"),
        ("[::1 2", "has no closing ']'"),
        ("[::1]9183 2", "unexpected '9183' after ']'"),
        ("b@d:9183 2", "bad host name 'b@d'"),
    ],
)
def test_bad_host_words_name_file_line_and_expectation(
    tmp_path: Path, line: str, message: str
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(f"# first\n{line}\n")
    with pytest.raises(HostsFileError) as info:
        parse_hosts(hosts)
    text = str(info.value)
    assert text.startswith(f"{hosts}:2: ")
    assert message in text
    assert "<hostname>[:<port>] <number_of_cpus>" in text


@pytest.mark.parametrize("second", ["box:9183 1", "BOX:9183 1", 'box:9183 2 a="/x"'])
def test_same_address_and_port_twice_is_refused(tmp_path: Path, second: str) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(f"box:9183 4\n{second}\n")
    with pytest.raises(
        HostsFileError,
        match=rf"{hosts}:2: .*(already defined|same address and "
        r"port as 'box:9183' at .*:1)",
    ):
        parse_hosts(hosts)


def test_same_ip_written_two_ways_with_one_port_is_refused() -> None:
    with pytest.raises(HostsFileError, match="same address and port as"):
        parse_hosts_text("[::1]:9183 1\n[0:0::1]:9183 1\n")


def test_same_address_on_other_ports_or_without_port_is_allowed() -> None:
    cfg = parse_hosts_text("box 1\nbox:9183 1\nbox:9184 1\n127.0.0.1:9183 1\n")
    assert len(cfg.records) == 4


# ----------------------------------------------------------------- matching

HOSTS = (
    "renderbox:9183 4\n"
    "renderbox 8\n"
    "renderbox:9184 2\n"
    "twin.lan:9200 1\n"
    "twin.lan:9201 1\n"
    "127.0.0.2:9300 3\n"
    "127.0.0.3 1\n"
    "[::1]:9400 5\n"
)


def test_without_port_the_record_without_port_wins() -> None:
    cfg = parse_hosts_text(HOSTS)
    assert cfg.record_for("renderbox").name == "renderbox"  # type: ignore[union-attr]
    assert cfg.record_for("RenderBox.lan").name == "renderbox"  # type: ignore[union-attr]
    # None without a port: the first in file order.
    assert cfg.record_for("twin").name == "twin.lan:9200"  # type: ignore[union-attr]


def test_full_name_finds_that_record() -> None:
    cfg = parse_hosts_text(HOSTS)
    assert cfg.record_for("renderbox:9184").cpus == 2  # type: ignore[union-attr]
    assert cfg.record_for("RENDERBOX:9183").cpus == 4  # type: ignore[union-attr]
    assert cfg.record_for("twin:9201").name == "twin.lan:9201"  # type: ignore[union-attr]
    assert cfg.record_for("[::1]:9400").cpus == 5  # type: ignore[union-attr]
    assert cfg.record_for("renderbox:9999") is None


def test_with_port_only_the_effective_port_matches() -> None:
    cfg = parse_hosts_text(HOSTS)
    find = cfg.record_for
    assert find("renderbox", port=9183).cpus == 4  # type: ignore[union-attr]
    assert find("renderbox", port=9184).cpus == 2  # type: ignore[union-attr]
    # The record without a port runs on the default port (rayserver.toml's).
    assert find("renderbox", port=9182).cpus == 8  # type: ignore[union-attr]
    assert find("renderbox", port=9500, default_port=9500).cpus == 8  # type: ignore[union-attr]
    assert find("renderbox", port=9500) is None
    assert find("twin.lan", port=9201).name == "twin.lan:9201"  # type: ignore[union-attr]
    assert find("renderbox:9183", port=9184) is None


def test_ip_addresses_match_exactly_never_by_short_name() -> None:
    cfg = parse_hosts_text(HOSTS)
    assert cfg.record_for("127.0.0.2", port=9300).cpus == 3  # type: ignore[union-attr]
    assert cfg.record_for("127.0.0.2") is not None
    # "127" is no short name of 127.0.0.3: another address does not match.
    assert cfg.record_for("127.0.0.4") is None
    assert cfg.record_for("127") is None
    assert cfg.record_for("0:0::1", port=9400).cpus == 5  # type: ignore[union-attr]
    assert cfg.record_for("::1", port=9182) is None


def test_records_built_in_code_derive_address_and_port() -> None:
    from rayserver.common.hosts import HostRecord

    rec = HostRecord("box:9183", 2)
    assert (rec.address, rec.port, rec.effective_port(1)) == ("box", 9183, 9183)
    assert split_host("[::1]:1") == ("::1", 1)


# ----------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("", ""),
        ("renderbox", "renderbox"),
        ("box.lan", "box.lan"),
        ("10.1.2.3", "10.1.2.3"),
        ("::1", "::1"),
    ],
)
def test_name_setting_accepts_names_and_addresses(value: str, stored: str) -> None:
    assert settings_from_dict({"name": value}).name == stored


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("renderbox:9183", "carries a port or brackets"),
        ("[::1]:9183", "carries a port or brackets"),
        ("[::1]", "carries a port or brackets"),
        ("b@d", "bad host name 'b@d'"),
        ("box:x", "port 'x'"),
        (9183, "name must be a string"),
    ],
)
def test_bad_name_setting_says_what_was_expected(value: object, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings_from_dict({"name": value}, "/etc/rs.toml")
    text = str(info.value)
    assert text.startswith("/etc/rs.toml: ") and message in text
    if isinstance(value, str):
        assert "expected a host name or IP address without a port" in text


def test_own_record_matched_by_name_setting_and_port(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    home.write_hosts("testhost 2\nrenderbox:9183 4\nrenderbox:9184 6\n")
    layout = Layout(home.path, "testhost")
    home.write_settings('name = "renderbox"\nport = 9184\n')
    assert load_config(layout).record.name == "renderbox:9184"
    home.write_settings("port = 9184\n")
    # No name: the machine's name, whose record has no port, so it takes 9184.
    assert load_config(layout).record.name == "testhost"
    home.write_settings('name = "renderbox"\nport = 9185\n')
    with pytest.raises(NoHostRecordError) as info:
        load_config(layout)
    text = str(info.value)
    assert "no record for this host 'renderbox' on port 9185" in text
    assert "'renderbox:9185 <number_of_cpus>" in text
    assert "set `name` in" in text
    assert "renderbox:9183" in text and "renderbox:9184" in text  # the records it has


# ------------------------------------------------------------------- client


def test_client_targets_and_server_selection(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    home.write_hosts(
        "ws-client 0\nfar:9183 2\nfar 1\n127.0.0.2:9300 1\n[::1]:9400 1\ntesthost:9500 1\n"
    )
    ctx = Context(Layout(home.path, "ws-client"))
    port = ctx.settings.port
    t = ctx.target("far:9183")
    assert (t.host, t.address, t.port) == ("far", "far", 9183)
    t = ctx.target("far")
    assert (t.host, t.address, t.port) == ("far", "far", port)
    t = ctx.target("127.0.0.2:9300")
    assert (t.host, t.address, t.port) == ("127.0.0.2", "127.0.0.2", 9300)
    t = ctx.target("[::1]:9400")
    assert (t.host, t.address, t.port) == ("::1", "::1", 9400)
    t = ctx.target("10.9.8.7")  # not in the file: dialled as given, on the settings' port
    assert (t.address, t.port) == ("10.9.8.7", port)
    t = ctx.target("[fe80::5]:9999")
    assert (t.address, t.port) == ("fe80::5", 9999)
    t = ctx.target_for(ctx.hosts.record_for("far:9183"))  # type: ignore[union-attr,arg-type]
    assert (t.address, t.port) == ("far", 9183)
    # This machine by name is dialled on the loopback; an address never is rewritten.
    own = Context(Layout(home.path, "testhost"))
    t = own.target("testhost:9500")
    assert (t.host, t.address, t.port) == ("testhost", "127.0.0.1", 9500)
    with pytest.raises(ClientError, match="client only") as info:
        ctx.target("ws-client")
    assert info.value.exit_code == EXIT_USAGE

    names = [r.name for r in ctx.server_records(None)]
    assert names == ["far:9183", "far", "127.0.0.2:9300", "[::1]:9400", "testhost:9500"]
    assert [r.name for r in ctx.server_records(["all"])] == names
    picked = ctx.server_records(["127.0.0.2", "far:9183", "far", "127.0.0.2:9300"])
    assert [r.name for r in picked] == ["127.0.0.2:9300", "far:9183", "far"]
    with pytest.raises(ClientError) as info:
        ctx.server_records(["far", "nobox"])
    assert info.value.exit_code == EXIT_USAGE
    assert "'nobox' is not a server of the hosts file" in str(info.value)
    assert "far:9183, far, 127.0.0.2:9300" in str(info.value)
    with pytest.raises(ClientError, match="'ws-client' has 0 cpus .* client only"):
        ctx.server_records(["ws-client"])


# -------------------------------------------------- two servers, one machine


def _home(base: Path, shared: Path, settings: str) -> RayHome:
    base.mkdir()
    home = make_home(base)
    home.write_hosts(f"# this installation's records are shared\n__include__ {shared}\n")
    home.write_settings(settings)
    return home


def _info(address: str, port: int) -> dict:
    deadline = time.monotonic() + 20
    while True:
        try:
            status, body = exchange(
                http.client.HTTPConnection(address, port, timeout=5), "GET", "/v1/info", None, {}
            )
            assert status == 200, body
            assert isinstance(body, dict)
            return body
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_two_servers_on_one_machine(tmp_path: Path, server_factory) -> None:
    p1, p2, p3 = free_port(), free_port(), free_port()
    shared = tmp_path / "hosts.shared"
    projects = tmp_path / "shared-projects"
    projects.mkdir()
    shared.write_text(
        f'127.0.0.1:{p1} 1 projects="{projects}"\n'
        f'127.0.0.2:{p2} 1 projects="{projects}"\n'
        f'ws-client 0 projects="{projects}"\n'
    )
    # RAYFRONT_HOSTNAME stays "testhost" (no record): the `name` setting must win.
    one = _home(tmp_path / "one", shared, f'bind = "127.0.0.1"\nport = {p1}\nname = "127.0.0.1"\n')
    two = _home(tmp_path / "two", shared, f'bind = "127.0.0.2"\nport = {p2}\nname = "127.0.0.2"\n')
    assert one.env["RAYFRONT_HOSTNAME"] == two.env["RAYFRONT_HOSTNAME"] == "testhost"
    server_factory("-f", home=one)
    server_factory("-f", home=two)
    info1, info2 = _info("127.0.0.1", p1), _info("127.0.0.2", p2)
    assert (info1["name"], info1["hostname"], info1["cpus"]) == (f"127.0.0.1:{p1}", "testhost", 1)
    assert (info2["name"], info2["hostname"]) == (f"127.0.0.2:{p2}", "testhost")
    assert info1["pid"] != info2["pid"]

    # A third server whose name and port have no record refuses to start.
    three = _home(
        tmp_path / "three", shared, f'bind = "127.0.0.1"\nport = {p3}\nname = "127.0.0.1"\n'
    )
    refused = server_factory("-f", home=three, wait=None)
    assert refused.proc.wait(timeout=20) == 1
    refused.wait_for("no record")
    out = refused.output
    assert f"no record for this host '127.0.0.1' on port {p3}" in out
    assert f"'127.0.0.1:{p3} <number_of_cpus>" in out
    assert f"set `name` in {three.path / 'config' / 'rayserver.toml'}" in out
    assert f"127.0.0.1:{p1} ({shared}:1)" in out

    # A workstation of the same installation sees both, each on its address and port.
    client = _home(tmp_path / "client", shared, "")
    env = client.env | {"RAYFRONT_HOSTNAME": "ws-client"}
    proc = subprocess.run(
        [*RAYFRONT, "hosts", "--json"],
        env=env,
        cwd=str(projects),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {row["host"]: row for row in json.loads(proc.stdout)["hosts"]}
    assert set(rows) == {f"127.0.0.1:{p1}", f"127.0.0.2:{p2}"}
    for name, address, port in (
        (f"127.0.0.1:{p1}", "127.0.0.1", p1),
        (f"127.0.0.2:{p2}", "127.0.0.2", p2),
    ):
        row = rows[name]
        assert (row["address"], row["port"], row["answering"]) == (address, port, True), row
        assert row["info"]["name"] == name
