"""Helpers shared by the tests that drive jobs through a real server: a small scene,
its octree, rpict steps, submit / status / wait calls over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import RayHome

from rayserver.common import radiance
from rayserver.common.settings import Settings

SETTINGS = Settings()
BIN = radiance.bin_dir(SETTINGS)
FINAL = ("done", "failed", "cancelled", "interrupted")
VIEW = ["-vp", "2", "-1", "2", "-vd", "0", "1", "-0.5", "-vh", "60", "-vv", "45"]
# A lamp over a floor, a wall and a ball: with -ab, rpict has real work to do.
SCENE = """\
void light bright 0 0 3 100 100 100
bright sphere lamp 0 0 4 2 2 2.5 0.3
void plastic grey 0 0 5 .6 .6 .6 0 0
grey polygon floor 0 0 12 0 0 0  4 0 0  4 4 0  0 4 0
grey polygon wall 0 0 12 0 4 0  4 4 0  4 4 3  0 4 3
grey sphere ball 0 0 4 2 2 0.5 0.5
"""


def rad_env() -> dict[str, str]:
    return radiance.simulation_env(SETTINGS)


def make_project(home: RayHome, name: str = "room") -> Path:
    """A project folder with a scene and its octree (made directly, not through the server)."""
    proj = home.projects / name
    proj.mkdir()
    (proj / "scene.rad").write_text(SCENE)
    with open(proj / "scene.oct", "wb") as out:
        subprocess.run(
            [str(BIN / "oconv"), "scene.rad"],
            cwd=proj,
            stdout=out,
            check=True,
            env=rad_env(),
            timeout=30,
        )
    return proj


def rpict(size: int, *extra: str, out: str = "out.hdr") -> dict[str, Any]:
    return {
        "program": "rpict",
        "args": [*VIEW, "-x", str(size), "-y", str(size), *extra, "scene.oct"],
        "stdin": None,
        "stdout": out,
    }


def submit(
    srv: Any,
    steps: list[dict[str, Any]],
    project: str = "room",
    location: str = "projects",
    **extra: Any,
) -> dict[str, Any]:
    status, body = srv.request(
        "POST", "/v1/jobs", {"location": location, "project": project, "steps": steps, **extra}
    )
    assert status == 201, body
    assert isinstance(body, dict)
    return body


def get(srv: Any, job_id: int, wait: float | None = None) -> dict[str, Any]:
    path = f"/v1/jobs/{job_id}" + (f"?wait={wait}" if wait else "")
    status, body = srv.request("GET", path, timeout=(wait or 0) + 30)
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def wait_final(srv: Any, job_id: int, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        job = get(srv, job_id, wait=max(0.1, min(left, 30)))
        if job["state"] in FINAL or left <= 0:
            return job


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"not within {timeout}s: {what}")


RAYFRONT = [sys.executable, "-m", "rayserver.client.cli"]


def rayfront(
    home: RayHome, *args: str, cwd: Path, timeout: float = 120, **run: Any
) -> subprocess.CompletedProcess[Any]:
    """One real ``rayfront`` process against the test home's server (text unless input is bytes)."""
    env = home.env
    env.pop("RAYFRONT_TOKEN", None)
    text = not isinstance(run.get("input"), bytes)
    return subprocess.run(
        [*RAYFRONT, *args],
        cwd=str(cwd),
        env=env,
        capture_output=True,
        text=text,
        timeout=timeout,
        check=False,
        **run,
    )


def rayfront_json(home: RayHome, *args: str, cwd: Path, **run: Any) -> dict[str, Any]:
    proc = rayfront(home, args[0], "--json", *args[1:], cwd=cwd, **run)
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(
            f"not JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        ) from None
