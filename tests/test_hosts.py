"""The hosts-file parser: records, locations, includes, libraries and every error shape."""

from __future__ import annotations

from pathlib import Path

import pytest

from rayserver.common.hosts import HostsFileError, locate, parse_hosts, parse_hosts_text

EXAMPLE = """\
# render box and two workstations sharing the project volume
renderbox   8  projects="/srv/projects"  archive="/srv/archive"
ws-anna     0  projects="/mnt/projects"
ws-ben      2  projects="/home/ben/net/projects"
__library__ radlib
"""


def test_example_records() -> None:
    cfg = parse_hosts_text(EXAMPLE)
    assert list(cfg.records) == ["renderbox", "ws-anna", "ws-ben"]
    box = cfg.records["renderbox"]
    assert box.cpus == 8 and box.locations == {
        "projects": "/srv/projects",
        "archive": "/srv/archive",
    }
    assert [r.name for r in cfg.servers()] == ["renderbox", "ws-ben"]
    assert cfg.libraries == ["radlib"]
    assert cfg.library_dirs("/srv/projects") == [Path("/srv/projects/radlib")]


def test_record_lookup_by_short_and_case_insensitive_name() -> None:
    cfg = parse_hosts_text('RenderBox.lan 4 p="/x"\n')
    assert cfg.record_for("RenderBox.lan").cpus == 4
    assert cfg.record_for("renderbox.lan").cpus == 4
    assert cfg.record_for("renderbox").cpus == 4
    assert cfg.record_for("other") is None


def test_include_splices_and_resolves_relative(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more").write_text('extra 1 p="/p"\n__library__ lib2\n')
    main = tmp_path / "hosts"
    main.write_text('a 1 p="/p"\n__include__ sub/more\nb 0\n')
    cfg = parse_hosts(main)
    assert list(cfg.records) == ["a", "extra", "b"]
    assert cfg.libraries == ["lib2"]
    assert cfg.files == [str(main), str(tmp_path / "sub" / "more")]


def test_include_loop_is_an_error_not_a_hang(tmp_path: Path) -> None:
    (tmp_path / "one").write_text("__include__ two\n")
    (tmp_path / "two").write_text("__include__ one\n")
    with pytest.raises(HostsFileError) as err:
        parse_hosts(tmp_path / "one")
    assert "include loop" in str(err.value)
    assert str(tmp_path / "one") in str(err.value)


def test_self_include_is_a_loop(tmp_path: Path) -> None:
    (tmp_path / "h").write_text("__include__ h\n")
    with pytest.raises(HostsFileError, match="include loop"):
        parse_hosts(tmp_path / "h")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("box", "missing cpu count"),
        ("box eight", "not a whole number"),
        ("box -1", "not a whole number"),
        ("box 2 projects", "expected <location>="),
        ('box 2 projects="relative/path"', "must be absolute"),
        ('box 2 projects=""', "empty path"),
        ('box 2 p="/a" p="/b"', "given twice"),
        ('box 2 p="/a', "unbalanced quotes"),
        ("__include__", "expected '__include__"),
        ("__library__ /abs", "must be relative"),
        ("__library__ ../up", "without '..'"),
        ("__frobnicate__ x", "unknown directive"),
        ("b@d 2", "bad host name"),
    ],
)
def test_malformed_lines_name_file_line_and_expectation(
    tmp_path: Path, line: str, expected: str
) -> None:
    path = tmp_path / "hosts"
    path.write_text(f"# comment\n\nok 1\n{line}\n")
    with pytest.raises(HostsFileError) as err:
        parse_hosts(path)
    assert err.value.line == 4
    assert str(err.value).startswith(f"{path}:4: ")
    assert expected in str(err.value)


def test_duplicate_host_names_both_places(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("a 1\na 2\n")
    with pytest.raises(HostsFileError, match=r"already defined at .*hosts:1"):
        parse_hosts(path)


def test_missing_file_and_missing_include(tmp_path: Path) -> None:
    with pytest.raises(HostsFileError, match="file not found"):
        parse_hosts(tmp_path / "nope")
    (tmp_path / "hosts").write_text("__include__ gone\n")
    with pytest.raises(HostsFileError) as err:
        parse_hosts(tmp_path / "hosts")
    assert err.value.line == 1 and "gone" in str(err.value) and "file not found" in str(err.value)


def test_locate_innermost_location(tmp_path: Path) -> None:
    outer = tmp_path / "vol"
    inner = outer / "nested"
    (inner / "proj" / "sub").mkdir(parents=True)
    cfg = parse_hosts_text(f'me 0 vol="{outer}" nest="{inner}"\n')
    rec = cfg.records["me"]
    assert locate(rec, inner / "proj" / "sub") == ("nest", "proj/sub")
    assert locate(rec, outer) == ("vol", ".")
    assert locate(rec, tmp_path) is None


def test_locate_through_symlinked_mount(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "p").mkdir(parents=True)
    alias = tmp_path / "alias"
    alias.symlink_to(real)
    cfg = parse_hosts_text(f'me 0 loc="{alias}"\n')
    assert locate(cfg.records["me"], real / "p") == ("loc", "p")
