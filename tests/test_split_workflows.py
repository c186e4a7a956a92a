"""docs/workflows.md, run as written, on three real rayservers on 127.0.0.1-3.

The doc marks its blocks with ``<!-- test: ... -->`` comments: ``file NAME``
(the block is a project file), ``WORKFLOW prepare|direct|one|split`` (a
``sh`` block), ``WORKFLOW results FILE ...``. Each workflow's files and
prepare block (local commands) are made once and copied into a fresh project
folder per variant: direct, through one server, split over three, direct
again. Every command is the doc's own text, run by
/bin/sh with rayfront and Radiance on PATH.

Radiance 6.0a seeds its random numbers from the clock (-u+), and these
daylight runs sample (-ab > 0), so no result agrees to the byte with another
run. Each result is compared with the direct run within the scatter of two
direct runs that the test measures itself, started in different seconds:
the root mean square of the differences (relative to the mean value) may be
at most three times that scatter, plus 1 %; the largest difference is
reported beside it. Matrix headers (all but their time stamps) must be the
single run's exactly, also when split. Where two direct runs agree exactly
(rpict samples with -u- by default), the others must agree exactly too.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from splittools import RADIANCE_ENV, Cluster, picture_values

DOC = Path(__file__).resolve().parent.parent / "docs" / "workflows.md"
MARK = re.compile(r"^<!-- test: (.+?) -->$")
VARIANTS = ("direct", "one", "split", "direct2")
TIMES: dict[str, dict[str, float]] = {}
DIFFS: dict[str, dict[str, str]] = {}


@dataclass
class Workflow:
    name: str
    prepare: str = ""
    blocks: dict[str, str] = field(default_factory=dict)
    results: list[str] = field(default_factory=list)


def parse_doc(text: str) -> tuple[dict[str, str], dict[str, Workflow]]:
    """The project files and the workflows the doc's test marks give."""
    files: dict[str, str] = {}
    flows: dict[str, Workflow] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        mark = MARK.match(line)
        if not mark:
            continue
        words = mark.group(1).split()
        block = _block_after(lines, i)
        if words[0] == "file":
            files[words[1]] = block + "\n"
            continue
        flow = flows.setdefault(words[0], Workflow(words[0]))
        if words[1] == "results":
            flow.results = words[2:]
        elif words[1] == "prepare":
            flow.prepare = block
        else:
            flow.blocks[words[1]] = block
    return files, flows


def _block_after(lines: list[str], i: int) -> str:
    if i + 1 >= len(lines) or not lines[i + 1].startswith("```"):
        return ""
    end = lines.index("```", i + 2)
    return "\n".join(lines[i + 2 : end])


FILES, FLOWS = parse_doc(DOC.read_text())


@pytest.fixture(scope="module", autouse=True)
def table() -> Iterator[None]:
    """The measured times and differences, printed when the module is done (pytest -s)."""
    yield
    _print_table()


# One xdist worker runs the split modules, in order: consecutive tests share three_servers.
pytestmark = pytest.mark.xdist_group("split")


@pytest.fixture
def cluster(three_servers: Cluster) -> Cluster:
    return three_servers


