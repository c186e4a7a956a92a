"""rayfront, the client: real `rayfront` processes against real rayserver processes.

Local-only decisions, error messages, the request it builds and the picture
conversion need no server; submit/status/log/cancel/run go through a real
`python -m rayserver -f` (conftest `server` fixture) with real Radiance.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from rayserver.client.connection import ClientError
from rayserver.client.context import Project
from rayserver.client.jobrequest import build_job
from rayserver.common.png import PPMError, ppm_to_png

# A test that edits the hosts file keeps a server of its own.
pytestmark = pytest.mark.shared_server

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "conf" / "demo"
RAYFRONT = [sys.executable, "-m", "rayserver.client.cli"]


def rayfront(
    home,
    *args: str,
    cwd: Path | None = None,
    host: str | None = None,
    timeout: float = 60,
    env_extra: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = home.env
    if host:
        env["RAYFRONT_HOSTNAME"] = host
    env.pop("RAYFRONT_TOKEN", None)
    if env_extra:
        env.update(env_extra)
    return subprocess.run(
        [*RAYFRONT, *args],
        cwd=str(cwd or home.projects),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def as_json(proc: subprocess.CompletedProcess[str]):
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(
            f"not JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        ) from None


def new_project(home, name: str = "p1") -> Path:
    project = home.projects / name
    shutil.copytree(DEMO, project, ignore=shutil.ignore_patterns("*.hdr", "*.oct", "*.amb"))
    return project


# ---------------------------------------------------------------- no server needed


def test_no_hosts_file_is_local_only(rayhome) -> None:
    rayhome.path.joinpath("config", "hosts").unlink()
    proc = rayfront(rayhome, "submit", "--", "rad", "demo.rif")
    assert proc.returncode == 3, proc.stderr
    assert "local only" in proc.stderr and "no hosts file" in proc.stderr
    assert str(rayhome.path / "config" / "hosts") in proc.stderr


def test_no_record_for_this_host_is_local_only(rayhome) -> None:
    proc = rayfront(rayhome, "--json", "run", "--", "rad", "demo.rif", host="stranger")
    assert proc.returncode == 3
    err = as_json(proc)
    assert "local only" in err["error"] and "'stranger'" in err["error"]
    assert "RAYFRONT_HOSTNAME" in err["error"]


def test_directory_outside_every_location_is_local_only(rayhome, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = rayfront(rayhome, "submit", "--", "rtrace", "x.oct", cwd=elsewhere)
    assert proc.returncode == 3
    assert "local only" in proc.stderr and str(elsewhere) in proc.stderr
    assert f'projects="{rayhome.projects}"' in proc.stderr  # names the locations it tried


def test_connection_refused_names_host_and_port(rayhome) -> None:
    proc = rayfront(rayhome, "status")  # nothing listens on the home's port
    assert proc.returncode == 1
    assert f"rayserver on testhost:{rayhome.port} is not answering" in proc.stderr
    assert "refused" in proc.stderr.lower()


def test_hosts_lists_servers_and_who_answers(rayhome) -> None:
    rayhome.write_hosts(
        f'testhost 2 projects="{rayhome.projects}"\n'
        f'ws-client 0 projects="{rayhome.projects}"\n'
        'renderbox.invalid 8 projects="/srv/projects"\n'
    )
    proc = rayfront(rayhome, "hosts", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["host"]: r for r in as_json(proc)["hosts"]}
    assert set(rows) == {"testhost", "renderbox.invalid"}  # the client-only record is no server
    assert rows["testhost"]["cpus"] == 2 and rows["testhost"]["address"] == "127.0.0.1"
    assert rows["renderbox.invalid"]["cpus"] == 8
    assert not rows["renderbox.invalid"]["answering"]
    assert "not answering" in rows["renderbox.invalid"]["error"]


def test_submit_needs_command_after_double_dash(rayhome) -> None:
    proc = rayfront(rayhome, "submit", "rad")
    assert proc.returncode == 2
    assert "rayfront submit -- rad" in proc.stderr or "unrecognized" in proc.stderr


def test_client_only_host_refused_as_target(rayhome) -> None:
    proc = rayfront(rayhome, "status", "--host", "ws-client")
    assert proc.returncode == 2
    assert "client only" in proc.stderr


def test_build_job_rad_shortcut_and_steps(tmp_path: Path) -> None:
    project = Project("projects", "a/b", tmp_path)
    job = build_job(project, ["rad", "-v", "room", "-N", "2", "demo.rif"], name="x", priority=5)
    assert job == {
        "location": "projects",
        "project": "a/b",
        "name": "x",
        "priority": 5,
        "rad": {"rif": "demo.rif", "options": ["-v", "room", "-N", "2"]},
    }
    # rad takes VAR=value only after the rif, which the shortcut cannot say: a plain step
    job = build_job(project, ["rad", "-n", "demo.rif", "QUALITY=Med"])
    assert "rad" not in job
    assert job["steps"] == [
        {"program": "rad", "args": ["-n", "demo.rif", "QUALITY=Med"], "stdin": None, "stdout": None}
    ]
    (tmp_path / "sub").mkdir()
    job = build_job(
        project,
        ["rtrace", "-h", "x.oct"],
        stdin=str(tmp_path / "sub" / "pts.txt"),
        stdout="out.dat",
    )
    assert job["steps"] == [
        {"program": "rtrace", "args": ["-h", "x.oct"], "stdin": "sub/pts.txt", "stdout": "out.dat"}
    ]
    assert job["name"] == "rtrace -h x.oct"


@pytest.mark.parametrize(
    ("command", "kw", "expected"),
    [
        (["rtrace"], {"stdin": "../outside.txt"}, "outside the project"),
        (["/usr/bin/rtrace"], {}, "not a path"),
        (["rad", "-v"], {}, "needs a value"),
        (["rad", "-n"], {}, "needs a rif file"),
        (["rad", "x.rif"], {"stdout": "o.hdr"}, "do not apply to rad"),
        ([], {}, "no command"),
    ],
)
def test_build_job_rejects_bad_input(tmp_path: Path, command, kw, expected) -> None:
    with pytest.raises(ClientError, match=expected):
        build_job(Project("projects", ".", tmp_path), command, **kw)


def test_token_new_writes_private_random_token(rayhome) -> None:
    first = rayfront(rayhome, "token", "new")
    assert first.returncode == 0, first.stderr
    token_file = rayhome.path / "config" / "token"
    assert str(token_file) in first.stdout and "next request" in first.stdout
    assert token_file.stat().st_mode & 0o777 == 0o640
    old = token_file.read_text().strip()
    second = rayfront(rayhome, "token", "new", "--json")
    assert as_json(second)["token_file"] == str(token_file)
    assert token_file.read_text().strip() != old and len(old) >= 32


def test_process_title_names_the_editor(rayhome) -> None:
    # A socket that accepts and never answers keeps `rayfront status` alive long enough to look.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        env = rayhome.env
        proc = subprocess.Popen(
            [*RAYFRONT, "status", "--host", f"127.0.0.1:{port}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            listener.settimeout(20)
            conn, _ = listener.accept()
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
            conn.close()
        finally:
            proc.kill()
            proc.wait(10)
            proc.stdout.close()
            proc.stderr.close()
    assert cmdline.decode() == (
        f"rfcore -O {rayhome.path}/editor/start.pyo status --host 127.0.0.1:{port}"
    )


def test_ppm_to_png_round_trip() -> None:
    pixels = bytes(range(18))  # 3 x 2 RGB pixels
    png = ppm_to_png(b"P6\n# made by a test\n3 2\n255\n" + pixels)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, colour = struct.unpack(">IIBB", png[16:26])
    assert (width, height, depth, colour) == (3, 2, 8, 2)
    idat_len = struct.unpack(">I", png[33:37])[0]
    raw = zlib.decompress(png[41 : 41 + idat_len])
    assert raw == b"\x00" + pixels[:9] + b"\x00" + pixels[9:]
    with pytest.raises(PPMError, match="expected 18"):
        ppm_to_png(b"P6 3 2 255\n" + bytes(5))
    with pytest.raises(PPMError, match="magic"):
        ppm_to_png(b"P3 3 2 255\n")


# ---------------------------------------------------------------- against a real server


def wait_state(
    server, job_id: int, states: set[str], timeout: float = 30, not_yet_ok: bool = False
) -> dict:
    deadline = time.monotonic() + timeout
    job: object = None
    while time.monotonic() < deadline:
        status, job = server.request("GET", f"/v1/jobs/{job_id}")
        if status == 404 and not_yet_ok:  # the client has not submitted it yet
            time.sleep(0.05)
            continue
        assert status == 200, job
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {states}: {job}")


@pytest.mark.shared_server(False)
def test_location_translation_between_two_mounts(server, tmp_path: Path) -> None:
    home = server.home
    # The client mounts the same volume at another path (a symlink stands in for a mount).
    alias = tmp_path / "ws-client-mnt"
    alias.symlink_to(home.projects)
    home.write_hosts(f'testhost 2 projects="{home.projects}"\nws-client 0 projects="{alias}"\n')
    new_project(home, "p1")
    client_dir = alias / "p1"
    proc = rayfront(
        home,
        "--json",
        "run",
        "--host",
        f"127.0.0.1:{home.port}",
        "--",
        "oconv",
        "materials.rad",
        "room.rad",
        cwd=client_dir,
        host="ws-client",
        env_extra={"PWD": str(client_dir)},
    )
    job = as_json(proc)
    assert proc.returncode == 0, proc.stderr
    assert (job["location"], job["project"], job["state"]) == ("projects", "p1", "done")
    db = sqlite3.connect(home.path / "srvstate" / "jobs.sqlite3")
    try:
        (workdir,) = db.execute("SELECT workdir FROM jobs WHERE id=?", (job["id"],)).fetchone()
    finally:
        db.close()
    assert Path(workdir) == (home.projects / "p1").resolve()


def test_submit_status_log_cancel_json(server) -> None:
    home = server.home
    project = new_project(home)
    sub = rayfront(
        home,
        "submit",
        "--json",
        "--name",
        "quick",
        "--priority",
        "7",
        "--",
        "oconv",
        "materials.rad",
        "room.rad",
        cwd=project,
        host="testhost",
    )
    assert sub.returncode == 0, sub.stderr
    job = as_json(sub)
    assert (job["name"], job["priority"], job["location"], job["project"]) == (
        "quick",
        7,
        "projects",
        "p1",
    )
    assert job["steps"][0]["program"] == "oconv"
    wait_state(server, job["id"], {"done", "failed"})

    one = as_json(rayfront(home, "status", str(job["id"]), "--json"))
    assert one["id"] == job["id"] and one["state"] == "done"
    table = as_json(rayfront(home, "status", "--json"))
    assert job["id"] in [j["id"] for j in table["jobs"]]
    text = rayfront(home, "status")
    assert text.returncode == 0 and "quick" in text.stdout and "STATE" in text.stdout

    log = as_json(rayfront(home, "log", str(job["id"]), "--json"))
    assert log["id"] == job["id"] and isinstance(log["log"], str)

    # A long render, cancelled while it runs.
    octree = as_json(
        rayfront(
            home,
            "submit",
            "--json",
            "--stdout",
            "big.oct",
            "--",
            "oconv",
            "materials.rad",
            "sky.rad",
            "room.rad",
            cwd=project,
        )
    )
    wait_state(server, octree["id"], {"done"})
    long = as_json(
        rayfront(
            home,
            "submit",
            "--json",
            "--stdout",
            "big.hdr",
            "--",
            "rpict",
            "-x",
            "4000",
            "-y",
            "4000",
            "-ab",
            "2",
            "-vf",
            "room.vf",
            "big.oct",
            cwd=project,
        )
    )
    wait_state(server, long["id"], {"running"})
    cancelled = rayfront(home, "cancel", str(long["id"]), "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert as_json(cancelled)["id"] == long["id"]
    assert wait_state(server, long["id"], {"cancelled", "failed", "done"})["state"] == "cancelled"
    again = rayfront(home, "cancel", str(long["id"]), "--json")
    assert again.returncode == 1 and as_json(again)["status"] == 409

    missing = rayfront(home, "status", "999999")
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr


def test_run_exits_with_the_jobs_exit_status(server) -> None:
    home = server.home
    project = new_project(home)
    proc = rayfront(home, "run", "--", "oconv", "missing.rad", cwd=project)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # oconv: system error -> 2
    # Its standard output comes back on ours (the octree header it wrote before failing);
    # every message goes to standard error.
    assert proc.stdout.startswith("#?RADIANCE\noconv missing.rad\n"), proc.stdout
    assert "failed" in proc.stderr and "exit status 2" in proc.stderr
    assert "cannot open scene file" in proc.stderr  # the log is shown while following

    ok = rayfront(home, "run", "--", "rad", "demo.rif", cwd=project)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "done" in ok.stdout and str(project / "demo_room.hdr") in ok.stdout
    assert (project / "demo_room.hdr").stat().st_size > 10000


def test_log_follow_streams_until_the_end(server) -> None:
    home = server.home
    project = new_project(home)
    job = as_json(rayfront(home, "submit", "--json", "--", "rad", "demo.rif", cwd=project))
    out: list[subprocess.CompletedProcess[str]] = []
    t = threading.Thread(target=lambda: out.append(rayfront(home, "log", "-f", str(job["id"]))))
    t.start()
    t.join(60)
    assert out and out[0].returncode == 0, out
    assert "rpict" in out[0].stdout and "100.00%" in out[0].stdout
    assert wait_state(server, job["id"], {"done"}, timeout=5)


def test_wrong_token_shows_servers_message(server) -> None:
    home = server.home
    project = new_project(home)
    proc = rayfront(
        home,
        "submit",
        "--",
        "oconv",
        "room.rad",
        cwd=project,
        env_extra={"RAYFRONT_TOKEN": "not-the-token"},
    )
    assert home.token() is not None, "the server creates its token at first start"
    assert proc.returncode == 1
    assert "HTTP 401" in proc.stderr and "refused" in proc.stderr


def test_default_host_is_first_server_and_local_is_loopback(rayhome) -> None:
    from rayserver.client.context import Context
    from rayserver.common.paths import Layout

    rayhome.write_hosts('ws-client 0 projects="/x"\nfarbox 4\ntesthost 2\n')
    ctx = Context(Layout(rayhome.path, "testhost"))
    assert (ctx.target().host, ctx.target().address) == ("farbox", "farbox")
    assert ctx.target("testhost").address == "127.0.0.1"
    assert ctx.target("10.1.2.3:9999").port == 9999
    with pytest.raises(ClientError, match="NAME:PORT"):
        ctx.target("farbox:http")


def test_commands_over_tls_check_the_host_name(server_factory, rayhome, tmp_path: Path) -> None:
    import trustme  # a test dependency (pyproject's [test])

    ca = trustme.CA()
    cert = ca.issue_cert("testhost")  # the certificate names the host, not 127.0.0.1
    pki = tmp_path / "pki"
    pki.mkdir()
    cert.private_key_and_cert_chain_pem.write_to_path(str(pki / "server.pem"))
    cert.private_key_pem.write_to_path(str(pki / "server.key"))
    ca.cert_pem.write_to_path(str(pki / "ca.pem"))
    rayhome.write_settings(
        f'bind = "127.0.0.1"\nport = {rayhome.port}\ntls_cert = "{pki / "server.pem"}"\n'
        f'tls_key = "{pki / "server.key"}"\ntls_ca = "{pki / "ca.pem"}"\n'
    )
    server_factory("-f")
    project = new_project(rayhome)
    deadline = time.monotonic() + 20
    while True:
        hosts = as_json(rayfront(rayhome, "hosts", "--json"))["hosts"]
        if hosts[0]["answering"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert hosts[0]["answering"] and hosts[0]["tls"], hosts
    run = rayfront(rayhome, "run", "--json", "--", "oconv", "materials.rad", cwd=project)
    assert run.returncode == 0 and as_json(run)["state"] == "done", run.stderr
    # Dialled by an address the certificate does not name: refused, and said so.
    wrong = rayfront(rayhome, "status", "--host", f"127.0.0.1:{rayhome.port}")
    assert wrong.returncode == 1 and "TLS handshake" in wrong.stderr, wrong.stderr


def test_run_survives_a_worker_crash(server) -> None:
    home = server.home
    project = new_project(home)
    rif = project / "demo.rif"
    rif.write_text(rif.read_text().replace("RESOLUTION = 640 480", "RESOLUTION = 3000 2250"))
    run = subprocess.Popen(
        [*RAYFRONT, "run", "--", "rad", "demo.rif"],
        cwd=str(project),
        env={k: v for k, v in home.env.items() if k != "RAYFRONT_TOKEN"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        job = wait_state(server, server.jobs_before + 1, {"running"}, not_yet_ok=True)
        workers = [pid for pid in _titled(home, "/server/start.pyo worker")]
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)  # the supervisor starts a new worker; the job goes on
        out, err = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, out + err
    assert f"job {job['id']} done, exit status 0" in out
    assert out.count("pfilt demo_room.unf") == 1  # the log resumed where it stopped, no repeats


def _titled(home, text: str) -> list[int]:
    from tests.conftest import our_pids

    found = []
    for pid in our_pids(home.path):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(pid)
    return found


@pytest.mark.parametrize(
    "args",
    [
        ["status", "abc", "--json"],
        ["--json", "log"],
        ["submit", "--json", "--priority", "500", "--", "oconv"],
    ],
)
def test_usage_errors_answer_in_json_too(rayhome, args: list[str]) -> None:
    proc = rayfront(rayhome, *args)
    assert proc.returncode == 2, proc.stderr
    answer = as_json(proc)
    assert answer["status"] is None and answer["error"].startswith("rayfront")
    assert answer["error"].split(": ", 1)[1] in proc.stderr  # the same words as the usage line
    plain = rayfront(rayhome, *[a for a in args if a != "--json"])
    assert plain.returncode == 2 and plain.stdout == ""


def test_interrupted_run_json_names_the_job_that_goes_on(server) -> None:
    home = server.home
    project = new_project(home)
    assert (
        as_json(
            rayfront(
                home,
                "run",
                "--json",
                "--stdout",
                "big.oct",
                "--",
                "oconv",
                "materials.rad",
                "room.rad",
                cwd=project,
            )
        )["state"]
        == "done"
    )
    run = subprocess.Popen(
        [
            *RAYFRONT,
            "run",
            "--json",
            "--stdout",
            "big.hdr",
            "--",
            "rpict",
            "-x",
            "4000",
            "-y",
            "4000",
            "-ab",
            "2",
            "-vf",
            "room.vf",
            "big.oct",
        ],
        cwd=str(project),
        env={k: v for k, v in home.env.items() if k != "RAYFRONT_TOKEN"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        job = wait_state(server, server.jobs_before + 2, {"running"}, not_yet_ok=True)
        time.sleep(0.5)  # let rayfront reach its log stream
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
        server.request("DELETE", f"/v1/jobs/{server.jobs_before + 2}")
    assert run.returncode == 130, out + err
    answer = json.loads(out)
    assert answer["id"] == job["id"] and "goes on" in answer["error"], answer
    assert f"rayfront cancel {job['id']}" in err
