"""The CI scripts (.ci/run, .ci/start-slurm), checked without letting them change the machine.

``.ci/start-slurm`` installs packages and starts daemons, so only ``.ci/run``
runs it. Here: the scripts parse (``bash -n``); every process they leave in the
background has its own session and its stdio detached (a daemon holding a test's
or a CI runner's pipe makes the reader wait for good, as the first version of
the Slurm test did for 300 s); package installs write to files, never pipes.
Run for real only where it cannot change anything: as user nobody (it gives up
before any change, or finds the cluster up), and, when a cluster is already up,
once more as root, which must be a quick no-op.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from services import need_service

CI = Path(__file__).resolve().parent.parent / ".ci"
SCRIPTS = [CI / "run", *sorted(CI.glob("start-*"))]
# Programs that stay running after the script ends, when it starts them.
DAEMONS = ("munged", "slurmctld", "slurmd", "sshd")
DETACHED = ("setsid", "</dev/null", "2>&1")


def commands(script: Path) -> list[tuple[int, str]]:
    """(line number, command) with comments dropped and continuation lines joined."""
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(script.read_text().splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((start, (pending + line).strip()))
        pending = ""
    return [(n, c) for n, c in out if c]


def starts_in_background(cmd: str) -> bool:
    if re.search(r"(?<![&>])&\)?$", cmd):  # `cmd &` or `(cmd &)`, not `2>&1` or `&&`
        return True
    return any(re.search(rf"(^|[\s/]){d}\s+-", cmd) for d in DAEMONS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script: Path) -> None:
    out = subprocess.run(
        ["bash", "-n", str(script)], stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "set -uo pipefail" in script.read_text(), f"{script.name}: set -uo pipefail"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_background_processes_are_detached(script: Path) -> None:
    """Each background start: setsid, stdin from /dev/null, stdout and stderr to a file."""
    helpers = {m[1] for m in re.finditer(r"^(\w+)\(\)\s*\{", script.read_text(), re.M)}
    found = 0
    for number, cmd in commands(script):
        if not starts_in_background(cmd):
            continue
        found += 1
        first = cmd.lstrip("(").split()[0]
        if first in helpers and not cmd.rstrip(")").endswith("&"):
            continue  # started through a helper of the script, checked as its own line
        missing = [m for m in DETACHED if m not in cmd]
        if not re.search(r"(?<![<2&])>>?\s*\S", cmd):
            missing.append(">file")
        assert not missing, f"{script.name}:{number}: {cmd!r} lacks {missing}"
    if script.name == "start-slurm":
        assert found >= 4, "the checks saw the daemon starts of start-slurm"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_package_installs_write_to_files(script: Path) -> None:
    """An install script may start its daemon: apt-get's output must never be a pipe."""
    for number, cmd in commands(script):
        if not re.search(r"(^|[;&|(!]|\bif)\s*apt-get\s+(-\S+\s+)*(install|update)\b", cmd):
            continue
        assert "$(apt-get" not in cmd and "| " not in cmd.split("apt-get", 1)[1].split("||")[0], (
            f"{script.name}:{number}: apt-get into a pipe: {cmd!r}"
        )
        assert "</dev/null" in cmd and ">" in cmd, f"{script.name}:{number}: {cmd!r}"


def run_script(script: Path, tmp_path: Path, as_nobody: bool) -> tuple[int, str]:
    """Run ``script`` with stdio in files (never pipes: it may leave daemons); (rc, output)."""
    out_path = tmp_path / "out.txt"
    env = {**os.environ, "RAYSERVER_SLURM_DIR": str(tmp_path / "slurm")}
    prefix: list[str] = []
    if as_nobody and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "util-linux's setpriv is part of every Debian"
        prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    with open(script, "rb") as src, open(out_path, "wb") as out:
        # The script comes on stdin: user nobody could not open it below a 0700 folder.
        proc = subprocess.Popen(
            [*prefix, "bash", "-s"],
            stdin=src,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd="/",
        )
        try:
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rc, out_path.read_text()


def test_start_slurm_unprivileged_gives_up_cleanly(tmp_path: Path) -> None:
    """As user nobody it can change nothing: it exits 0 saying why, or finds Slurm up."""
    rc, out = run_script(CI / "start-slurm", tmp_path, as_nobody=True)
    assert rc == 0, out
    assert "Slurm already up" in out or "not root" in out, out
    assert not (tmp_path / "slurm").exists() or "already up" in out


def slurm_pids() -> dict[str, set[int]]:
    found: dict[str, set[int]] = {"slurmctld": set(), "slurmd": set()}
    for entry in Path("/proc").iterdir():
        try:
            comm = (entry / "comm").read_text().strip() if entry.name.isdigit() else ""
        except OSError:
            continue
        if comm in found:
            found[comm].add(int(entry.name))
    return found


@pytest.mark.slurm
def test_start_slurm_again_is_a_quick_no_op(tmp_path: Path) -> None:
    """With a cluster up, a second start changes nothing: same daemons, same config."""
    need_service("root")
    conf = Path("/etc/slurm/slurm.conf")
    before, conf_before = slurm_pids(), conf.stat().st_mtime_ns
    rc, out = run_script(CI / "start-slurm", tmp_path, as_nobody=False)
    assert rc == 0 and "Slurm already up" in out, out
    assert slurm_pids() == before
    assert conf.stat().st_mtime_ns == conf_before
