"""Identity: -u/-g by name or number, the order of the switch, no way back, the umask.

The switch to another user needs root; those tests switch to the system's
unprivileged account (nobody and its group), creating no account, and skip
with a reason when not run as root (under CI=true they fail instead).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from supervisor import identity
from supervisor.identity import Group, IdentityError, User, switch_identity
from tests.conftest import make_home

# Switching identity needs root; the switched server needs a Python that user nobody can
# start (.ci/run makes the folders above the venv's Python searchable). Without either the
# tests skip, under CI=true they fail (services.py).
root_only = pytest.mark.root
as_nobody = pytest.mark.others


@pytest.fixture
def account():
    """The system's own unprivileged account, nobody and its group: nothing is created."""
    import grp
    import pwd

    pw = pwd.getpwnam("nobody")
    return pw, grp.getgrgid(pw.pw_gid)


@pytest.fixture
def shared_home():
    """A home outside pytest's private (0700) tmp folder, so another user can read it."""
    base = Path(tempfile.mkdtemp(prefix="rs-ident-"))
    os.chmod(base, 0o755)
    home = make_home(base)
    for path in (home.path, home.path / "config", home.projects):
        os.chmod(path, 0o755)
    yield home
    shutil.rmtree(base, ignore_errors=True)


def status_ids(pid: int) -> dict[str, list[int]]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {
        key: [int(x) for x in rest.split()]
        for key, rest in re.findall(r"^(Uid|Gid|Groups):\s*(.*)$", text, re.M)
    }


@root_only
@as_nobody
@pytest.mark.parametrize("numeric", [False, True])
def test_server_runs_as_user_and_group_for_good(
    account, shared_home, server_factory, numeric: bool
) -> None:
    pw, gr = account
    (shared_home.path / "srvlogs").mkdir(mode=0o775)
    os.chown(shared_home.path / "srvlogs", pw.pw_uid, gr.gr_gid)
    u = str(pw.pw_uid) if numeric else pw.pw_name
    g = str(gr.gr_gid) if numeric else gr.gr_name
    srv = server_factory("-f", "-u", u, "-g", g, home=shared_home)
    assert f'Rayserver running as user "{pw.pw_name}" ({pw.pw_uid}).' in srv.lines
    assert f'Rayserver running as group "{gr.gr_name}" ({gr.gr_gid}).' in srv.lines
    # Bound and log opened before the switch: the socket line comes first.
    assert srv.lines[0].startswith("render_server: adding channel")
    status, info = srv.request("GET", "/v1/info")
    assert status == 200
    for pid in (srv.proc.pid, info["pid"]):
        ids = status_ids(pid)
        assert ids["Uid"] == [pw.pw_uid] * 4 and ids["Gid"] == [gr.gr_gid] * 4
        assert set(ids["Groups"]) <= {gr.gr_gid}
        caps = re.search(r"^CapEff:\s*(\w+)$", Path(f"/proc/{pid}/status").read_text(), re.M)
        assert caps and int(caps.group(1), 16) == 0
    log = shared_home.log_file
    assert log.stat().st_uid == pw.pw_uid, "the log file is handed to the server's user"
    assert shared_home.pid_file.read_text().strip() == str(srv.proc.pid)


@root_only
def test_no_way_back_after_switch(account) -> None:
    """In a forked copy of this process: after switch_identity, os.setuid(0) fails."""
    pw, gr = account
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        result = "no-switch"
        try:
            switch_identity(User(pw.pw_name, pw.pw_uid, pw.pw_gid), Group(gr.gr_name, gr.gr_gid))
            try:
                os.setuid(0)
                result = "setuid(0) worked"
            except PermissionError:
                result = "refused"
        finally:
            os.write(wfd, result.encode())
            os._exit(0)
    os.close(wfd)
    answer = os.read(rfd, 100).decode()
    os.close(rfd)
    os.waitpid(pid, 0)
    assert answer == "refused"


