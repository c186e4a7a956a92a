"""How far the daylight factor is from the truth: direct, through one server, split.

Run from a checkout with the project installed (see README):

    .venv/bin/python bench/accuracy.py [--repeat N]

docs/workflows.md's daylight-factor pipe (``-aa .2``, 12 sensors) is run as
written ``--repeat`` times per variant (bench/workflows.py's rounds: direct,
one server, split over three, interleaved, each with a new ``-u+`` seed).
Every result is compared with a reference that has no ambient cache
(``-aa 0``) and many samples (``-ad 65536``), the mean of three such runs,
whose own scatter is printed too. Printed: the median and range over the
rounds of the largest and the root mean square difference (relative to the
mean value, as the test compares), per variant, and of one direct run against
the next. Comparing one split run with one direct run mixes two runs'
errors; this table shows whether splitting itself moves the result. Nothing
here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

from test_split_workflows import RADIANCE_ENV, difference, wait_past  # noqa: E402
from workflows import make_cluster, run_flow  # noqa: E402

REFERENCE = "rtrace -I -h -ab 2 -ad 65536 -as 0 -aa 0 -lw 1e-9 df.oct < grid.pts"
RCALC = "rcalc -e '$1=179*(.265*$1+.670*$2+.065*$3)/100'"


def reference(folder: Path, runs: int = 3) -> tuple[Path, list[tuple[float, float]]]:
    """The mean of ``runs`` uncached daylight factors, and each run's difference from it."""
    paths = []
    for k in range(runs):
        wait_past(time.time())  # a new -u+ seed for every run
        path = folder / f"ref-{k}.txt"
        subprocess.run(
            f"{REFERENCE} | {RCALC} > {path.name}",
            shell=True,
            cwd=folder,
            env=RADIANCE_ENV,
            check=True,
        )
        paths.append(path)
    columns = zip(*(map(float, p.read_text().split()) for p in paths), strict=True)
    mean = folder / "ref.txt"
    mean.write_text("".join(f"{statistics.mean(c):.6g}\n" for c in columns))
    return mean, [difference(mean, p) for p in paths]


def spread(pairs: list[tuple[float, float]]) -> str:
    """Median (range) of the largest and of the rms differences, in %."""

    def one(values: list[float]) -> str:
        values = [100 * v for v in values]
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    return f"{one([p[0] for p in pairs])} | {one([p[1] for p in pairs])}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10, help="rounds (default 10)")
    opts = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    cluster = make_cluster(base, 3)
    try:
        _, folders = run_flow(cluster, "df", max(2, opts.repeat), 12)
        truth, noise = reference(folders["direct"][0].parent / "bench-df")
        rows = [("reference run vs reference", noise)]
        for variant, runs in folders.items():
            rows.append(
                (f"{variant} vs reference", [difference(truth, f / "df.txt") for f in runs])
            )
        direct = [f / "df.txt" for f in folders["direct"]]
        rows.append(
            (
                "direct vs the next direct",
                [difference(a, b) for a, b in zip(direct, direct[1:], strict=False)],
            )
        )
        split = [f / "df.txt" for f in folders["split"]]
        rows.append(
            (
                "split vs direct of its round",
                [difference(a, b) for a, b in zip(direct, split, strict=True)],
            )
        )
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"{platform.node()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}, "
        f"{opts.repeat} rounds, daylight factor, 12 sensors\n"
    )
    print("| compared | largest diff %, median (range) | rms diff %, median (range) |")
    print("|---|---|---|")
    for name, pairs in rows:
        print(f"| {name} | {spread(pairs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
