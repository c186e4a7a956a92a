"""The box itself, on the real kernel: Landlock, seccomp, namespaces, limits, environment.

Every test starts real processes in a real box (rayserver.jobs.procwrap.sandbox)
and checks what the kernel let them do. The attacks through a whole server are
in test_sandbox_attacks.py. Where the kernel lacks a feature a test skips with
the reason, except with CI=true (CI runs on a kernel that has them all).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import in_ci, need_service

from rayserver.jobs.procwrap import boxprobe, kernel, landlock, limits, sandbox, seccomp

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"  # readable inside the box (under /usr)


def need(ok: bool, what: str) -> None:
    if not ok:
        if in_ci():
            pytest.fail(f"CI runs on a machine with {what}, but this one lacks it")
        pytest.skip(f"this machine lacks {what}")


@pytest.fixture(autouse=True)
def _kernel() -> None:
    need(landlock.abi_version() >= 1, "Landlock")
    need(seccomp.available(), "seccomp filters")


def run_boxed(
    how: str,
    argv: list[str],
    project: Path,
    *,
    abi: int | None = None,
    lim: sandbox.Limits | None = None,
    netns: bool = True,
    tmp: Path | None = None,
) -> tuple[int, str]:
    """(wait status, stdout+stderr) of ``argv`` run in a box that may write ``project``.

    ``how``: "threaded" (from a confined thread through prlimit, the default
    way) or "forked" (the fallback without prlimit).
    """
    write = (str(project),) + ((str(tmp),) if tmp else ())
    policy = sandbox.Policy(
        read=sandbox.SYSTEM_READ,
        write=write,
        netns=netns,
        limits=lim or sandbox.Limits(),
        threaded=how == "threaded",
    )
    box = sandbox.Box.build(policy)
    if abi is not None:  # an older ABI's ruleset on this kernel: what older kernels enforce
        box.ruleset.close()
        box.ruleset = landlock.Ruleset(abi=abi)
        box.ruleset.allow("/usr", landlock.READ)
        for path in sandbox.SYSTEM_READ[1:] + sandbox.ETC_FILES + sandbox.DEVICES_RW:
            box.ruleset.allow(path, landlock.READ | landlock.FS_WRITE_FILE)
        for path in write:
            box.ruleset.allow(path, landlock.WRITE)
        box.filter = seccomp.Filter(deny_truncate=not box.ruleset.covers_truncate)
    env = sandbox.clean_env(bin_dir="/usr/bin", raypath=".", tmpdir=str(tmp or project))
    r, w = os.pipe()
    try:
        pid = box.spawn(argv, cwd=str(project), env=env, stdin_fd=None, stdout_fd=w, stderr_fd=w)
    finally:
        os.close(w)
        box.close()
    chunks = []
    while data := os.read(r, 65536):
        chunks.append(data)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return status, b"".join(chunks).decode("utf-8", "replace")


def py(code: str) -> list[str]:
    return [SYSTEM_PYTHON, "-I", "-S", "-c", code]


@pytest.fixture(params=["threaded", "forked"])
def how(request: pytest.FixtureRequest) -> str:
    """Both ways a step is started (see sandbox.py); threaded needs util-linux's prlimit."""
    if request.param == "threaded":
        need(bool(sandbox.PRLIMIT), "util-linux's prlimit (then steps are started forked)")
    return request.param


@pytest.fixture
def place(tmp_path: Path) -> tuple[Path, Path]:
    """(project the box may write, a folder next to it holding a secret)."""
    project, outside = tmp_path / "project", tmp_path / "outside"
    project.mkdir()
    outside.mkdir()
    (outside / "token").write_text("s3cret-token\n")
    return project, outside


def test_the_probe_finds_a_usable_box_here() -> None:
    result = boxprobe.probe()
    assert result.ok, result.problems
    assert result.mechanism.startswith(f"landlock-{landlock.abi_version()}+seccomp")
    assert result.info("on")["mode"] == "on"
    assert result.info("off")["mechanism"] == "none"


