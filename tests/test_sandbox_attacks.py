"""The attacks of issue 14, tried for real against a real server on 127.0.0.1, and failing.

A hostile designer writes project files (scenes with ``!`` lines, rifs,
options files) and sends jobs; a hostile client could slip past the submit
checks. So each attack is tried the way Radiance would carry it out, and the
argument-level ones are also injected straight into the job database (the
server's scheduler runs them like any job) to show that the box holds even
when the checks at submit are bypassed. Afterwards nothing may exist outside
the project, and the token may appear in no log and no project file.
Legitimate work (``!xform`` scenes, rad with an ambient file, rfluxmtx,
rcontrib -o, rtrace -n, Slurm) must still run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import RayHome, our_pids
from jobtools import BIN, SCENE, make_project, submit, wait_final
from test_slurm import slurm_cleanup  # noqa: F401 - a fixture

from rayserver.common.settings import Settings
from rayserver.jobs.jobdb import JobDB
from rayserver.jobs.procwrap import landlock, seccomp
from rayserver.server import jobspec

pytestmark = pytest.mark.shared_server

RIF = """\
ZONE = I 0 4 0 4 0 3
scene = scene.rad
view = def -vp 2 1 1.5 -vd 0 1 0 -vh 60 -vv 45
RESOLUTION = 24
QUALITY = LOW
PICTURE = pic
"""


@pytest.fixture(autouse=True)
def _kernel() -> None:
    for ok, what in ((landlock.abi_version() >= 1, "Landlock"), (seccomp.available(), "seccomp")):
        if not ok:
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI runs on a kernel with {what}, this one lacks it")
            pytest.skip(f"this kernel lacks {what}")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder next to the projects that no job may write."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "victim").write_text("original\n")
    return path


def token(home: RayHome) -> str:
    tok = home.token()
    assert tok and len(tok) >= 16
    return tok


def log_of(srv: Any, job_id: int) -> str:
    status, text = srv.request("GET", f"/v1/jobs/{job_id}/log")
    assert status == 200 and isinstance(text, str), text
    return text


def oconv(scene: str, out: str = "x.oct") -> dict[str, Any]:
    return {"program": "oconv", "args": [scene], "stdin": None, "stdout": out}


def inject(home: RayHome, project: Path, steps: list[dict[str, Any]]) -> int:
    """Queue a job straight in the server's database, past every submit check."""
    db = JobDB(home.path / "srvstate" / "jobs.sqlite3", check=False)
    resolved = [
        {"stdin": None, "stdout": None, **s, "path": str(BIN / s["program"])} for s in steps
    ]
    try:
        return db.submit(
            name="injected",
            priority=0,
            client="test: past the submit checks",
            location="projects",
            project=project.name,
            workdir=str(project),
            steps=resolved,
            env=jobspec.job_env(Settings(), []),
            project_dir=str(project),
        )
    finally:
        db.close()


def assert_nothing_leaked(home: RayHome, outside: Path, logs: list[str]) -> None:
    tok = token(home)
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_text() == "original\n"
    for text in logs:
        assert tok not in text
    for path in home.projects.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert tok.encode() not in path.read_bytes(), path


