"""Property tests: the hosts parser and the command-line parser fail only in documented ways."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rayserver.common.hosts import HostsFileError, parse_hosts_text
from rayserver.daemon import cli

CLI_MESSAGES = {
    "Duplicate user name argument.",
    "Duplicate group name argument.",
    "Duplicate umask argument.",
    "-d and -f options are mutually exclusive.",
    "-f and -d options are mutually exclusive.",
    'Missing user after "-u".',
    'Missing group after "-g".',
    'Missing umask after "-m".',
    "umask must be three digits between 0 and 7.",
}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_hosts_parser_never_fails_otherwise(text: str) -> None:
    try:
        parse_hosts_text(text.replace("__include__", "__inc__"))
    except HostsFileError as exc:
        assert exc.line is None or exc.line >= 1
        assert str(exc).startswith("<hosts>")


names = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)
paths = st.from_regex(r"/[a-z0-9/_]{0,15}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        names,
        st.tuples(st.integers(0, 64), st.dictionaries(names, paths, max_size=3)),
        min_size=1,
        max_size=5,
    )
)
def test_hosts_records_round_trip(records: dict) -> None:
    text = "\n".join(
        f"{host} {cpus} " + " ".join(f'{k}="{v}"' for k, v in locs.items())
        for host, (cpus, locs) in records.items()
    )
    config = parse_hosts_text(text)
    for host, (cpus, locs) in records.items():
        rec = config.records[host]
        assert (rec.cpus, rec.locations) == (cpus, locs)


words = st.one_of(
    st.sampled_from(
        ["-f", "-d", "-u", "-g", "-m", "-h", "--help", "022", "7", "ray", "0", "-", "--", "-fd"]
    ),
    st.text(max_size=8),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(words, max_size=8))
def test_cli_parser_raises_only_documented_errors(argv: list[str]) -> None:
    try:
        opts = cli.parse_args(argv)
    except cli.HelpRequested:
        assert "-h" in argv or "--help" in argv
    except cli.CliError as exc:
        msg = str(exc)
        assert msg in CLI_MESSAGES or (msg.startswith('Unknown option "') and msg.endswith('".'))
    else:
        assert opts.mode in (None, "f", "d") and 0 <= opts.umask <= 0o777
