"""Shared fixtures: a temporary installation directory and a real rayserver process.

Every server a test starts is stopped by a finalizer, even when the test
fails: first the server's own process group (SIGTERM, then SIGKILL), then
any process still carrying this test's unique RAYFRONT_HOME in its
environment (procwraps run in sessions of their own, so the group alone
does not reach them). Processes are only ever found by that environment
entry and ended by pid, never by name.

Tests marked ``shared_server`` get one server per test process instead
(sharedserver.py says what is put right between them); it is stopped the
same way when the process's tests are over.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from services import MARKS, in_ci, need_service

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # Tests press Ctrl-C on rayfront and the demo. A suite started in the background of a
    # script (`cmd &`, as a CI runner may) inherits SIGINT ignored, and an ignored signal
    # stays ignored across exec: every child would shrug the Ctrl-C off. A Python handler
    # here is reset to the default in each child at exec, so they get Ctrl-C again.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if not hasattr(config, "workerinput"):  # once, in the process that starts the workers
        _bytecode_cache(config)
    else:
        _own_session()


def _own_session() -> None:
    """Each xdist worker leads a session of its own, as every server it starts already does.

    Linux shares a busy machine's cpu between sessions, not processes (autogroup, on by
    default): measured beside two CPU hogs, three busy loops in one session got 0.65 of
    a cpu together. So, with all three workers (and the rayfront commands and direct
    Radiance runs they start) in the caller's one session, the suite got a third of a
    2-core machine; with a session each, the workers get a share each. The terminal's
    Ctrl-C still reaches the controller, which stops the workers (their input closes).
    """
    with contextlib.suppress(OSError):  # already a group leader: started that way
        os.setsid()


def _bytecode_cache(config: pytest.Config) -> None:
    """Let the Pythons the suite starts keep their bytecode, in a temporary folder.

    An environment may forbid writing bytecode (PYTHONDONTWRITEBYTECODE=1, as some
    images set): then each of the ~450 servers, fork servers and rayfront commands the
    suite starts compiles rayserver's ~60 modules from source again (0.1 s of cpu a
    server, measured). Writing them below a temporary PYTHONPYCACHEPREFIX instead keeps
    the checkout as clean as the setting wants; the folder goes at the end.
    """
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
        return
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="rayserver-tests-pyc-")
    os.environ.pop("PYTHONDONTWRITEBYTECODE")
    os.environ["PYTHONPYCACHEPREFIX"] = folder
    config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the groups it finds
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """One xdist worker runs every Slurm test: they share one cluster and count its cpus."""
    for item in items:
        if item.get_closest_marker("slurm") is not None:
            item.add_marker(pytest.mark.xdist_group("slurm"))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Fail at once where --dist loadgroup does not group: the grouped tests need it.

    xdist groups by a suffix (``@group``) that it adds to the node ids in each worker;
    pytest 9.2's node ids ignored it, so every group was spread over all workers without
    a word (module fixtures built once per worker, Slurm tests on several at once).
    """
    if not getattr(session.config.option, "loadgroup", False):
        return
    for item in session.items:
        if item.get_closest_marker("xdist_group") is not None and "@" not in item.nodeid:
            text = (
                f"pytest-xdist's --dist loadgroup did not group {item.nodeid} (its node id "
                f"has no @group suffix): pytest {pytest.__version__} with this pytest-xdist "
                "does not group tests (pytest-xdist issue 1386); install the versions "
                "pyproject.toml asks for"
            )
            # (A worker's error reaches the terminal only as xdist's INTERNALERROR.)
            print(f"\nERROR: {text}", file=sys.__stderr__, flush=True)
            raise pytest.UsageError(text)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked with a service (services.MARKS) skips, or fails in CI, without it."""
    for mark, service in MARKS.items():
        if item.get_closest_marker(mark) is not None:
            need_service(service)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Under CI=true every skip is a failure: .ci/run provides all a test may need."""
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = f"a skip under CI=true is a failure (.ci/run installs and starts what tests need): {reason}"


