"""Several rayservers on 127.0.0.x sharing one project directory, for split-run tests and bench.

Each server has its own installation directory (own rayserver.toml with
``name``, ``bind`` and ``port``); all include one shared hosts file whose
records are ``127.0.0.K:PORT``, and all read one shared token file. A client
installation (host ``ws-client``, 0 cpus) includes the same hosts file.
"""

from __future__ import annotations

import array
import contextlib
import http.client
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import (  # noqa: E402
    RayHome,
    ServerProc,
    exchange,
    free_port,
    start_server,
    stop_everything,
)

from rayserver.common import radiance  # noqa: E402
from rayserver.common.settings import Settings  # noqa: E402

RAYFRONT = [sys.executable, "-m", "rayserver.client.cli"]
RADIANCE_ENV = radiance.simulation_env(Settings())


@dataclass
class Cluster:
    """Servers, the client's installation and the shared project directory."""

    base: Path
    project: Path
    client: RayHome
    servers: list[ServerProc] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """The servers' records in the hosts file: ADDRESS:PORT."""
        return [f"{s.home.host}:{s.home.port}" for s in self.servers]

    def rayfront(
        self, *args: str, timeout: float = 120, stdin: str | None = None, **popen: object
    ) -> subprocess.CompletedProcess[str]:
        """rayfront run here; its standard input is ``stdin``, or /dev/null (never the test's)."""
        env = self.client.env
        env.pop("RAYFRONT_TOKEN", None)
        return subprocess.run(
            [*RAYFRONT, *args],
            cwd=str(self.project),
            env=env,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        env = self.client.env
        env.pop("RAYFRONT_TOKEN", None)
        return subprocess.Popen(
            [*RAYFRONT, *args],
            cwd=str(self.project),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    @contextlib.contextmanager
    def started(self, *args: str) -> Iterator[subprocess.Popen[str]]:
        """rayfront running in the background; killed and reaped however the test ends."""
        proc = self.popen(*args)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()

    def stop(self) -> None:
        for srv in self.servers:
            stop_everything(srv.home, [srv.proc])


def make_cluster(
    base: Path,
    count: int,
    cpus: int = 1,
    start: bool = True,
    mounts: dict[int, Path] | None = None,
    extra_records: str = "",
) -> Cluster:
    """``count`` servers on 127.0.0.1..count, each with ``cpus``; started unless told not to.

    ``mounts`` gives server K (1-based) another path for the location than the
    client's (a share that is not one); ``extra_records`` go into the hosts file.
    """
    projects = base / "projects"
    project = projects / "proj"
    project.mkdir(parents=True)
    shared = base / "shared"
    shared.mkdir()
    token = shared / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o640)
    ports = [free_port() for _ in range(count)]
    mounts = mounts or {}
    records = [
        f'127.0.0.{k + 1}:{ports[k]} {cpus} projects="{mounts.get(k + 1, projects)}"'
        for k in range(count)
    ]
    (shared / "hosts").write_text(
        "# shared by every installation of this test\n"
        + "\n".join(records)
        + f'\nws-client 0 projects="{projects}"\n{extra_records}'
    )
    homes = []
    for k in range(count):
        address = f"127.0.0.{k + 1}"
        home = base / f"srv{k + 1}"
        (home / "config").mkdir(parents=True)
        (home / "config" / "hosts").write_text(f"__include__ {shared / 'hosts'}\n")
        (home / "config" / "rayserver.toml").write_text(
            f'name = "{address}"\nbind = "{address}"\nport = {ports[k]}\ntoken_file = "{token}"\n'
        )
        homes.append(RayHome(home, ports[k], projects, host=address))
    client_home = base / "client"
    (client_home / "config").mkdir(parents=True)
    (client_home / "config" / "hosts").write_text(f"__include__ {shared / 'hosts'}\n")
    (client_home / "config" / "rayserver.toml").write_text(f'token_file = "{token}"\n')
    cluster = Cluster(base, project, RayHome(client_home, 0, projects, host="ws-client"))
    if start:
        try:
            for home in homes:
                cluster.servers.append(start_server(home, "-f"))
        except BaseException:
            cluster.stop()
            raise
    return cluster


# ---------------------------------------------------------------- a scene with work in it


def write_scene(project: Path, lights: int = 9) -> None:
    """A room lit by ``lights`` ceiling panels.

    Direct light only (``-ab 0``) with ``-dt 0`` (no random source testing) is
    deterministic, so split and single runs must agree to the byte; ``-ds``
    subdivides each panel into many shadow rays, which sets the work per ray.
    """
    lines = [
        "void plastic wall 0 0 5 .6 .6 .6 0 0",
        "void plastic floor 0 0 5 .3 .25 .2 0 0",
        "void light lamp 0 0 3 40 40 36",
    ]
    w, d, h = 6.0, 5.0, 3.0
    quads = {
        "floor": [(0, 0, 0), (0, d, 0), (w, d, 0), (w, 0, 0)],
        "ceiling": [(0, 0, h), (w, 0, h), (w, d, h), (0, d, h)],
        "south": [(0, 0, 0), (w, 0, 0), (w, 0, h), (0, 0, h)],
        "north": [(0, d, 0), (0, d, h), (w, d, h), (w, d, 0)],
        "west": [(0, 0, 0), (0, 0, h), (0, d, h), (0, d, 0)],
        "east": [(w, 0, 0), (w, d, 0), (w, d, h), (w, 0, h)],
    }
    for name, pts in quads.items():
        mat = "floor" if name == "floor" else "wall"
        coords = " ".join(f"{c:g}" for p in pts for c in p)
        lines.append(f"{mat} polygon {name} 0 0 12 {coords}")
    lines.append("wall polygon table 0 0 12 2 2 .75 4 2 .75 4 3 .75 2 3 .75")
    side = max(1, round(lights**0.5))
    for i in range(lights):
        x = 0.6 + (w - 1.2) * (i % side) / max(1, side - 1)
        y = 0.6 + (d - 1.2) * (i // side) / max(1, (lights - 1) // side)
        # A 0.4 m square panel facing down: -ds subdivides it into many shadow rays.
        corners = [(x - 0.2, y - 0.2), (x - 0.2, y + 0.2), (x + 0.2, y + 0.2), (x + 0.2, y - 0.2)]
        coords = " ".join(f"{cx:.3f} {cy:.3f} 2.95" for cx, cy in corners)
        lines.append(f"lamp polygon lamp{i} 0 0 12 {coords}")
    (project / "scene.rad").write_text("\n".join(lines) + "\n")
    (project / "room.vf").write_text(
        "rview -vtv -vp 5.6 4.6 1.6 -vd -0.75 -0.9 -0.2 -vu 0 0 1 -vh 70 -vv 55\n"
    )
    with open(project / "scene.oct", "wb") as out:
        subprocess.run(
            ["oconv", "scene.rad"], cwd=project, env=RADIANCE_ENV, stdout=out, check=True
        )


def write_points(path: Path, count: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    path.write_text(
        "".join(
            f"{rng.uniform(0.2, 5.8):.4f} {rng.uniform(0.2, 4.8):.4f} 0.8 0 0 1\n"
            for _ in range(count)
        )
    )


def run_local(
    args: list[str], cwd: Path, stdin: Path | None = None, stdout: Path | None = None
) -> None:
    """A Radiance program run here, as the reference a split run must match."""
    with (
        open(stdin, "rb") if stdin else open(os.devnull, "rb") as inp,
        open(stdout, "wb") if stdout else open(os.devnull, "wb") as out,
    ):
        subprocess.run(args, cwd=cwd, env=RADIANCE_ENV, stdin=inp, stdout=out, check=True)


def picture_values(path: Path) -> array.array:
    """Pixel brightness values, top scanline first."""
    out = subprocess.run(
        ["pvalue", "-h", "-H", "-b", "-df", str(path)],
        env=RADIANCE_ENV,
        capture_output=True,
        check=True,
    ).stdout
    return array.array("f", out)


def picture_size(path: Path) -> tuple[int, int]:
    """(width, height) from the picture's resolution line."""
    words = subprocess.run(
        ["getinfo", "-d", str(path)], env=RADIANCE_ENV, capture_output=True, text=True, check=True
    ).stdout.split()
    return int(words[words.index("+X") + 1]), int(words[words.index("-Y") + 1])


TOKEN = "split-test-token-0123456789abcdef"


def api(server: ServerProc, method: str, path: str) -> tuple[int, dict | str]:
    """A request to a cluster server on its own loopback address, with the shared token."""
    conn = http.client.HTTPConnection(server.home.host, server.home.port, timeout=10)
    return exchange(conn, method, path, None, {"Authorization": f"Bearer {TOKEN}"})


def jobs_of(server: ServerProc) -> list[dict]:
    status, page = api(server, "GET", "/v1/jobs?limit=1000")
    assert status == 200, page
    assert isinstance(page, dict)
    return page["jobs"]


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Wait for a background rayfront; its exit status and output."""
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def as_json(proc: subprocess.CompletedProcess[str]) -> dict:
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(
            f"not JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        ) from None
