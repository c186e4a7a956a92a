"""An lbt-recipes recipe end to end through its own runner (queenbee-local, luigi) with the
shims first on PATH, against the same recipe with the real Radiance, on a real rayserver
on 127.0.0.1 (issue 16).

The daylight-factor recipe's steps run ``honeybee-radiance ...`` commands, which call
oconv, rtrace and rcalc through a shell with PATH as given. queenbee-local runs each step
in a folder of its own below ``--debug`` (the system's temp folder otherwise, which lies in
no location): the test gives it one inside the project, as docs/tools.md tells users.

``-aa 0 -u-`` (no ambient cache, Radiance's fixed random sequence) makes the ray trace
repeat itself exactly, so the daylight factors are compared byte for byte. The recipe ends
with a traceback of its own (lbt_recipes/daylight_factor/run.py subtracts an aware from a
naive datetime when it prints the duration), with or without shims, and still exits 0:
the test checks the exit status and the results, not the runner's last words.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import RayHome
from hbstudy import study_model
from jobtools import BIN, rayfront

PARAMS = "-ab 2 -ad 512 -as 128 -aa 0 -lw 1e-4 -u-"
VENV_BIN = Path(sys.executable).parent

if any(importlib.util.find_spec(m) is None for m in ("lbt_recipes", "queenbee_local")):
    if os.environ.get("CI") == "true":
        raise RuntimeError("lbt-recipes is missing in CI: .ci/run installs '.[tools]'")
    pytest.skip(
        "lbt-recipes and queenbee-local are not installed (pip install -e '.[test,tools]')",
        allow_module_level=True,
    )

# Its two recipe runs mostly wait on luigi's scheduler: let them overlap other tests.
pytestmark = pytest.mark.xdist_group("recipe")


def _start(folder: Path, path: list[Path], env: dict[str, str]) -> subprocess.Popen[str]:
    """``lbt-recipes run daylight-factor`` in ``folder`` with ``path`` before the venv's bin."""
    folder.mkdir()
    model = study_model()
    (folder / "model.hbjson").write_text(json.dumps(model.to_dict()))
    inputs = {"model": "model.hbjson", "radiance-parameters": PARAMS}
    (folder / "inputs.json").write_text(json.dumps(inputs))
    (folder / "steps").mkdir()
    command = ["lbt-recipes", "run", "daylight-factor", "inputs.json", "-w", "2"]
    return subprocess.Popen(
        [*command, "-p", str(folder), "-d", str(folder / "steps")],
        cwd=folder,
        env={**env, "PATH": os.pathsep.join(map(str, [*path, VENV_BIN, "/usr/bin", "/bin"]))},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _result(proc: subprocess.Popen[str], folder: Path) -> bytes:
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    result = folder / "daylight_factor" / "results" / "Office.res"
    assert proc.returncode == 0 and result.exists(), out[-3000:]
    return result.read_bytes()


@pytest.mark.slow
def test_daylight_factor_recipe_runs_its_rays_on_the_server(server: Any, rayhome: RayHome) -> None:
    shims = rayhome.projects.parent / "shims"
    made = rayfront(rayhome, "shim", str(shims), cwd=rayhome.projects)
    assert made.returncode == 0, made.stderr
    env = rayhome.env
    env.pop("RAYFRONT_TOKEN", None)
    env.pop("RAYPATH", None)
    env["RAYPATH"] = f".:{BIN.parent / 'lib'}"
    # Both at once: neither depends on the other, and the shimmed one waits on the server.
    direct = _start(rayhome.projects / "direct", [BIN], env)
    shimmed = _start(rayhome.projects / "shimmed", [shims, BIN], env)
    through = _result(shimmed, rayhome.projects / "shimmed")
    first = _result(direct, rayhome.projects / "direct")
    values = [float(v) for v in through.split()]
    assert len(values) == 96 and 0.5 < sum(values) / len(values) < 20  # daylight factors, %
    assert through == first
    status, page = server.request("GET", "/v1/jobs?limit=50")
    assert status == 200
    ran = {j["steps"][0]["program"] for j in page["jobs"]}
    assert {"oconv", "rtrace"} <= ran, ran  # the heavy commands ran on the server
    assert "rcalc" not in ran  # cheaper here: local (shim_local)
    assert all(j["state"] == "done" and j["project"].startswith("shimmed") for j in page["jobs"])