def test_commands_radiance_runs_stay_in_the_box(
    server: Any, rayhome: RayHome, outside: Path
) -> None:
    """Scene ``!`` lines (oconv runs them through sh), a hostile rif, an @options file."""
    proj = make_project(rayhome)
    tok_file = rayhome.path / "config" / "token"
    in_home = Path.home() / f"rayserver-attack-{uuid.uuid4().hex}"
    (proj / "evil.rad").write_text(
        f"!cat {tok_file}\n"
        f"!sh -c 'cat {tok_file} > stolen.txt; cp {tok_file} {outside}/stolen; echo x > {in_home}'\n"
        f"!sh -c 'echo pwned > {outside}/victim; ls {rayhome.path}/srvstate 1>&2'\n"
        f"!sh -c 'cat {rayhome.path}/srvstate/jobs.sqlite3 | head -c 100 > db.txt'\n"
        "!sh -c 'env 1>&2'\n" + SCENE
    )
    (proj / "evil.rif").write_text(
        RIF.replace("scene = scene.rad", "scene = evil.rad")
        + f"OCTREE = {outside}/evil.oct\nrender = -af {outside}/evil.amb\n"
    )
    (proj / "opts.txt").write_text(f"-ab 1 -af {outside}/opts.amb\n")
    (proj / "pts.txt").write_text("1 1 1 0 0 1\n")
    jobs = [submit(server, [oconv("evil.rad")])["id"]]
    status, body = server.request(
        "POST", "/v1/jobs", {"location": "projects", "project": "room", "rad": {"rif": "evil.rif"}}
    )
    assert status in (201, 403), body  # 403 once rad's files are checked at submit too
    jobs += [body["id"]] if status == 201 else []
    rtrace = {"program": "rtrace", "args": ["@opts.txt", "scene.oct"], "stdin": "pts.txt"}
    jobs.append(inject(rayhome, proj, [rtrace]))
    jobs.append(inject(rayhome, proj, [{"program": "rad", "args": ["evil.rif"]}]))
    logs = []
    for job in jobs:
        final = wait_final(server, job)
        assert final["state"] in ("done", "failed"), final
        logs.append(log_of(server, job))
    assert_nothing_leaked(rayhome, outside, logs)
    assert not in_home.exists()
    assert "Permission denied" in logs[0], logs[0]
    env_lines = {ln.split("=", 1)[0] for ln in logs[0].splitlines() if "=" in ln}
    assert {"HOME", "TMPDIR", "RAYPATH", "LANG", "PATH"} <= env_lines, logs[0]
    assert "RAYFRONT_HOME" not in logs[0] and "RAYSERVER_BIND_RETRY_SECS" not in logs[0]
    assert not (proj / "db.txt").exists() or (proj / "db.txt").read_bytes() == b""


def test_arguments_that_slip_past_the_checks_stay_in_the_box(
    server: Any, rayhome: RayHome, outside: Path
) -> None:
    """rad overrides quoted or with ~, rcalc -f ~/file, getinfo -c, a symlink swapped in."""
    proj = make_project(rayhome)
    tok_file = rayhome.path / "config" / "token"
    (proj / "room.rif").write_text(RIF + "INDIRECT = 1\n")
    (proj / "pts.txt").write_text("1 1 1 0 0 1\n")
    (proj / "link.amb").symlink_to(outside / "victim")
    (proj / "dangling.amb").symlink_to(outside / "new.amb")
    home_file = f"rayserver-attack-{uuid.uuid4().hex}"
    steps = [
        [{"program": "rad", "args": [f"OCTREE='{outside}/x.oct'", "room.rif"]}],
        [
            {
                "program": "rad",
                "args": [f"AMBFILE=~/{home_file}", f"PICTURE={outside}/p", "room.rif"],
            }
        ],
        [{"program": "rcalc", "args": ["-f", f"~/{home_file}", "-f", str(tok_file)]}],
        [{"program": "getinfo", "args": ["-c", "cat", str(tok_file)], "stdin": "scene.oct"}],
        [
            {
                "program": "rtrace",
                "args": ["-ab", "1", "-af", "link.amb", "scene.oct"],
                "stdin": "pts.txt",
            }
        ],
        [
            {
                "program": "rtrace",
                "args": ["-ab", "1", "-af", "dangling.amb", "scene.oct"],
                "stdin": "pts.txt",
            }
        ],
    ]
    jobs = [inject(rayhome, proj, s) for s in steps]
    logs = []
    for job in jobs:
        final = wait_final(server, job)
        assert final["state"] in ("done", "failed"), final
        logs.append(log_of(server, job))
    assert_nothing_leaked(rayhome, outside, logs)
    assert not (Path.home() / home_file).exists()
    assert not (outside / "new.amb").exists()
    assert "sandbox landlock" in logs[0], logs[0]


