"""Rounds of concurrent first writers on a missing ambient file, run directly with Radiance.

A round starts N ``rtrace -af rK.amb`` processes that all find the file
missing: each waits in ``sh -c 'read go; exec rtrace ...'`` until the test
writes a line to every stdin, so they start within a millisecond or two of
each other, then reads its rays from the same pipe (written with that line:
sh reads a pipe a byte at a time, so rtrace gets the rest).
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from rayserver.common import ambfile

# Tiny on purpose: about 50 ms of rtrace per writer, yet a few ambient flushes each.
AMB_ARGS = ["-h", "-ab", "1", "-aa", "0.2", "-ad", "16", "-as", "0"]
RAYS_PER_WRITER = 300


def writers_in_round(k: int) -> int:
    """4 to 8 writers, in turn."""
    return 4 + k % 5


def rays(seed: int, count: int = RAYS_PER_WRITER) -> str:
    """Rays from above a 4 x 4 m floor (the jobtools scene), looking down."""
    rng = random.Random(seed)
    return "".join(
        f"{rng.uniform(0.3, 3.7):.3f} {rng.uniform(0.3, 3.7):.3f} 2 "
        f"{rng.uniform(-0.4, 0.4):.3f} {rng.uniform(-0.4, 0.4):.3f} -1\n"
        for _ in range(count)
    )


@dataclass
class RoundResult:
    name: str
    writers: int
    problem: str | None  # None: intact (the byte check and lookamb's count agree)
    seconds: float  # from the release of the writers to the end of the last


def check(path: Path, lookamb: Path, env: dict[str, str]) -> str | None:
    """What is wrong with an ambient file: the byte-level check, then lookamb's count."""
    result = ambfile.check_file(path)
    if not result.ok:
        return result.problem
    counted = ambfile.lookamb_count(path, lookamb, env)
    if counted != result.records:
        return f"lookamb reads {counted} of {result.records} records"
    return None


def direct_round(proj: Path, k: int, bin_dir: Path, env: dict[str, str]) -> RoundResult:
    """One round of synchronized direct writers on a new file rK.amb."""
    name = f"direct{k}.amb"
    n = writers_in_round(k)
    cmd = f'read go; exec "{bin_dir / "rtrace"}" {" ".join(AMB_ARGS)} -af {name} scene.oct'
    procs = [
        subprocess.Popen(
            ["sh", "-c", cmd],
            cwd=proj,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(n)
    ]
    inputs = [b"go\n" + rays(k * 10 + i).encode() for i in range(n)]
    t0 = time.monotonic()
    try:
        # The barrier: one write per writer (its rays fit the pipe), all in a row.
        for p, data in zip(procs, inputs, strict=True):
            assert p.stdin is not None
            os.write(p.stdin.fileno(), data)
            p.stdin.close()
        for p in procs:
            p.wait(timeout=60)
        seconds = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return RoundResult(name, n, check(proj / name, bin_dir / "lookamb", env), seconds)
