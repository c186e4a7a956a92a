"""A regular install works: the wheel built from this tree, in a venv of its own.

What a user gets from ``pip install .``, ``pipx install`` or a wheel is the
wheel's files and entry points, not the checkout. So: copy the tracked files to
a temporary folder (building writes build/ and egg-info next to the sources),
build the wheel there (``pip wheel --no-deps --no-build-isolation``, offline),
install it with ``--no-deps`` into a fresh venv, and run ``rayfront demo`` and
``rayserver -f`` by their installed scripts from an unrelated folder with an
empty HOME. The dependencies are not downloaded again: a ``.pth`` file lets the
new venv see this venv's site-packages *after* its own, and ``.pth`` files of
that folder are not processed, so the editable rayserver of this checkout stays
invisible (the test checks the code runs from the new venv).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, our_pids


def tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=False
    )
    if out.returncode == 0 and out.stdout:
        return [f for f in out.stdout.decode().split("\0") if f]
    skip = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}
    return [
        str(p.relative_to(REPO))
        for p in REPO.rglob("*")
        if not (set(p.relative_to(REPO).parts) & skip) and (p.is_file() or p.is_symlink())
    ]


def copy_tree(dest: Path) -> Path:
    for rel in tracked_files():
        src, dst = REPO / rel, dest / rel
        if not (src.exists() or src.is_symlink()):
            continue  # deleted in the work tree, not yet committed
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    return dest


# One xdist worker runs this module: its module-scoped fixture is built once.
pytestmark = pytest.mark.xdist_group("install")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the built wheel installed; returns its bin folder."""
    base = tmp_path_factory.mktemp("install")
    src = copy_tree(base / "src")
    dist = base / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "-w", str(dist), str(src)],
        timeout=180,
    )
    wheels = list(dist.glob("rayserver-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "rayserver/client/demo_project/demo.rif" in names
    assert not any(n.startswith(("tests/", "conf/", "bench/")) for n in names), names
    venv = base / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
        + ["install", "-q", "--no-deps", "--no-index", str(wheels[0])],
        timeout=180,
    )
    site = Path(
        subprocess.check_output(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            text=True,
        ).strip()
    )
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def run(cmd: list[str], timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, **kw
    )
    assert out.returncode == 0, f"{cmd}:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture
def elsewhere(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An unrelated working folder and the bare environment of a new user there."""
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    env = {"HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    return tmp_path / "work", env


def test_the_wheel_runs_from_its_own_venv(installed: Path, elsewhere) -> None:  # noqa: ANN001
    work, env = elsewhere
    code = "import rayserver.client.demo as d; print(d.__file__, d.DEMO_SOURCE)"
    out = run([str(installed / "python"), "-c", code], timeout=60, cwd=work, env=env)
    for path in out.stdout.split():
        assert Path(path).is_relative_to(installed.parent), out.stdout  # not the checkout


@pytest.mark.timeout(150)
def test_installed_rayfront_demo_renders(installed: Path, elsewhere) -> None:  # noqa: ANN001
    work, env = elsewhere
    home = work / "demo-home"
    try:
        out = run(
            [str(installed / "rayfront"), "demo", "--json", "--home", str(home)],
            timeout=140,
            cwd=work,
            env=env,
        )
    finally:
        assert not our_pids(home), "the demo left processes running"
    result = json.loads(out.stdout)
    assert result["job"]["state"] == "done", out.stdout
    assert Path(result["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def foreground_server(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> Iterator:
    """``rayserver -f`` with its output in a file; SIGTERM, reaped, whatever happens."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_installed_rayserver_serves_in_the_foreground(installed: Path, elsewhere) -> None:  # noqa: ANN001
    work, env = elsewhere
    home = Path(env["HOME"]) / "rayfront"  # the default RAYFRONT_HOME of a new user
    (home / "config").mkdir(parents=True)
    port = free_port()
    (home / "config" / "hosts").write_text(f'{socket.gethostname()} 1 projects="{work}"\n')
    (home / "config" / "rayserver.toml").write_text(f'bind = "127.0.0.1"\nport = {port}\n')
    log = work.parent / "server.out"
    with foreground_server([str(installed / "rayserver"), "-f"], work, env, log) as proc:
        deadline = time.monotonic() + 60
        while "running." not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        hosts = run([str(installed / "rayfront"), "hosts", "--json"], timeout=60, cwd=work, env=env)
        assert str(port) in hosts.stdout, hosts.stdout
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    assert "stopped" in log.read_text(), log.read_text()
    assert not our_pids(home)
