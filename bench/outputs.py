"""Benchmark: the cost of the procwrap's output scans (rayserver.jobs.procwrap.outputs).

    .venv/bin/python bench/outputs.py [--files 5186] [--repeat 15]

A step is scanned twice (before and after); frads' 5-phase sample script
writes 5,186 files through one ``-o`` pattern, so the project here holds
that many result files in folders of 500 (plus a scene folder), and the
"after" scan finds all of them new. Medians of ``--repeat`` runs, printed as
a Markdown table; nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rayserver.jobs.procwrap.outputs import OutputTracker, snapshot  # noqa: E402


def make_files(root: Path, count: int, tag: str) -> None:
    for i in range(count):
        folder = root / "results" / f"{tag}{i // 500:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"view_{i:05d}.dat").write_bytes(b"0 0 0\n" * 8)


def median_ms(fn, repeat: int, cleanup=None) -> float:  # noqa: ANN001 - small closures
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
        if cleanup is not None:
            cleanup()  # (not timed)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5186)
    parser.add_argument("--repeat", type=int, default=15)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "project"
        (root / "scene").mkdir(parents=True)
        for i in range(40):
            (root / "scene" / f"part{i}.rad").write_text("void plastic m 0 0 5 .5 .5 .5 0 0\n")
        empty = median_ms(lambda: snapshot(str(root)), ns.repeat)
        make_files(root, ns.files, "a")
        full = median_ms(lambda: snapshot(str(root)), ns.repeat)

        # A step writes as many files again; each repeat starts from the same project.
        step_files = root / "step"

        def writes() -> None:
            make_files(step_files, ns.files, "w")

        def step() -> None:
            tracker = OutputTracker(str(root))
            tracker.before()
            writes()
            tracker.after([])
            assert len(tracker.outputs()) == ns.files

        t_writes = median_ms(writes, 5, cleanup=lambda: shutil.rmtree(step_files))
        t_step = median_ms(step, 5, cleanup=lambda: shutil.rmtree(step_files))
    print("| what | files in the project | median ms |")
    print("|---|---:|---:|")
    print(f"| one scan, scene only | 40 | {empty:.1f} |")
    print(f"| one scan | {40 + ns.files} | {full:.1f} |")
    print(f"| a step writing {ns.files} files, without scans | {40 + ns.files} | {t_writes:.1f} |")
    print(f"| the same step with its 2 scans and the diff | {40 + ns.files} | {t_step:.1f} |")
    print(f"| the scans' share of that step | | {t_step - t_writes:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
