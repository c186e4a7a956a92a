"""Benchmark: what a job's receipt costs the procwrap (rayserver.jobs.procwrap.receipt).

    .venv/bin/python bench/receipt.py [--octree-mb 100] [--repeat 15]

One rtrace step of a project whose octree is small (a few kB) or large
(``--octree-mb``, padded past its header), as a procwrap records it: the
step described (binaries, inputs hashed) just before the spawn, then the
receipt written when the job ends. "cold" is the first job of an
installation (nothing cached: rtrace is hashed and asked for -version and
-defaults), "warm" each job after (binary and large-input hashes from
``.hashes.json``), "uncached" the large octree hashed every time. Medians of
``--repeat`` jobs, printed as a Markdown table; nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rayserver.common import radiance  # noqa: E402
from rayserver.common.settings import Settings  # noqa: E402
from rayserver.jobs.procwrap import receipt  # noqa: E402
from rayserver.jobs.procwrap.outputs import OutputTracker  # noqa: E402

BIN = radiance.bin_dir(Settings())
SCENE = "void plastic g 0 0 5 .5 .5 .5 0 0\ng sphere b 0 0 4 0 0 0 1\n"


def project(base: Path, pad_mb: int) -> Path:
    proj = base / f"p{pad_mb}"
    proj.mkdir()
    (proj / "s.rad").write_text(SCENE)
    with open(proj / "s.oct", "wb") as out:
        subprocess.run([str(BIN / "oconv"), "s.rad"], cwd=proj, stdout=out, check=True)
        out.write(b"\0" * (pad_mb << 20))  # (never rendered: only hashed)
    return proj


def one_job(home: Path, proj: Path) -> float:
    """Seconds of receipt work for one job of one rtrace step."""
    job = SimpleNamespace(
        env={"PATH": f"{BIN}:/usr/bin:/bin", "RAYPATH": "."},
        workdir=str(proj),
        outputs=OutputTracker(str(proj)),
        rad_plan=[],
        job_dir=home / "jobs" / "1",
        row=None,
        id=1,
        warnings=[],
        warn=print,
        term_signal=None,
        receipt=receipt.Receipt(),
    )
    step = {"program": "rtrace", "path": str(BIN / "rtrace"), "args": ["-h", "s.oct"]}
    step.update(stdin="s.rad", stdout=None)
    t0 = time.perf_counter()
    job.receipt.step_starting(job, step, step["args"])
    job.receipt.step_ended(0, None)
    receipt.write_safely(job, "done", None)
    return time.perf_counter() - t0


def measure(pad_mb: int, repeat: int, cached: bool) -> tuple[float, float]:
    """(cold ms, median warm ms) of ``repeat`` jobs in a fresh installation."""
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        (home / "jobs" / "1").mkdir(parents=True)
        proj = project(home, pad_mb)
        limit = receipt.CACHED_INPUT_BYTES
        if not cached:
            receipt.CACHED_INPUT_BYTES = 1 << 62
        try:
            cold = one_job(home, proj)
            warm = [one_job(home, proj) for _ in range(repeat)]
        finally:
            receipt.CACHED_INPUT_BYTES = limit
    return cold * 1000, statistics.median(warm) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--octree-mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=15)
    ns = parser.parse_args()
    rows = [
        ("small octree", *measure(0, ns.repeat, True)),
        (f"{ns.octree_mb} MB octree, cached", *measure(ns.octree_mb, ns.repeat, True)),
        (f"{ns.octree_mb} MB octree, uncached", *measure(ns.octree_mb, ns.repeat, False)),
    ]
    print(f"receipt cost per job, median of {ns.repeat} (ms)\n")
    print("| project | cold (first job) | warm (each job after) |")
    print("|---|---:|---:|")
    for name, cold, warm in rows:
        print(f"| {name} | {cold:.1f} | {warm:.2f} |")


if __name__ == "__main__":
    main()