def test_no_network_from_a_job(server: Any, rayhome: RayHome, outside: Path) -> None:
    """connect and bind (TCP), UDP and a unix socket file, from python3 started by a scene line."""
    proj = make_project(rayhome)
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    for s in (tcp, udp):
        s.settimeout(1.0)
    (proj / "net.py").write_text(
        "import socket, sys\n"
        f"for name, act in [('connect', lambda: socket.create_connection(('127.0.0.1', {tcp.getsockname()[1]}), 2)),\n"
        "                  ('bind', lambda: socket.create_server(('127.0.0.1', 0))),\n"
        f"                  ('udp', lambda: socket.socket(2, 2).sendto(b'x', ('127.0.0.1', {udp.getsockname()[1]}))),\n"
        "                  ('munge', lambda: socket.socket(1).connect('/run/munge/munge.socket.2'))]:\n"
        "    try:\n        act(); print(name, 'ALLOWED', file=sys.stderr)\n"
        "    except OSError as exc:\n        print(name, 'refused', exc, file=sys.stderr)\n"
    )
    (proj / "net.rad").write_text("!/usr/bin/python3 -I -S net.py\n" + SCENE)
    try:
        job = submit(server, [oconv("net.rad")])["id"]
        final = wait_final(server, job)
        with pytest.raises(TimeoutError):
            tcp.accept()
        with pytest.raises(TimeoutError):
            udp.recvfrom(16)
    finally:
        tcp.close()
        udp.close()
    text = log_of(server, job)
    assert final["state"] == "done", text
    assert "ALLOWED" not in text and text.count("refused") == 4, text


def test_limits(server_factory: Any, rayhome: RayHome) -> None:
    """A 44 MB log, too many processes, too large a file, more cpus than the host has."""
    rayhome.write_settings(
        (rayhome.path / "config" / "rayserver.toml").read_text()
        + 'max_log_bytes = "2M"\nmax_job_processes = 12\nmax_output_bytes = "1M"\n'
        + 'max_job_memory = "300M"\n'
    )
    srv = server_factory("-f")
    assert _events(srv) == dict.fromkeys(LIMIT_EVENTS, 0)
    proj = make_project(rayhome)
    (proj / "loud.rad").write_text(
        "!sh -c 'yes 0123456789012345678901234567890123456789 | head -c 46000000 1>&2'\n" + SCENE
    )
    (proj / "forks.rad").write_text(
        "!sh -c 'for i in $(seq 40); do sleep 30 & done; wait'\n" + SCENE
    )
    loud = submit(srv, [oconv("loud.rad")])["id"]
    forks = submit(srv, [oconv("forks.rad", "f.oct")])["id"]
    big = submit(srv, [{"program": "cnt", "args": ["3000000"], "stdout": "big.txt"}])["id"]
    # 10 million pixels a scanline: rpict's scanline buffers need far more than 300 MB.
    wide = ["-vp", "2", "-1", "2", "-vd", "0", "1", "-0.5", "-x", "10000000", "-y", "10"]
    greedy = submit(srv, [{"program": "rpict", "args": [*wide, "-pa", "0", "scene.oct"]}])
    final = wait_final(srv, loud, timeout=120)
    text = log_of(srv, loud)
    assert final["state"] == "done", final
    assert len(text.encode()) < 2 * 1024**2 + 4096, len(text)
    assert "reached max_log_bytes" in text and "bytes of output were dropped" in text
    assert text.rstrip().endswith("==") and "0123456789" in text.splitlines()[-2]
    final = wait_final(srv, forks, timeout=60)
    assert final["state"] == "cancelled", final
    assert "max_job_processes = 12" in final["reason"], final
    assert not [p for p in our_pids(rayhome.path) if "sleep" in _cmd(p)]
    final = wait_final(srv, big)
    assert final["state"] == "failed" and "max_output_bytes" in final["reason"], final
    assert (proj / "big.txt").stat().st_size == 1024**2
    final = wait_final(srv, greedy["id"])
    # (RLIMIT_AS: rpict says it is out of memory; a memory cgroup: the OOM killer's SIGKILL)
    assert final["state"] == "failed" and "max_job_memory" in final["reason"], final
    # Each limit hit once, each counted once in GET /metrics.
    assert _events(srv) == dict.fromkeys(LIMIT_EVENTS, 1)
    status, body = srv.request(
        "POST",
        "/v1/jobs",
        {
            "location": "projects",
            "project": "room",
            "steps": [{"program": "rtrace", "args": ["-n", "64", "scene.oct"], "stdin": None}],
        },
    )
    assert status == 422 and "64 cpus" in body["error"] and "has 2" in body["error"], body


