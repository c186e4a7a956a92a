"""Shim overhead, the Honeybee study through shims, and parallel calls spread over hosts.

Run from a checkout with the project installed (``pip install -e '.[test,tools]'``):

    .venv/bin/python bench/shim.py [--repeat 20] [--parallel 6]

Three real rayservers (1 cpu each) on 127.0.0.1-3 (tests/splittools.py).
Printed, medians of ``--repeat`` runs, variants interleaved so load drift hits
them alike:

1. a tiny command (rtrace -h -ab 0 of one ray) run directly, through a shim
   with RAYFRONT_SHIM=off (interpreter start and the exec: the floor), and
   through a shim on one server; the overhead is shim minus direct;
2. the daylight-factor study of tests/hbstudy.py (honeybee's own command
   objects) locally, through shims on one server, and through shims split
   over the three (``--hosts all``), with the largest difference of the
   daylight factors from the local run (the split differs: each part starts
   Radiance's random sequence afresh; -u- makes the others repeat);
3. ``--parallel`` rtrace calls started at once through ``--hosts all`` shims
   that do not split (rpict-like whole calls): wall time and calls per server.

Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import hbstudy  # noqa: E402,F401  (fails early without the tools extra)
from jobtools import BIN, SCENE, rad_env  # noqa: E402
from splittools import Cluster, jobs_of, make_cluster  # noqa: E402

RAY = b"1 1 1 0 0 -1\n"
HB_PARAMS = "-ab 2 -ad 512 -as 128 -aa 0 -lw 1e-4 -u-"


def _env(cluster: Cluster, shims: Path | None, **extra: str) -> dict[str, str]:
    env = cluster.client.env
    env.pop("RAYFRONT_TOKEN", None)
    env.pop("RAYPATH", None)
    if shims is not None:
        env["PATH"] = f"{shims}:{env['PATH']}"
    env.update(extra)
    return env


def _timed(cmd: list[str], cwd: Path, env: dict[str, str], data: bytes = RAY) -> float:
    started = time.perf_counter()
    subprocess.run(
        cmd, cwd=cwd, env={**env, "PWD": str(cwd)}, input=data, capture_output=True, check=True
    )
    return time.perf_counter() - started


def overhead(cluster: Cluster, shims: Path, proj: Path, repeat: int) -> dict[str, float]:
    cmd = ["rtrace", "-h", "-ab", "0", "scene.oct"]
    runs: dict[str, list[float]] = {"direct": [], "shim, RAYFRONT_SHIM=off": [], "shim": []}
    direct_env = {**rad_env(), "PATH": f"{BIN}:{os.environ['PATH']}"}
    for _ in range(repeat):
        runs["direct"].append(_timed(cmd, proj, direct_env))
        runs["shim, RAYFRONT_SHIM=off"].append(
            _timed(cmd, proj, _env(cluster, shims, RAYFRONT_SHIM="off"))
        )
        runs["shim"].append(_timed(cmd, proj, _env(cluster, shims)))
    return {k: statistics.median(v) for k, v in runs.items()}


def _radiance_folder(base: Path, shims: Path | None) -> Path:
    folder = base / ("radiance" if shims is None else f"radiance-{shims.name}")
    if not folder.exists():
        folder.mkdir()
        (folder / "bin").symlink_to(BIN if shims is None else shims)
        (folder / "lib").symlink_to(BIN.parent / "lib")
    return folder


def study(cluster: Cluster, shims: Path | None, folder: Path) -> tuple[float, list[float]]:
    folder.mkdir()
    rad = _radiance_folder(cluster.base, shims)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "hbstudy.py"), str(folder), str(rad), HB_PARAMS],
        cwd=folder,
        env={**_env(cluster, None), "PWD": str(folder)},
        capture_output=True,
        text=True,
        check=True,
    )
    *said, last = proc.stdout.strip().splitlines()  # honeybee echoes the commands' output
    for line in said:
        if "rayfront" in line:
            print(f"   ({folder.name}: {line.strip()})")
    seconds = float(last.split()[1])
    return seconds, [float(v) for v in (folder / "df.res").read_text().split()]


def parallel(cluster: Cluster, shims: Path, proj: Path, count: int) -> tuple[float, dict]:
    env = {**_env(cluster, shims), "PWD": str(proj)}
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                "rpict",
                "-vp",
                "2",
                "-1",
                "2",
                "-vd",
                "0",
                "1",
                "-0.5",
                "-x",
                "200",
                "-y",
                "200",
                "-ab",
                "1",
                "scene.oct",
            ],
            cwd=proj,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]
    for p in procs:
        p.wait()
    wall = time.perf_counter() - started
    per_host = {}
    for srv in cluster.servers:
        jobs = jobs_of(srv)
        per_host[srv.home.host] = sum(1 for j in jobs if j["steps"][0]["program"] == "rpict")
    return wall, per_host


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--parallel", type=int, default=6)
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-shim-") as tmp:
        cluster = make_cluster(Path(tmp), 3)
        try:
            report(cluster, opts)
        finally:
            cluster.stop()
    return 0


def _write_shims(cluster: Cluster, name: str, *extra: str) -> Path:
    folder = cluster.base / name
    proc = cluster.rayfront("shim", str(folder), *extra)
    assert proc.returncode == 0, proc.stderr
    return folder


def report(cluster: Cluster, opts: argparse.Namespace) -> None:
    proj = cluster.project
    (proj / "scene.rad").write_text(SCENE)
    with open(proj / "scene.oct", "wb") as out:
        subprocess.run(
            [str(BIN / "oconv"), "scene.rad"], cwd=proj, stdout=out, env=rad_env(), check=True
        )
    one = _write_shims(cluster, "shims-one", "--host", cluster.names[0])
    spread = _write_shims(cluster, "shims-all", "--hosts", "all")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    print(f"\n1. tiny rtrace call, median of {opts.repeat} (ms)")
    med = overhead(cluster, one, proj, opts.repeat)
    for name, secs in med.items():
        print(f"   {name:<28} {secs * 1000:8.1f}")
    print(f"   {'overhead (shim - direct)':<28} {(med['shim'] - med['direct']) * 1000:8.1f}")
    print("\n2. honeybee daylight-factor study (96 sensors, " + HB_PARAMS + ")")
    base, ref = study(cluster, None, proj.parent / "hb-local")
    rows = [("local", base, ref)]
    for label, shims in (("one server", one), ("split over three", spread)):
        seconds, values = study(cluster, shims, proj.parent / f"hb-{shims.name}")
        rows.append((label, seconds, values))
    for label, seconds, values in rows:
        diff = max(abs(a - b) for a, b in zip(values, ref, strict=True))
        print(f"   {label:<18} {seconds:7.2f} s   max |DF - local| {diff:.4f} %")
    wall, per_host = parallel(cluster, spread, proj, opts.parallel)
    print(f"\n3. {opts.parallel} rpict calls at once through --hosts all shims: {wall:.2f} s")
    print("   calls per server: " + ", ".join(f"{h}: {n}" for h, n in per_host.items()))


if __name__ == "__main__":
    sys.exit(main())