def test_writes_only_inside_and_reads_no_secret(place: tuple[Path, Path], how: str) -> None:
    project, outside = place
    script = (
        f"echo in > {project}/made; echo out > {outside}/made; "
        f"cat {outside}/token; ln -s {outside}/token {project}/link; cat {project}/link; "
        f"cp {project}/link {project}/copy; cat /etc/hostname /root/.bashrc; echo end"
    )
    status, out = run_boxed(how, ["/bin/sh", "-c", script], project)
    assert os.WIFEXITED(status), out
    assert (project / "made").read_text() == "in\n"
    assert not (outside / "made").exists()
    assert "s3cret" not in out and "end" in out, out
    assert not (project / "copy").exists() or "s3cret" not in (project / "copy").read_text()
    assert out.count("Permission denied") >= 4, out


def test_a_symlink_in_the_project_cannot_redirect_a_write(
    place: tuple[Path, Path], how: str
) -> None:
    project, outside = place
    (project / "out.hdr").symlink_to(outside / "victim")
    status, out = run_boxed(how, ["/bin/sh", "-c", "echo pwned > out.hdr"], project)
    assert os.WEXITSTATUS(status) != 0, out
    assert not (outside / "victim").exists()


def test_no_socket_of_any_kind(place: tuple[Path, Path], tmp_path: Path, how: str) -> None:
    project, _ = place
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    unix_path = tmp_path / "server.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(unix_path))
    unix.listen()
    port = listener.getsockname()[1]
    code = f"""
import socket
tries = [
    ("tcp connect", lambda: socket.create_connection(("127.0.0.1", {port}), 1)),
    ("tcp bind", lambda: socket.socket().bind(("127.0.0.1", 0))),
    ("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", {port}))),
    ("unix path", lambda: socket.socket(socket.AF_UNIX).connect("{unix_path}")),
    ("abstract", lambda: socket.socket(socket.AF_UNIX).connect("\\0rayserver-test")),
]
for name, attempt in tries:
    try:
        attempt()
        print(name, "ALLOWED")
    except OSError as exc:
        print(name, "refused", exc.errno)
a, b = socket.socketpair()
print("socketpair ok")
"""
    try:
        status, out = run_boxed(how, py(code), project)
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()
        unix.close()
    assert "ALLOWED" not in out and out.count("refused") == 5, out
    assert "socketpair ok" in out, out


def test_the_environment_is_built_from_scratch(place: tuple[Path, Path], how: str) -> None:
    project, _ = place
    os.environ["RAYSERVER_TEST_SECRET"] = "leak"
    try:
        status, out = run_boxed(how, ["/usr/bin/env"], project)
    finally:
        del os.environ["RAYSERVER_TEST_SECRET"]
    names = sorted(line.split("=", 1)[0] for line in out.splitlines())
    assert names == ["HOME", "LANG", "PATH", "RAYPATH", "TMPDIR"], out


def test_older_abis_still_refuse_writes_and_truncate(place: tuple[Path, Path], how: str) -> None:
    """A ruleset of ABI 1 (no TRUNCATE right): seccomp then refuses truncate(2) itself."""
    project, outside = place
    code = f"""
import os
for what, act in [("write", lambda: open("{outside}/token", "a")),
                  ("truncate", lambda: os.truncate("{outside}/token", 0)),
                  ("inside", lambda: open("{project}/f", "w").write("ok"))]:
    try:
        act(); print(what, "ok")
    except OSError as exc:
        print(what, "refused", exc.errno)
"""
    for abi in sorted({1, 2, 3, 5, landlock.abi_version()}):
        if abi > landlock.abi_version():
            continue
        status, out = run_boxed(how, py(code), project, abi=abi)
        assert "write refused" in out and "truncate refused" in out, (abi, out)
        assert "inside ok" in out, (abi, out)
        assert (outside / "token").read_text() == "s3cret-token\n"


def test_output_size_limit_kills_with_sigxfsz(place: tuple[Path, Path], how: str) -> None:
    project, _ = place
    lim = sandbox.Limits(output_bytes=64 * 1024)
    status, out = run_boxed(
        how, ["/bin/sh", "-c", "exec head -c 1000000 /dev/zero > big"], project, lim=lim
    )
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXFSZ, (status, out)
    assert (project / "big").stat().st_size == 64 * 1024