LIMIT_EVENTS = ("log_capped", "processes_limit", "file_size_limit", "memory_limit")


def _events(srv: Any) -> dict[str, float]:
    """The limit events of GET /metrics (rayserver_job_events_total) the limits test causes."""
    status, text = srv.request("GET", "/metrics")
    assert status == 200, text
    found = {}
    for line in str(text).splitlines():
        for event in LIMIT_EVENTS:
            if line.startswith(f'rayserver_job_events_total{{event="{event}"}} '):
                found[event] = float(line.rsplit(" ", 1)[1])
    return found


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_legitimate_work_still_runs(server: Any, rayhome: RayHome) -> None:
    """!xform scenes, rad with its ambient file in the project, rfluxmtx, rcontrib -o, rtrace -n 2."""
    proj = make_project(rayhome)
    (proj / "ball.rad").write_text(
        "void plastic red 0 0 5 .8 .1 .1 0 0\nred sphere b 0 0 4 1 1 .3 .3\n"
    )
    (proj / "xf.rad").write_text(SCENE + "!xform -t 1 0 0 ball.rad\n!xform -rz 30 ball.rad\n")
    (proj / "room.rif").write_text(RIF + "INDIRECT = 1\nAMBFILE = room.amb\n")
    (proj / "sky.rad").write_text(
        "#@rfluxmtx h=u u=Y\nvoid glow sky_glow 0 0 4 1 1 1 0\nsky_glow source sky 0 0 4 0 0 1 180\n"
    )
    (proj / "pts.txt").write_text("1 1 0.1 0 0 1\n2 2 0.1 0 0 1\n")
    jobs = {
        "xform": submit(server, [oconv("xf.rad", "xf.oct")]),
        "rfluxmtx": submit(
            server,
            [
                {
                    "program": "rfluxmtx",
                    "args": [
                        "-I+",
                        "-ab",
                        "1",
                        "-ad",
                        "64",
                        "-lw",
                        "1e-3",
                        "-y",
                        "2",
                        "-",
                        "sky.rad",
                        "scene.rad",
                    ],
                    "stdin": "pts.txt",
                    "stdout": "flux.dat",
                }
            ],
        ),
        "rcontrib": submit(
            server,
            [
                {
                    "program": "rcontrib",
                    "args": ["-o", "contrib_%s.dat", "-m", "bright", "-ab", "0", "scene.oct"],
                    "stdin": "pts.txt",
                }
            ],
        ),
        "rtrace": submit(
            server,
            [
                {
                    "program": "rtrace",
                    "args": ["-n", "2", "-ab", "1", "-af", "tr.amb", "scene.oct"],
                    "stdin": "pts.txt",
                    "stdout": "tr.dat",
                }
            ],
        ),
    }
    status, body = server.request(
        "POST", "/v1/jobs", {"location": "projects", "project": "room", "rad": {"rif": "room.rif"}}
    )
    assert status == 201, body
    jobs["rad"] = body
    for name, job in jobs.items():
        final = wait_final(server, job["id"], timeout=120)
        assert final["state"] == "done", (name, final, log_of(server, job["id"]))
        assert "Permission denied" not in log_of(server, job["id"]), name
    assert (proj / "xf.oct").stat().st_size > (proj / "scene.oct").stat().st_size
    assert (proj / "room.amb").stat().st_size > 0 and list(proj.glob("pic*.hdr"))
    assert len((proj / "flux.dat").read_text().split("\n\n", 1)[1].split()) == 6
    assert (proj / "contrib_bright.dat").exists() and (proj / "tr.amb").exists()
    status, info = server.request("GET", "/v1/info")
    assert info["sandbox"]["mode"] == "on", info
    assert info["sandbox"]["mechanism"].startswith("landlock-"), info
    assert info["sandbox"]["memory_limit"] in ("cgroup", "rlimit"), info


