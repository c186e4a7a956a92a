"""Shims (``rayfront shim DIR``): Radiance commands of make, pipes and scripts run on a
real rayserver on 127.0.0.1 through real shim scripts first on PATH, with real Radiance.
Outputs are compared byte for byte with direct runs under -ab 0 (no sampling), and the
server's job records show which commands ran there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import RayHome
from jobtools import BIN, VIEW, make_project, rad_env, rayfront, wait_final, wait_until

pytestmark = pytest.mark.shared_server

POINTS = "".join(
    f"{0.3 + 0.1 * (i % 30):.2f} {0.3 + 0.1 * (i // 30):.2f} 1 0 0 1\n" for i in range(600)
)

MAKEFILE = """\
all: grid.txt ill.txt
scene.oct: scene.rad
\toconv scene.rad > scene.oct
grid.txt: scene.oct pts.txt
\trtrace -h -ab 0 -I scene.oct < pts.txt > grid.txt
ill.txt: grid.txt
\trcalc -e '$$1=179*($$1*.265+$$2*.67+$$3*.065)' < grid.txt > ill.txt
"""


def _shims(home: RayHome, proj: Path, *extra: str) -> dict[str, str]:
    """Shims written by a real ``rayfront shim``; the environment with them first on PATH."""
    folder = proj.parent / f"shims-{proj.name}"
    proc = rayfront(home, "shim", str(folder), *extra, cwd=proj)
    assert proc.returncode == 0, proc.stderr
    assert (folder / "rtrace").is_file() and (folder / "rpict").is_file()
    env = home.env
    env.pop("RAYFRONT_TOKEN", None)
    env.pop("RAYPATH", None)  # as a tool's shell has it: the shims find Radiance's own
    env["PATH"] = f"{folder}:{env.get('PATH', '/usr/bin:/bin')}"
    env["PWD"] = str(proj)
    return env


def _jobs(srv: Any) -> list[dict[str, Any]]:
    status, page = srv.request("GET", "/v1/jobs?limit=100")
    assert status == 200, page
    return srv.own(page["jobs"])


def _direct(proj: Path, cmd: str) -> bytes:
    env = rad_env()
    env["PATH"] = f"{BIN}:{env['PATH']}"
    return subprocess.run(
        cmd, shell=True, cwd=proj, env=env, capture_output=True, check=True, timeout=60
    ).stdout


def test_make_j4_runs_the_heavy_commands_on_the_server(server: Any, rayhome: RayHome) -> None:
    proj = make_project(rayhome)
    (proj / "scene.oct").unlink()
    (proj / "pts.txt").write_text(POINTS)
    (proj / "Makefile").write_text(MAKEFILE)
    env = _shims(rayhome, proj)
    proc = subprocess.run(
        ["make", "-j", "4"], cwd=proj, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The same commands run directly, with Radiance's binaries, in a copy.
    ref = proj.parent / "ref"
    ref.mkdir()
    for name in ("scene.rad", "pts.txt"):
        (ref / name).write_bytes((proj / name).read_bytes())
    _direct(ref, "oconv scene.rad > scene.oct")
    _direct(ref, "rtrace -h -ab 0 -I scene.oct < pts.txt > grid.txt")
    _direct(ref, "rcalc -e '$1=179*($1*.265+$2*.67+$3*.065)' < grid.txt > ill.txt")
    for name in ("scene.oct", "grid.txt", "ill.txt"):
        assert (proj / name).read_bytes() == (ref / name).read_bytes(), name
    assert len((proj / "ill.txt").read_text().splitlines()) == 600
    jobs = _jobs(server)
    programs = sorted(j["steps"][0]["program"] for j in jobs)
    assert programs == ["oconv", "rtrace"]  # rcalc is cheaper locally: it ran here
    # Named by the calling tool's command line: make's shell running the recipe line.
    names = {j["steps"][0]["program"]: j["name"] for j in jobs}
    assert names["oconv"].endswith("sh -c oconv scene.rad > scene.oct"), names
    assert all(j["state"] == "done" for j in jobs), jobs


def test_pipe_from_a_shim_to_a_local_program(server: Any, rayhome: RayHome) -> None:
    proj = make_project(rayhome)
    (proj / "pts.txt").write_text(POINTS)
    env = _shims(rayhome, proj)
    cmd = "rtrace -h -ab 0 -I scene.oct < pts.txt | rcalc -e '$1=$1+$2+$3'"
    proc = subprocess.run(
        ["sh", "-c", cmd], cwd=proj, env=env, capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == _direct(proj, cmd)
    (job,) = _jobs(server)
    assert job["steps"][0]["program"] == "rtrace" and job["state"] == "done"
    assert job["name"] == f"sh -c {cmd}"  # the calling tool's command line
    # The program's exit status and messages come back too.
    bad = subprocess.run(
        ["rtrace", "-bogus", "scene.oct"], cwd=proj, env=env, capture_output=True, timeout=60
    )
    assert bad.returncode == 1 and b"command line error at '-bogus'" in bad.stderr
    assert b"==" not in bad.stderr  # the server's frame lines stay out
    # An open pipe nobody writes (Honeybee's Popen(stdin=PIPE)) goes only to readers:
    # oconv with its files named does not wait for its end.
    with subprocess.Popen(
        ["oconv", "scene.rad"], cwd=proj, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as oconv:
        out = oconv.stdout.read()  # ends when the shim ends, our stdin still open
        assert oconv.wait(60) == 0
        assert out == (proj / "scene.oct").read_bytes()


def _rpicts_in(proj: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            exe = os.readlink(entry / "exe")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if os.path.basename(exe) == "rpict" and cwd == str(proj):
            found.append(int(entry.name))
    return found


def test_ctrl_c_in_a_shimmed_rpict_cancels_its_job(server: Any, rayhome: RayHome) -> None:
    proj = make_project(rayhome)
    env = _shims(rayhome, proj)
    args = ["rpict", *VIEW, "-x", "1200", "-y", "1200", "-ab", "3", "-ad", "2048", "scene.oct"]
    with open(proj / "out.hdr", "wb") as out:
        shim = subprocess.Popen(
            args, cwd=proj, env=env, stdout=out, stderr=subprocess.PIPE, start_new_session=True
        )
    try:
        job = wait_until(
            lambda: next((j for j in _jobs(server) if j["state"] == "running"), None),
            60,
            "the shim's rpict job running",
        )
        wait_until(lambda: _rpicts_in(proj), 30, "an rpict process")
        os.killpg(shim.pid, signal.SIGINT)
        assert shim.wait(30) == 130
    finally:
        if shim.poll() is None:
            os.killpg(shim.pid, signal.SIGKILL)
            shim.wait(10)
    assert wait_final(server, job["id"], 30)["state"] == "cancelled"
    wait_until(lambda: not _rpicts_in(proj), 20, "no rpict left")


def test_outside_the_project_or_off_runs_locally(
    server: Any, rayhome: RayHome, tmp_path: Path
) -> None:
    proj = make_project(rayhome)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name in ("scene.oct", "scene.rad"):  # oconv's octree names its scene files
        (outside / name).write_bytes((proj / name).read_bytes())
    env = _shims(rayhome, proj)
    data = POINTS.encode()
    direct = subprocess.run(
        [str(BIN / "rtrace"), "-h", "-ab", "0", "scene.oct"],
        cwd=proj,
        input=data,
        env=rad_env(),
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    runs = {
        "outside": (["rtrace", "-h", "-ab", "0", str(outside / "scene.oct")], env),
        "off": (["rtrace", "-h", "-ab", "0", "scene.oct"], {**env, "RAYFRONT_SHIM": "off"}),
    }
    for label, (args, run_env) in runs.items():
        proc = subprocess.run(
            args, cwd=proj, env=run_env, input=data, capture_output=True, timeout=60
        )
        assert proc.returncode == 0, (label, proc.stderr)
        assert proc.stdout == direct, label
        messages = proc.stderr.decode()
        if label == "outside":
            assert messages.count("rayfront shim: rtrace runs locally") == 1, messages
            assert str(outside / "scene.oct") in messages and "outside the project" in messages
        else:
            assert messages == ""
    # From outside every location of the hosts file: locally, saying why.
    proc = subprocess.run(
        ["rtrace", "-h", "-ab", "0", "scene.oct"],
        cwd=outside,
        env={**env, "PWD": str(outside)},
        input=data,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout == direct
    assert (
        "runs locally" in proc.stderr.decode() and "not below any location" in proc.stderr.decode()
    )
    assert _jobs(server) == []


def test_shim_refuses_the_radiance_folder_itself(rayhome: RayHome, tmp_path: Path) -> None:
    proc = rayfront(rayhome, "shim", str(BIN), cwd=tmp_path)
    assert proc.returncode == 2 and "is the Radiance bin folder itself" in proc.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "rtrace").write_text("#!/bin/sh\necho mine\n")
    proc = rayfront(rayhome, "shim", str(tmp_path / "mine"), cwd=tmp_path)
    assert proc.returncode == 2 and "is not a shim rayfront wrote" in proc.stderr
    assert (tmp_path / "mine" / "rtrace").read_text() == "#!/bin/sh\necho mine\n"


@pytest.mark.parametrize("program", ["getinfo", "rcalc", "total"])
def test_cheap_programs_run_locally_without_a_server(
    rayhome: RayHome, tmp_path: Path, program: str
) -> None:
    proj = make_project(rayhome)
    env = _shims(rayhome, proj)
    started = time.monotonic()
    proc = subprocess.run(
        [program, "-h"] if program != "rcalc" else ["rcalc", "-e", "$1=$1*2"],
        cwd=proj,
        env=env,
        input=b"1\n2\n",
        capture_output=True,
        timeout=30,
    )
    assert time.monotonic() - started < 20
    assert b"rayfront" not in proc.stderr  # no server to talk to, and it did not try


def test_hosts_all_splits_one_rtrace_call_over_the_servers(three_servers: Any) -> None:
    cluster = three_servers
    proj = cluster.project.parent / "shim-split"
    proj.mkdir()
    from jobtools import SCENE
    from splittools import jobs_of

    (proj / "scene.rad").write_text(SCENE)
    _direct(proj, "oconv scene.rad > scene.oct")
    (proj / "pts.txt").write_text(POINTS)
    folder = cluster.base / "shims-split"
    proc = cluster.rayfront("shim", str(folder), "--hosts", "all")
    assert proc.returncode == 0, proc.stderr
    env = cluster.client.env
    env.pop("RAYFRONT_TOKEN", None)
    env.pop("RAYPATH", None)
    env.update(PATH=f"{folder}:{env['PATH']}", PWD=str(proj))
    cmd = "rtrace -h -ab 0 scene.oct < pts.txt"
    out = subprocess.run(["sh", "-c", cmd], cwd=proj, env=env, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == _direct(proj, cmd)
    used = []
    for srv in cluster.servers:
        if any(j["project"] == "shim-split" and j["state"] == "done" for j in jobs_of(srv)):
            used.append(srv.home.host)
    assert len(used) == 3, used  # one call's rays on every server