def test_memory_rlimit_stops_a_large_allocation(place: tuple[Path, Path], how: str) -> None:
    project, _ = place
    lim = sandbox.Limits(memory_bytes=256 * 1024**2)
    code = "b = bytearray(600 * 1024 * 1024)\nprint('allocated')"
    status, out = run_boxed(how, py(code), project, lim=lim)
    assert "MemoryError" in out and "allocated" not in out, out


def test_a_failed_exec_is_reported_and_nothing_runs(place: tuple[Path, Path], how: str) -> None:
    project, outside = place
    with pytest.raises(sandbox.SandboxError, match="exec .*No such file"):
        run_boxed(how, [str(project / "missing")], project)
    # A program outside the readable folders cannot even be started (threaded:
    # prlimit's exec is refused, it says so and exits 126).
    shutil.copy("/bin/true", outside / "mytrue")
    try:
        status, out = run_boxed(how, [str(outside / "mytrue")], project)
    except sandbox.SandboxError as exc:
        assert "Permission denied" in str(exc)
    else:
        assert os.WEXITSTATUS(status) == 126 and "Permission denied" in out, (status, out)


def test_the_box_sees_no_network_device(place: tuple[Path, Path], how: str) -> None:
    project, _ = place
    if how == "threaded":
        need(os.geteuid() == 0, "root (a thread takes a network namespace only as root)")
    else:
        need(kernel.userns_available(), "unprivileged user namespaces")
    status, out = run_boxed(
        how, ["/bin/readlink", "/proc/self/ns/net", "/proc/self/ns/user"], project
    )
    inside = out.split()
    outside = [os.readlink("/proc/self/ns/net"), os.readlink("/proc/self/ns/user")]
    assert len(inside) == 2 and inside[0] != outside[0], out
    assert (inside[1] != outside[1]) == (how == "forked"), out  # a user namespace: forked only


def test_capped_log_keeps_head_and_tail(tmp_path: Path) -> None:
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    cap = limits.CappedLog(fd, 4000)
    for i in range(1000):
        cap.write(f"line {i:04d}\n".encode())
    cap.finish()
    cap.write(b"== done ==\n")
    os.close(fd)
    text = path.read_text()
    assert len(text) < 4300 and text.startswith("line 0000\n")
    assert "reached max_log_bytes (4000 bytes)" in text
    assert "bytes of output were dropped" in text
    assert text.endswith("line 0999\n== done ==\n")
    kept = [line for line in text.splitlines() if line.startswith("line ")]
    dropped = int(text.split(" bytes of output were dropped")[0].rsplit(" ", 1)[-1])
    assert dropped == (1000 - len(kept)) * 10  # whole lines of 10 bytes each


# Run in a process of its own: in the test process, children of other tests' threads
# (an xdist worker runs many) would count, and kill_descendants would kill them.
_DESCENDANTS = """
import os, subprocess, sys, time
from rayserver.jobs.procwrap import limits
code = "import os, time\\nif os.fork() == 0:\\n    os.setsid(); time.sleep(30)\\ntime.sleep(30)"
proc = subprocess.Popen([sys.executable, "-c", code], process_group=0)
try:
    found, deadline = [], time.monotonic() + 10
    while len(found) < 2 and time.monotonic() < deadline:
        found = limits.descendants(os.getpid())
        time.sleep(0.02)
    assert len(found) == 2, found
    assert limits.kill_descendants(os.getpid()) == 2
finally:
    proc.kill()
    proc.wait()
deadline = time.monotonic() + 5
while limits.descendants(os.getpid()) and time.monotonic() < deadline:
    time.sleep(0.02)
assert limits.descendants(os.getpid()) == []
print("ok")
"""


def test_descendants_include_a_process_that_left_the_group() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _DESCENDANTS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        start_new_session=True,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_no_delegated_cgroup_here_means_rlimits() -> None:
    """cgroups are v1 on this kind of machine (an empty unified v2 mount): the rlimit path."""
    own = limits.own_cgroup()
    assert limits.setup_cgroup() in ("", own)
    if not limits.delegated_cgroup():
        assert boxprobe.probe().memory_limit == "rlimit"