@root_only
@as_nobody
def test_unprivileged_user_cannot_switch(tmp_path: Path) -> None:
    """As nobody, `-u root` and `-g root` give the manual's "Unable to run as" messages."""
    base = Path(tempfile.mkdtemp(prefix="rs-nobody-"))
    try:
        os.chmod(base, 0o777)
        home = make_home(base)
        for path in (home.path, home.path / "config"):
            os.chmod(path, 0o777)
        for args, message in (
            (["-u", "root"], 'Unable to run as user "root" (0).'),
            (["-g", "0"], 'Unable to run as group "root" (0).'),
        ):
            out = subprocess.run(
                [sys.executable, "-m", "rayserver", "-f", *args],
                env=home.env,
                capture_output=True,
                text=True,
                timeout=30,
                user="nobody",
                group="nogroup",
                extra_groups=[],
                cwd="/",
            )
            assert out.returncode == 1, out.stdout + out.stderr
            assert message in (out.stdout + out.stderr).splitlines()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_switch_order_groups_then_group_then_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ordered-call check: the OS calls are replaced (a real switch would end this process)."""
    calls: list[tuple] = []
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(os, "initgroups", lambda name, gid: calls.append(("initgroups", name, gid)))
    monkeypatch.setattr(os, "setgroups", lambda gids: calls.append(("setgroups", gids)))
    monkeypatch.setattr(os, "setresgid", lambda *a: calls.append(("setresgid", *a)))
    monkeypatch.setattr(os, "setresuid", lambda *a: calls.append(("setresuid", *a)))
    monkeypatch.setattr(identity, "_verify_no_way_back", lambda u, g: calls.append(("verify",)))
    switch_identity(User("ray", 500, 100), Group("rfusers", 101))
    assert calls == [
        ("initgroups", "ray", 101),
        ("setresgid", 101, 101, 101),
        ("setresuid", 500, 500, 500),
        ("verify",),
    ]
    calls.clear()
    switch_identity(None, Group("rfusers", 101))
    assert calls == [("setgroups", [101]), ("setresgid", 101, 101, 101), ("verify",)]


def test_verify_refuses_an_open_way_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """If setuid(0) still worked after the switch, the server must refuse (replaced call)."""
    monkeypatch.setattr(os, "setuid", lambda uid: None)
    with pytest.raises(IdentityError, match="could still setuid"):
        identity._verify_no_way_back(User("ray", 500, 100), 100)


@pytest.mark.parametrize(
    ("args", "mode"), [((), 0o664), (("-m", "027"), 0o640), (("-m", "077"), 0o600)]
)
def test_umask_applies_to_created_files(
    rayhome, server_factory, args: tuple[str, ...], mode: int
) -> None:
    srv = server_factory("-f", *args)
    log_mode = stat.S_IMODE(rayhome.log_file.stat().st_mode)
    assert log_mode == mode, oct(log_mode)
    status, info = srv.request("GET", "/v1/info")
    mask = re.search(r"^Umask:\s*(\d+)$", Path(f"/proc/{info['pid']}/status").read_text(), re.M)
    assert mask and int(mask.group(1), 8) == (0o002 if not args else int(args[1], 8))


@root_only
@as_nobody
def test_daemon_mode_switches_identity_before_detaching(account, shared_home) -> None:
    pw, gr = account
    (shared_home.path / "srvlogs").mkdir(mode=0o775)
    os.chown(shared_home.path / "srvlogs", pw.pw_uid, gr.gr_gid)
    out = subprocess.run(
        [sys.executable, "-m", "rayserver", "-u", pw.pw_name, "-g", gr.gr_name],
        env=shared_home.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    # The manual's messages, in order; timestamped log lines (e.g. the token file
    # created at first start) may stand between them on the terminal.
    lines = [line for line in out.stdout.splitlines() if not re.match(r"\d\d:\d\d:\d\d ", line)]
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert lines[1:] == [
            f'Rayserver running as user "{pw.pw_name}" ({pw.pw_uid}).',
            f'Rayserver running as group "{gr.gr_name}" ({gr.gr_gid}).',
            lines[-1],
        ]
        pid = int(re.fullmatch(r"Rayserver (\d+) switching to daemon mode\.", lines[-1])[1])
        assert status_ids(pid)["Uid"] == [pw.pw_uid] * 4
    finally:
        from tests.conftest import our_pids

        for p in our_pids(shared_home.path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, 15)