HOSTNAME = "testhost"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHome:
    """A temporary installation directory with a hosts file for this machine."""

    path: Path
    port: int
    projects: Path
    host: str = HOSTNAME

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["RAYFRONT_HOME"] = str(self.path)
        env["RAYFRONT_HOSTNAME"] = self.host
        env["RAYSERVER_BIND_RETRY_SECS"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def write_settings(self, text: str) -> None:
        (self.path / "config" / "rayserver.toml").write_text(text)

    def write_hosts(self, text: str) -> None:
        (self.path / "config" / "hosts").write_text(text)

    @property
    def log_file(self) -> Path:
        return self.path / "srvlogs" / self.host

    @property
    def pid_file(self) -> Path:
        return self.path / "srvlogs" / f"{self.host}.pid"

    def token(self) -> str | None:
        tok = self.path / "config" / "token"
        return tok.read_text().strip() if tok.exists() else None


def make_home(base: Path, cpus: int = 2, settings_extra: str = "") -> RayHome:
    home = base / "rayfront"
    (home / "config").mkdir(parents=True)
    projects = base / "projects"
    projects.mkdir()
    port = free_port()
    (home / "config" / "hosts").write_text(
        f'# test installation\n{HOSTNAME} {cpus} projects="{projects}"\nws-client 0 projects="{projects}"\n'
    )
    (home / "config" / "rayserver.toml").write_text(
        f'bind = "127.0.0.1"\nport = {port}\n{settings_extra}'
    )
    return RayHome(home, port, projects)


@pytest.fixture(scope="session")
def one_shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """This test process's shared server (sharedserver.py), for tests marked shared_server."""
    from sharedserver import SharedServer

    shared = SharedServer(tmp_path_factory.mktemp("shared"))
    yield shared
    shared.stop()


@pytest.fixture
def rayhome(request: pytest.FixtureRequest, tmp_path: Path) -> RayHome:
    from sharedserver import marked

    if marked(request.node):
        return request.getfixturevalue("one_shared_server").home()
    return make_home(tmp_path)


@dataclass
class ServerProc:
    """A rayserver process started by a test, with its output collected as it comes."""

    proc: subprocess.Popen[str]
    home: RayHome
    every_line: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None
    # A view of a shared server (sharedserver.py) shows only the lines since its test
    # began, and knows the newest job id of the tests before it.
    offset: int = 0
    jobs_before: int = 0

    @property
    def lines(self) -> list[str]:
        return self.every_line[self.offset :]

    def view(self, jobs_before: int) -> ServerProc:
        """This server as a test that starts now sees it: the same process, later lines."""
        return ServerProc(
            self.proc, self.home, self.every_line, self._reader, len(self.every_line), jobs_before
        )

    def own(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The jobs of a listing that this test submitted (all of them on a server of its own)."""
        return [j for j in jobs if j["id"] > self.jobs_before]

    def start_reader(self) -> None:
        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.every_line.append(line.rstrip("\n"))

        self._reader = threading.Thread(target=pump, daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if text in line:
                    return line
            if self.proc.poll() is not None and self._reader is not None:
                self._reader.join(1)
                for line in self.lines:
                    if text in line:
                        return line
                raise AssertionError(
                    f"server exited ({self.proc.returncode}) before printing {text!r}:\n{self.output}"
                )
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} within {timeout}s; output so far:\n{self.output}")

    def request(
        self,
        method: str,
        path: str,
        body: object | None = None,
        token: str | None | bool = True,
        timeout: float = 30.0,
    ) -> tuple[int, dict | str]:
        return http_request(self.home, method, path, body, token, timeout)


def http_request(
    home: RayHome,
    method: str,
    path: str,
    body: object | None = None,
    token: str | None | bool = True,
    timeout: float = 30.0,
) -> tuple[int, dict | str]:
    """One HTTP request to the test server; JSON answers are decoded."""
    headers = {}
    if token is True:
        tok = home.token()
        if tok:
            headers["Authorization"] = f"Bearer {tok}"
    elif isinstance(token, str):
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    return exchange(
        http.client.HTTPConnection("127.0.0.1", home.port, timeout=timeout),
        method,
        path,
        data,
        headers,
    )


def exchange(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    data: bytes | None,
    headers: dict[str, str],
) -> tuple[int, dict | str]:
    """Send one request on ``conn`` and close it; JSON answers are decoded."""
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        if resp.getheader("Content-Type", "").startswith("application/json"):
            return resp.status, json.loads(raw)
        return resp.status, raw.decode("utf-8", "replace")
    finally:
        conn.close()


def our_pids(home: Path) -> list[int]:
    """Pids of live processes whose environment carries this RAYFRONT_HOME.

    Job steps get a clean environment (no RAYFRONT_HOME): they are found by
    their HOME, the job's private folder under ``<home>/srvstate``.
    """
    marker = f"RAYFRONT_HOME={home}".encode()
    step_home = f"HOME={home}/srvstate/".encode()
    # setproctitle overwrites the environ area of titled processes (server,
    # worker, procwrap); their title names the unique home instead.
    title = f"rfcore -O {home}/".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            continue
        entries = environ.split(b"\0")
        if (
            marker in entries
            or cmdline.startswith(title)
            or any(e.startswith(step_home) for e in entries)
        ):
            found.append(int(entry.name))
    return found


def start_server(
    home: RayHome,
    *args: str,
    wait: str | None = "running.",
    extra_env: dict[str, str] | None = None,
    wrapper: tuple[str, ...] = (),
) -> ServerProc:
    """A rayserver started as ``wrapper... python -m rayserver args...``."""
    env = home.env
    if extra_env:
        env.update(extra_env)
    proc = subprocess.Popen(
        [*wrapper, sys.executable, "-m", "rayserver", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
        cwd=str(home.path.parent),
    )
    server = ServerProc(proc, home)
    server.start_reader()
    if wait:
        server.wait_for(wait)
    return server


def ready(srv: ServerProc, timeout: float = 20) -> ServerProc:
    """``srv`` once its worker answers ``GET /v1/info``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if srv.request("GET", "/v1/info", timeout=2)[0] == 200:
                return srv
        time.sleep(0.05)
    raise AssertionError(f"server never answered /v1/info:\n{srv.output}")


def stop_everything(home: RayHome, procs: list[subprocess.Popen[str]]) -> list[int]:
    """End what a test started; returns the pids that needed a SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    killed = []
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
            killed.append(proc.pid)
    # Daemons and procwraps live in sessions of their own: find them by our home.
    for _ in range(50):
        left = our_pids(home.path)
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if _ < 25 else signal.SIGKILL)
            if _ >= 25:
                killed.append(pid)
        time.sleep(0.1)
    return killed


@pytest.fixture
def server_factory(request: pytest.FixtureRequest, rayhome: RayHome) -> Iterator:
    """Start rayserver processes for a test; all are stopped when it ends."""
    from sharedserver import marked

    started: list[ServerProc] = []

    def factory(
        *args: str,
        home: RayHome | None = None,
        wait: str | None = "running.",
        extra_env: dict[str, str] | None = None,
        wrapper: tuple[str, ...] = (),
    ) -> ServerProc:
        srv = start_server(
            home or rayhome, *(args or ("-f",)), wait=wait, extra_env=extra_env, wrapper=wrapper
        )
        started.append(srv)
        return srv

    yield factory
    homes = {id(s.home): s.home for s in started}
    if not homes and not marked(request.node):
        # What the test started otherwise with its home (a daemon, say) ends too; the
        # shared server's home is not the test's to clean up (sharedserver.py).
        homes = {id(rayhome): rayhome}
    for home in homes.values():
        stop_everything(home, [s.proc for s in started if s.home is home])


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[ServerProc]:
    """A foreground rayserver on 127.0.0.1 with a temporary home, ready to answer.

    For a test marked shared_server: this test process's shared server (sharedserver.py).
    """
    from sharedserver import marked

    if not marked(request.node):
        yield ready(request.getfixturevalue("server_factory")("-f"))
        return
    request.getfixturevalue("rayhome")  # empties the projects folder first
    shared = request.getfixturevalue("one_shared_server")
    yield shared.view()
    shared.after_test()


_THREE: dict[str, Any] = {}


@pytest.fixture
def three_servers(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Three rayservers on 127.0.0.1-3 with one cpu each, shared by consecutive tests.

    Started by the first test that asks for them and stopped after the last
    test in a row that does (pytest_runtest_teardown below): starting three
    servers costs ~8 s on a busy 2-core machine, and idle they hold ~300 MB.
    The tests that share them work in project folders of their own.
    """
    from splittools import make_cluster

    if "cluster" not in _THREE:
        _THREE["cluster"] = make_cluster(tmp_path_factory.mktemp("three"), 3)
    return _THREE["cluster"]


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if "cluster" in _THREE and (
        nextitem is None or "three_servers" not in getattr(nextitem, "fixturenames", ())
    ):
        _THREE.pop("cluster").stop()