def test_cgroup_setup_on_a_delegated_tree(tmp_path: Path) -> None:
    """The cgroup v2 code path on a mimicked cgroupfs: a real delegated cgroup v2 with the
    memory controller cannot exist on this machine (cgroups v1), so its files are made
    in a temporary folder; the kernel's checks (moving a process) are not exercised."""
    own = tmp_path / "rayserver.service"
    own.mkdir()
    (own / "cgroup.controllers").write_text("cpu memory pids\n")
    (own / "cgroup.subtree_control").write_text("")
    assert limits.setup_cgroup(str(own)) == "" or os.geteuid() != 0  # root: needs the mark
    try:  # systemd marks a delegated cgroup so (as root: trusted.*, else user.*)
        os.setxattr(own, "trusted.delegate" if os.geteuid() == 0 else "user.delegate", b"1")
    except OSError as exc:
        if os.geteuid() == 0:
            pytest.skip(f"this file system keeps no extended attributes ({exc})")
    base = limits.setup_cgroup(str(own))
    assert base == str(own)
    assert (own / "server" / "cgroup.procs").read_text() == str(os.getpid())
    assert (own / "cgroup.subtree_control").read_text() == "+memory +pids"


def test_job_cgroup_files(tmp_path: Path) -> None:
    """memory.max and pids.max of a job's cgroup (mimicked folder, see above)."""
    (tmp_path / "job-7").mkdir()
    (tmp_path / "job-7" / "pids.max").write_text("max")
    path = limits.make_job_cgroup(str(tmp_path), 7, 2 * 1024**3, 64)
    assert Path(path, "memory.max").read_text() == str(2 * 1024**3)
    assert Path(path, "pids.max").read_text() == "64"
    Path(path, "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert limits.memory_events_oom(path) == 1


def _as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    need_service("python_for_others")  # root, and the checkout readable by nobody
    need(
        bool(shutil.which("setpriv")) and Path(SYSTEM_PYTHON).exists(), "setpriv, /usr/bin/python3"
    )
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        cwd="/",
    )


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary folder that nobody may use (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="rayserver-nobody-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_box_works_as_nobody(shared_tmp: Path) -> None:
    """An unprivileged server user: user namespace, netns, Landlock and files it owns."""
    project = shared_tmp / "p"
    code = f"""
import os
from rayserver.jobs.procwrap import boxprobe, kernel, sandbox
os.mkdir("{project}")
r = boxprobe.probe()
print("probe", r.ok, r.mechanism, r.problems)
print("userns", kernel.userns_available())
env = sandbox.clean_env(bin_dir="/usr/bin", raypath=".", tmpdir="{project}")
for threaded, script in [(True, "id -u; echo x > made"),
                         (False, "for i in $(seq 40); do sleep 2 & done; wait")]:
    box = sandbox.Box.build(sandbox.Policy(read=sandbox.SYSTEM_READ, write=("{project}",),
                            limits=sandbox.Limits(processes=20), threaded=threaded))
    print("mechanism", threaded, box.mechanism, flush=True)
    pid = box.spawn(["/bin/sh", "-c", script], cwd="{project}", env=env, stdin_fd=None,
                    stdout_fd=1, stderr_fd=2)
    print("status", os.waitpid(pid, 0)[1], flush=True)
"""
    res = _as_nobody(code)
    assert "probe True" in res.stdout, res.stdout + res.stderr
    assert (project / "made").stat().st_uid == 65534
    assert "65534" in res.stdout.splitlines(), res.stdout
    need("userns True" in res.stdout, "user namespaces for an unprivileged user")
    assert "mechanism False landlock-" in res.stdout and "+netns" in res.stdout, res.stdout
    # RLIMIT_NPROC counted in the step's own user namespace: the 20th fork fails.
    assert "fork" in res.stderr.lower() or "resource" in res.stderr.lower(), res.stderr
