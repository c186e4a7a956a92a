"""The workflows of docs/workflows.md: direct, through one rayserver, split over three.

Run from a checkout with the project installed (see README):

    .venv/bin/python bench/workflows.py [--repeat N] [--points N]

Three real rayservers (1 cpu each) on 127.0.0.1-3 (the cluster of
tests/splittools.py). Each workflow's marked blocks are run as written by
/bin/sh (tests/test_split_workflows.py reads them), the variants interleaved in
every repetition so that load drift hits them alike, each in a fresh project
folder. Printed: median wall seconds per variant, and the differences of the
results from the first direct run (largest and root mean square, relative to
the mean value) beside the scatter between the direct runs themselves.
``--points N`` replaces the doc's 12 sensors by N (and ``-y 12`` by
``-y N``), to see where a split starts to pay for its overhead. Nothing here
is a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from splittools import Cluster, make_cluster  # noqa: E402
from test_split_workflows import FILES, FLOWS, difference, run_block, wait_past  # noqa: E402

VARIANTS = ("direct", "one", "split")


def grid(points: int) -> str:
    """``points`` sensors on a regular grid over the room's floor, at desk height."""
    side = max(1, round(points**0.5))
    lines = -(-points // side)
    rows = [
        f"{0.2 + 2.6 * (k % side + 0.5) / side:.4f} {0.2 + 3.6 * (k // side + 0.5) / lines:.4f} "
        "0.8 0 0 1"
        for k in range(points)
    ]
    return "\n".join(rows) + "\n"


def run_flow(cluster: Cluster, name: str, repeat: int, points: int) -> tuple[dict, dict]:
    """(wall seconds per variant, result folders per variant) over ``repeat`` rounds."""
    flow = FLOWS[name]
    blocks = {v: flow.blocks[v].replace("-y 12 ", f"-y {points} ") for v in VARIANTS}
    base = cluster.project.parent / f"bench-{name}"
    base.mkdir()
    for file, text in FILES.items():
        (base / file).write_text(grid(points) if file == "grid.pts" and points != 12 else text)
    if flow.prepare:
        run_block(cluster, base, flow.prepare)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    folders: dict[str, list[Path]] = {v: [] for v in VARIANTS}
    ended = 0.0
    for round_ in range(repeat):
        for variant in VARIANTS:
            folder = base.parent / f"{base.name}-{variant}-{round_}"
            shutil.copytree(base, folder)
            wait_past(ended)  # a new -u+ seed for every run
            times[variant].append(run_block(cluster, folder, blocks[variant]))
            ended = time.time()
            folders[variant].append(folder)
    return times, folders


def compare(name: str, folders: dict[str, list[Path]]) -> list[str]:
    """Per result: largest and rms difference from direct run 1, and the direct runs' scatter."""
    lines = []
    for result in FLOWS[name].results:
        reference = folders["direct"][0] / result
        noise = [difference(reference, f / result) for f in folders["direct"][1:]]
        for variant in ("one", "split"):
            got = [difference(reference, f / result) for f in folders[variant]]
            lines.append(
                f"| {name} | {result} | {variant} | "
                f"{100 * max(g[0] for g in got):.2f} % | {100 * max(g[1] for g in got):.2f} % | "
                f"{100 * max(n[0] for n in noise):.2f} % | {100 * max(n[1] for n in noise):.2f} % |"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds per workflow (default 3)")
    parser.add_argument("--points", type=int, default=12, help="sensors (default: the doc's 12)")
    opts = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-workflows-"))
    cluster = make_cluster(base, 3)
    timing, diffs = [], []
    try:
        for name in FLOWS:
            times, folders = run_flow(cluster, name, max(2, opts.repeat), opts.points)
            med = {v: statistics.median(t) for v, t in times.items()}
            timing.append(
                f"| {name} | {med['direct']:.2f} | {med['one']:.2f} | {med['split']:.2f} |"
            )
            diffs += compare(name, folders)
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    load = os.getloadavg()[0]
    print(
        f"{platform.node()}, {os.cpu_count()} cpus, load {load:.1f}, {opts.repeat} rounds, "
        f"{opts.points} sensors\n"
    )
    print("| workflow | direct s | 1 server s | split over 3 s |\n|---|---|---|---|")
    print("\n".join(timing))
    print(
        "\n| workflow | result | run | largest diff | rms diff | direct-direct largest "
        "| direct-direct rms |\n|---|---|---|---|---|---|---|"
    )
    print("\n".join(diffs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
