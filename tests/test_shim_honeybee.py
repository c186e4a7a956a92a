"""Honeybee (honeybee-radiance from PyPI, unmodified) through shims: the daylight-factor
study of lbt-recipes' daylight-factor recipe (tests/hbstudy.py) run with honeybee's config
pointing at a Radiance folder whose bin holds the shims, against the same study with the
real Radiance folder, on a real rayserver on 127.0.0.1.

-ab 2 with -aa 0 -u- (no ambient cache, Radiance's fixed random sequence) makes one
single-process run repeat itself exactly, so the daylight factors are compared byte for
byte; the test checks that the direct run repeats itself first.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import RayHome
from jobtools import BIN, rayfront

HERE = Path(__file__).resolve().parent
PARAMS = "-ab 2 -ad 512 -as 128 -aa 0 -lw 1e-4 -u-"

if importlib.util.find_spec("honeybee_radiance") is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("honeybee-radiance is missing in CI: .ci/run installs '.[tools]'")
    pytest.skip(
        "honeybee-radiance is not installed (pip install -e '.[test,tools]')",
        allow_module_level=True,
    )


def _study(folder: Path, radiance_path: Path, env: dict[str, str]) -> bytes:
    folder.mkdir()
    proc = subprocess.run(
        [sys.executable, str(HERE / "hbstudy.py"), str(folder), str(radiance_path), PARAMS],
        cwd=folder,
        env={**env, "PWD": str(folder)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (folder / "df.res").read_bytes()


def test_honeybee_daylight_factor_runs_on_the_server(server: Any, rayhome: RayHome) -> None:
    real = rayhome.path.parent / "radiance"  # bin and lib, as honeybee expects
    real.mkdir()
    (real / "bin").symlink_to(BIN)
    (real / "lib").symlink_to(BIN.parent / "lib")
    shimmed = rayhome.path.parent / "radiance-shims"
    shimmed.mkdir()
    (shimmed / "lib").symlink_to(BIN.parent / "lib")
    proc = rayfront(rayhome, "shim", str(shimmed / "bin"), cwd=rayhome.projects)
    assert proc.returncode == 0, proc.stderr
    env = rayhome.env
    env.pop("RAYFRONT_TOKEN", None)
    env.pop("RAYPATH", None)
    first = _study(rayhome.projects / "direct1", real, env)
    assert _study(rayhome.projects / "direct2", real, env) == first  # -u- repeats itself
    status, page = server.request("GET", "/v1/jobs?limit=10")
    assert status == 200 and page["jobs"] == []  # the direct runs never asked the server
    through = _study(rayhome.projects / "shimmed", shimmed, env)
    assert through == first
    values = [float(v) for v in through.split()]
    assert len(values) == 96 and 0.5 < sum(values) / len(values) < 20  # daylight factors, %
    status, page = server.request("GET", "/v1/jobs?limit=10")
    assert status == 200
    ran = {j["steps"][0]["program"]: j for j in page["jobs"]}
    assert sorted(ran) == ["oconv", "rtrace"]  # rcalc, cheaper here, ran locally
    assert all(j["state"] == "done" and j["project"] == "shimmed" for j in ran.values())
    # honeybee's absolute paths became paths in the project; the job is named by the
    # calling shell (run_command's sh -c with the piped command).
    assert "scene.oct" in ran["rtrace"]["steps"][0]["args"]
    assert ran["rtrace"]["name"].startswith("/bin/sh -c rtrace"), ran["rtrace"]["name"]
