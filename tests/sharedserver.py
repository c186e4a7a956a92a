"""One rayserver per test process, shared by the tests marked ``shared_server``.

Starting a server costs about 0.55 s of cpu (supervisor 0.12, worker 0.36, fork
server 0.1: measured); the ~260 starts were a third of the suite's cpu. A test that only asks a
server things (submits, probes, streams, reads jobs) does not need its own:
marked ``shared_server`` (on the test or its module; ``shared_server(False)``
takes one test back out), a test using the ``server`` fixture gets this
process's shared server, and its ``rayhome`` is that server's home.

What one test could leave for the next is put right, or refused, between
tests:

- the projects folder is emptied before each test, so every test makes its
  own ``room`` (and whatever else) afresh;
- a job still queued or running at the end is cancelled and waited for;
- the configuration (hosts, settings, token) must be as it was: a test that
  edits it fails and the server is replaced, since such a test needs a
  server of its own;
- a server that died (a test killed it) is stopped for good and replaced;
- ``server.lines`` and ``server.output`` show only the lines since the test
  began, and ``server.own(jobs)`` keeps the jobs of a listing that the test
  submitted; the log file and the job ids do carry on (tests that read the
  whole log keep their own server).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import RayHome, ServerProc, make_home, ready, start_server, stop_everything

NON_FINAL = "queued,running"


def marked(node: pytest.Item) -> bool:
    """Whether the test gets the shared server: it uses the ``server`` fixture and its
    closest ``shared_server`` mark says so (a test that starts its servers itself, from
    its ``rayhome``, keeps a home of its own even in a marked module)."""
    mark = node.get_closest_marker("shared_server")
    return (
        mark is not None
        and (not mark.args or bool(mark.args[0]))
        and "server" in getattr(node, "fixturenames", ())
    )


class SharedServer:
    """The shared server of one test process: started at first use, replaced when spoiled."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.generation = 0
        self.srv: ServerProc | None = None
        self.config: dict[Path, bytes] = {}

    def home(self) -> RayHome:
        """The home for a test that starts now: the server running, its projects folder empty."""
        srv = self._running()
        for entry in srv.home.projects.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return srv.home

    def view(self) -> ServerProc:
        srv = self._running()
        status, page = srv.request("GET", "/v1/jobs?limit=1")
        assert status == 200, page
        jobs = page["jobs"]  # type: ignore[index]
        return srv.view(jobs[0]["id"] if jobs else 0)

    def after_test(self) -> None:
        """Put right what a test left; raises (after replacing the server) for what it must not."""
        srv = self.srv
        if srv is None:
            return
        if srv.proc.poll() is not None:
            self.stop()
            raise AssertionError(
                "the shared server stopped during the test; a test that stops or kills "
                "its server needs its own: mark it shared_server(False)"
            )
        changed = [p.name for p, data in self.config.items() if _read(p) != data]
        if changed:
            self.stop()
            raise AssertionError(
                f"the test changed the shared server's {', '.join(changed)}; a test that "
                "edits the configuration needs a server of its own: mark it shared_server(False)"
            )
        self._end_jobs(srv)

    def stop(self) -> None:
        if self.srv is not None:
            stop_everything(self.srv.home, [self.srv.proc])
            self.srv = None

    def _running(self) -> ServerProc:
        if self.srv is not None and self.srv.proc.poll() is None:
            return self.srv
        self.stop()
        self.generation += 1
        home = make_home(self.base / f"server{self.generation}")
        self.srv = ready(start_server(home, "-f"))
        cfg = home.path / "config"
        self.config = {p: _read(p) for p in (cfg / "hosts", cfg / "rayserver.toml", cfg / "token")}
        return self.srv

    def _end_jobs(self, srv: ServerProc) -> None:
        """Cancel what is still queued or running and wait until it has ended."""
        deadline = time.monotonic() + 60
        while True:
            status, body = srv.request("GET", f"/v1/jobs?state={NON_FINAL}&limit=100")
            assert status == 200, body
            jobs: list[dict[str, Any]] = body["jobs"]  # type: ignore[index]
            if not jobs:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"jobs of the test did not end when cancelled: {jobs}")
            for job in jobs:
                srv.request("DELETE", f"/v1/jobs/{job['id']}")
            time.sleep(0.1)


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""