def test_sandbox_off_runs_unconfined_and_says_so(server_factory: Any, rayhome: RayHome) -> None:
    rayhome.write_settings(
        (rayhome.path / "config" / "rayserver.toml").read_text() + 'sandbox = "off"\n'
    )
    srv = server_factory("-f")
    srv.wait_for('sandbox = "off"')
    assert "UNCONFINED" in srv.output
    status, info = srv.request("GET", "/v1/info")
    assert info["sandbox"] == {**info["sandbox"], "mode": "off", "mechanism": "none"}, info
    proj = make_project(rayhome)
    job = submit(srv, [oconv("scene.rad")])["id"]
    assert wait_final(srv, job)["state"] == "done"
    assert "UNCONFINED" in log_of(srv, job).splitlines()[0]
    assert (proj / "x.oct").exists()


# A process of this test that has no Landlock: the system call answers ENOSYS, as on
# a kernel without it (a seccomp filter, the way container runtimes hide system calls).
_NO_LANDLOCK = """
import ctypes, os, struct, sys
def insn(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)
prog = insn(0x20, 0, 0, 0) + insn(0x15, 0, 1, 444) + insn(0x06, 0, 0, 0x50026) + insn(0x06, 0, 0, 0x7FFF0000)
buf = ctypes.create_string_buffer(prog, len(prog))
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0
assert libc.prctl(22, 2, ctypes.byref(Fprog(len(prog) // 8, ctypes.addressof(buf))), 0, 0) == 0
os.execv(sys.executable, [sys.executable, "-m", "rayserver", *sys.argv[1:]])
"""


def test_without_landlock_the_server_refuses_to_start(rayhome: RayHome) -> None:
    res = subprocess.run(
        [sys.executable, "-c", _NO_LANDLOCK, "-f"],
        env=rayhome.env,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "cannot confine jobs" in out and "Landlock" in out, out
    assert 'sandbox = "off"' in out and str(rayhome.path / "config" / "rayserver.toml") in out
    assert our_pids(rayhome.path) == []


@pytest.mark.slurm
def test_a_slurm_job_is_confined_too(
    rayhome: RayHome,
    server_factory: Any,
    outside: Path,
    slurm_cleanup: None,  # noqa: F811
) -> None:
    """Under Slurm the procwrap runs on the node, started by slurmd: it boxes its steps too."""
    from test_slurm import _slurm_home

    room = _slurm_home(rayhome)
    tok_file = rayhome.path / "config" / "token"
    (room / "evil.rad").write_text(
        f"!sh -c 'cat {tok_file} 1>&2; echo pwned > {outside}/victim; echo x > {outside}/new'\n"
        + SCENE
    )
    srv = server_factory("-f")
    job = submit(srv, [oconv("evil.rad")])["id"]
    final = wait_final(srv, job, timeout=90)
    text = log_of(srv, job)
    assert final["state"] == "done", (final, text)
    assert_nothing_leaked(rayhome, outside, [text])
    assert "sandbox landlock" in text.splitlines()[0] and "Permission denied" in text, text


def test_sh_steps_run_in_the_box(server: Any, rayhome: RayHome, outside: Path) -> None:
    """A shell command line as a job step (issue 16): anything a shell can do, inside the box."""
    make_project(rayhome)
    tok_file = rayhome.path / "config" / "token"
    line = (
        f"cat {tok_file}; cp {tok_file} stolen; echo pwned > {outside}/victim; "
        f"ls {rayhome.path}/srvstate; echo done-here > ok.txt"
    )
    job = submit(server, [{"sh": line}])["id"]
    final = wait_final(server, job)
    text = log_of(server, job)
    assert_nothing_leaked(rayhome, outside, [text])
    assert (rayhome.projects / "room" / "ok.txt").read_text() == "done-here\n"
    assert not (rayhome.projects / "room" / "stolen").exists()
    assert text.count("Permission denied") >= 3, (final, text)