def run_block(cluster: Cluster, folder: Path, script: str) -> float:
    """One block of the doc run by /bin/sh in ``folder``; its wall time."""
    env = cluster.client.env
    env.pop("RAYFRONT_TOKEN", None)
    env["PATH"] = f"{Path(sys.executable).parent}:{RADIANCE_ENV['PATH']}"
    env["RAYPATH"] = RADIANCE_ENV["RAYPATH"]
    started = time.monotonic()
    done = subprocess.run(
        ["/bin/sh", "-e", "-c", script],
        cwd=folder,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"{script}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return time.monotonic() - started


def wait_past(moment: float) -> None:
    """Wait until the clock's second is past ``moment``'s: Radiance's -u+ seed is time(0)."""
    while int(time.time()) <= int(moment):
        time.sleep(1.01 - math.modf(time.time())[0])


@pytest.mark.parametrize("name", ["df", "2phase", "3phase", "render"])
def test_workflow_runs_as_written_and_agrees_with_direct_runs(cluster: Cluster, name: str) -> None:
    flow = FLOWS[name]
    base = cluster.project.parent / f"wf-{name}"
    base.mkdir()
    for file, text in FILES.items():
        (base / file).write_text(text)
    if flow.prepare:  # the same local commands for every variant: run them once
        run_block(cluster, base, flow.prepare)
    folders: dict[str, Path] = {}
    TIMES[name] = {}
    ended = 0.0
    for variant in VARIANTS:
        folder = base.parent / f"{base.name}-{variant}"
        shutil.copytree(base, folder)
        wait_past(ended)
        TIMES[name][variant] = run_block(cluster, folder, flow.blocks[variant.rstrip("2")])
        ended = time.time()
        folders[variant] = folder
        assert not (folder / ".rayfront-split").exists()
    DIFFS[name] = {}
    for result in flow.results:
        direct = folders["direct"] / result
        scatter = difference(direct, folders["direct2"] / result)
        for variant in ("one", "split"):
            other = folders[variant] / result
            got = difference(direct, other)
            DIFFS[name][f"{result} {variant}"] = _show(got, scatter)
            # The root mean square is the steadier measure: over 15 pairs of
            # direct daylight-factor runs it varied 2.5-fold, the largest
            # difference 3.3-fold.
            if scatter == (0.0, 0.0):  # deterministic (rpict's -u- default): the same values
                assert got == (0.0, 0.0), (result, variant, got)
            assert got[1] <= 3 * scatter[1] + 0.01, (result, variant, got, scatter)
            if result.endswith((".mtx", ".vmx")):
                assert header(other) == header(direct), (result, variant)


def numbers(path: Path) -> list[float]:
    """The values a result is compared by.

    Pictures: every pixel. Matrices: each row's sum over its columns (per
    colour component), the sensor's irradiance under a sky of unit radiance;
    single coefficients are mostly 0, with a few patches seen at all. Other
    files: every number after the header.
    """
    if path.suffix == ".hdr":
        return list(picture_values(path))
    data = path.read_bytes()
    head = b""
    if data.startswith(b"#?RADIANCE"):
        head, data = data[: data.index(b"\n\n")], data[data.index(b"\n\n") + 2 :]
    values = [float(word) for word in data.split()]
    if path.suffix in (".mtx", ".vmx"):
        info = dict(line.split("=", 1) for line in head.decode().splitlines() if "=" in line)
        width = int(info["NCOLS"]) * int(info["NCOMP"])
        return [
            sum(values[i + c : i + width : int(info["NCOMP"])])
            for i in range(0, len(values), width)
            for c in range(int(info["NCOMP"]))
        ]
    return values


def difference(reference: Path, other: Path) -> tuple[float, float]:
    """(largest, root mean square) of the differences, relative to the reference's mean."""
    a, b = numbers(reference), numbers(other)
    assert len(a) == len(b) and a, (reference, other)
    scale = max(sum(abs(x) for x in a) / len(a), 1e-9)
    diffs = [abs(x - y) / scale for x, y in zip(a, b, strict=True)]
    return max(diffs), math.sqrt(sum(d * d for d in diffs) / len(diffs))


def header(path: Path) -> list[bytes]:
    data = path.read_bytes()
    head = data[: data.index(b"\n\n")] if data.startswith(b"#?RADIANCE") else b""
    return [line for line in head.split(b"\n") if not line.startswith((b"CAPDATE=", b"GMT="))]


def _show(got: tuple[float, float], scatter: tuple[float, float]) -> str:
    return (
        f"largest {100 * got[0]:.2f}% (direct-direct {100 * scatter[0]:.2f}%), "
        f"rms {100 * got[1]:.2f}% ({100 * scatter[1]:.2f}%)"
    )


def _print_table() -> None:
    if not TIMES:
        return
    out = [f"\n{'workflow':10} {'direct':>8} {'direct2':>8} {'1 server':>9} {'split 3':>8}"]
    for name, times in TIMES.items():
        if len(times) == len(VARIANTS):
            out.append(
                f"{name:10} {times['direct']:7.2f}s {times['direct2']:7.2f}s "
                f"{times['one']:8.2f}s {times['split']:7.2f}s"
            )
        for what, text in DIFFS.get(name, {}).items():
            out.append(f"    {what}: {text}")
    os.write(2, ("\n".join(out) + "\n").encode())


# Last in the module: the servers are stopped once no test after needs them.
def test_every_command_block_of_the_doc_is_run() -> None:
    text = DOC.read_text()
    lines = text.splitlines()
    shell = [i for i, line in enumerate(lines) if line.startswith("```sh")]
    unmarked = [i + 1 for i in shell if not MARK.match(lines[i - 1])]
    assert not unmarked, f"sh blocks without a test mark at lines {unmarked}"
    assert set(FLOWS) == {"df", "2phase", "3phase", "render"}
    for flow in FLOWS.values():
        assert set(flow.blocks) == {"direct", "one", "split"}, flow.name
        assert flow.results, flow.name
        assert "rayfront run --hosts all" in flow.blocks["split"], flow.name
        assert "rayfront" not in flow.blocks["direct"] + flow.prepare, flow.name
