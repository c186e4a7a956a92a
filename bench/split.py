"""Speed-up of ``rayfront run --hosts``: one simulation split across 1, 2 and 3 rayservers.

Run from a checkout with the project installed (see README):

    .venv/bin/python bench/split.py [--quick] [--pin]

Three real rayservers (1 cpu each) on 127.0.0.1-3 share one project directory
(the cluster of tests/splittools.py); each workload runs directly (no server)
and split on the first 1, 2 and 3 servers, the configurations interleaved in
every repetition so load drift hits them alike. Medians are printed as a
Markdown table. Nothing here is a pass/fail test.

``--pin``: two servers only, server k and everything it starts pinned to
core k-1 (as ``taskset``), and the direct runs to core 0, so that "2 servers
against 1" is two cores against one rather than whatever the scheduler gives.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from conftest import our_pids  # noqa: E402
from splittools import (  # noqa: E402
    Cluster,
    api,
    as_json,
    finish,
    jobs_of,
    make_cluster,
    picture_size,
    write_points,
    write_scene,
)

from rayserver.common import radiance  # noqa: E402
from rayserver.common.settings import Settings  # noqa: E402

SETTINGS = Settings()
ENV = radiance.simulation_env(SETTINGS)
SERVERS = 3


@dataclass
class Workload:
    """One simulation, run directly and split; ``times[config]`` collects wall seconds."""

    key: str
    title: str
    program: str
    args: list[str]  # after the program name, octree last
    stdin: str | None  # project-relative ray file (grids)
    output: str  # stem of the output file
    times: dict[str, list[float]] = field(default_factory=dict)
    part_seconds: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    parts: dict[str, int] = field(default_factory=dict)
    part_cpu: dict[str, list[float]] = field(default_factory=dict)  # last repetition, per part
    size: str = ""

    @property
    def suffix(self) -> str:
        return ".hdr" if self.program == "rpict" else ".dat"

    @property
    def command(self) -> str:
        return " ".join([self.program, *self.args]) + (f" < {self.stdin}" if self.stdin else "")


def workloads(quick: bool, points: int) -> list[Workload]:
    # --quick: a quarter of the pixels / points; the grid's cost is mostly its
    # ambient cache warming up, not the points, so -ad is cut too.
    res = "400" if quick else "800"
    ad_grid = "128" if quick else "512"
    amb = ["-ab", "1", "-aa", "0.1", "-as", "128"]
    grid = ["-h", "-I", *amb, "-ad", ad_grid, "-ds", "0.04"]
    return [
        Workload(
            "picture",
            "(a) picture",
            "rpict",
            ["-vf", "room.vf", "-x", res, "-y", res, *amb, "-ad", "512", "-ds", "0.1", "scene.oct"],
            None,
            "pic",
        ),
        # rayfront gives the parts one ambient file of the run's own (-ab 1 caches).
        Workload(
            "grid",
            f"(b) grid, {points:,} points, -ab 1",
            "rtrace",
            [*grid, "scene.oct"],
            "grid.pts",
            "grid",
        ),
        # Direct light only: parts independent of each other, no cache to share.
        Workload(
            "grid-direct",
            f"(c) grid, {points:,} points, -ab 0",
            "rtrace",
            ["-h", "-I", "-ab", "0", "-dt", "0", "-ds", "0.03" if quick else "0.015", "scene.oct"],
            "grid.pts",
            "grid-direct",
        ),
    ]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


PINNED: dict[str, int] = {}  # "direct" -> the core direct runs are pinned to (--pin)


def pin_tree(pid: int, core: int) -> None:
    """Every thread of ``pid`` and of its descendants on ``core``; later children inherit it."""
    pids = [pid]
    for parent in pids:  # grows while walked: breadth first over the tree
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task.name), {core})
            with contextlib.suppress(OSError):
                pids += [int(c) for c in (task / "children").read_text().split()]


def run_direct(cluster: Cluster, w: Workload) -> tuple[float, float]:
    """Wall and CPU seconds of the command run here, without any server."""
    out = cluster.project / f"{w.output}-direct{w.suffix}"
    stdin = cluster.project / w.stdin if w.stdin else Path(os.devnull)
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    with open(stdin, "rb") as inp, open(out, "wb") as dst:
        subprocess.run(
            [w.program, *w.args],
            cwd=cluster.project,
            env=ENV,
            stdin=inp,
            stdout=dst,
            check=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, {PINNED["direct"]})) if PINNED else None,
        )
    return time.perf_counter() - t0, children_cpu() - cpu0


def parts_cpu(cluster: Cluster, summary: dict) -> list[float]:
    """CPU seconds of the part programs, from the servers' job records.

    Unlike the parts' wall seconds this is not inflated by parts sharing a
    core, so it shows the work that splitting adds (each part warming its
    own ambient cache).
    """
    servers = dict(zip(cluster.names, cluster.servers, strict=True))
    each = []
    for part in summary["parts"]:
        status, job = api(servers[part["host"]], "GET", f"/v1/jobs/{part['job']}")
        if status != 200 or not isinstance(job, dict):
            raise SystemExit(f"job {part['job']} on {part['host']}: {status} {job}")
        each.append(float(job.get("cpu_time") or 0.0))
    return each


def run_split(cluster: Cluster, w: Workload, hosts: int) -> tuple[float, dict]:
    out = f"{w.output}-{hosts}{w.suffix}"
    io = ["--stdin", w.stdin] if w.stdin else []
    t0 = time.perf_counter()
    proc = cluster.rayfront(
        "run",
        "--json",
        "--hosts",
        ",".join(cluster.names[:hosts]),
        *io,
        "--stdout",
        out,
        "--",
        w.program,
        *w.args,
        timeout=900,
    )
    took = time.perf_counter() - t0
    summary = as_json(proc)
    if proc.returncode != 0 or summary.get("state") != "done":
        raise SystemExit(
            f"split run on {hosts} server(s) failed (exit {proc.returncode}): "
            f"{summary.get('error')}\n{proc.stderr}"
        )
    return took, summary


def check_output(cluster: Cluster, w: Workload, config: str, points: int) -> None:
    """A fast run that lost work is no speed-up: the merged result must be whole."""
    path = cluster.project / f"{w.output}-{config}{w.suffix}"
    if w.program == "rpict":
        size = "x".join(map(str, picture_size(path)))
        if w.size and size != w.size:
            raise SystemExit(f"{path.name} is {size}, the direct render {w.size}")
        w.size = size
    else:
        lines = path.read_bytes().count(b"\n")
        if lines != points:
            raise SystemExit(f"{path.name} has {lines} lines for {points} points")


def measure(cluster: Cluster, ws: list[Workload], reps: int, points: int) -> None:
    configs = ["direct", *(str(k) for k in range(1, SERVERS + 1))]
    for rep in range(reps):
        for w in ws:
            for config in configs:
                if config == "direct":
                    took, cpu = run_direct(cluster, w)
                    detail = f", cpu {cpu:.1f} s"
                else:
                    took, summary = run_split(cluster, w, int(config))
                    seconds = sum(p["seconds"] for p in summary["parts"])
                    w.part_cpu[config] = parts_cpu(cluster, summary)
                    cpu = sum(w.part_cpu[config])
                    w.parts[config] = len(summary["parts"])
                    w.part_seconds.setdefault(config, []).append(seconds)
                    each = " ".join(f"{p['seconds']:.1f}" for p in summary["parts"])
                    detail = (
                        f", {len(summary['parts'])} parts, {seconds:.1f} part-s ({each}), "
                        f"parts' cpu {cpu:.1f} s, "
                        f"client wall_time {summary['wall_time']:.1f} s"
                    )
                w.cpu.setdefault(config, []).append(cpu)
                check_output(cluster, w, config, points)
                w.times.setdefault(config, []).append(took)
                print(
                    f"  rep {rep + 1}/{reps} {w.key:8} "
                    f"{'direct' if config == 'direct' else config + ' server(s)':12} "
                    f"{took:6.2f} s{detail}",
                    flush=True,
                )


def table(ws: list[Workload]) -> list[str]:
    lines = [
        "| workload | run | wall s (median) | speed-up vs 1 server | vs direct | parts "
        "| sum of part s | cpu s | per-server efficiency |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for w in ws:
        direct = statistics.median(w.times["direct"])
        one = statistics.median(w.times["1"])
        title = w.title + (f" {w.size}" if w.size else "")
        cpu = statistics.median(w.cpu["direct"])
        lines.append(f"| {title} | direct (no server) | {direct:.2f} | | 1.00x | | | {cpu:.1f} | |")
        for k in range(1, SERVERS + 1):
            wall = statistics.median(w.times[str(k)])
            part_s = statistics.median(w.part_seconds[str(k)])
            cpu = statistics.median(w.cpu[str(k)])
            speed = one / wall
            lines.append(
                f"| {title} | {k} server{'s' if k > 1 else ''} | {wall:.2f} | {speed:.2f}x "
                f"| {direct / wall:.2f}x | {w.parts[str(k)]} | {part_s:.1f} | {cpu:.1f} "
                f"| {speed / k * 100:.0f} % |"
            )
    return lines


def part_table(ws: list[Workload]) -> list[str]:
    """The parts' own cpu seconds on all servers (last repetition), from the job records."""
    lines = [
        f"| workload ({SERVERS} servers) | parts | cpu s, all parts | cpu s, costliest part "
        "| cpu s, cheapest part | costliest / mean |",
        "|---|---|---|---|---|---|",
    ]
    for w in ws:
        each = w.part_cpu.get(str(SERVERS), [])
        if not each:
            continue
        mean = sum(each) / len(each)
        lines.append(
            f"| {w.title}{' ' + w.size if w.size else ''} | {len(each)} "
            f"| {sum(each):.1f} | {max(each):.2f} | {min(each):.2f} "
            f"| {max(each) / mean if mean else 0:.2f} |"
        )
    return lines


def share_check_times(cluster: Cluster, reps: int) -> list[str]:
    """Seconds of the share check before a split (read on all, hold/test pairwise)."""
    from rayserver.client.context import Context
    from rayserver.client.splitrun import SplitRun

    os.environ.update(cluster.client.env)
    os.environ.pop("RAYFRONT_TOKEN", None)
    ctx = Context()
    project = ctx.project(cluster.project)
    records = ctx.server_records(cluster.names)
    lines = [
        "| servers | visibility only (median) | with the lock check (median) |",
        "|---|---|---|",
    ]
    for k in range(1, SERVERS + 1):
        run = SplitRun(
            ctx,
            project,
            ["rpict", "scene.oct"],
            hosts=records[:k],
            explicit_hosts=True,
            stdin=None,
            stdout="x.hdr",
        )
        run.connect()
        took = {}
        for locks in (False, True):
            samples = []
            for _ in range(max(5, reps * 3)):
                t0 = time.perf_counter()
                run.check_share(locks)
                samples.append(time.perf_counter() - t0)
            took[locks] = statistics.median(samples)
        lines.append(f"| {k} | {took[False] * 1000:.1f} ms | {took[True] * 1000:.1f} ms |")
    return lines


def host_loss(cluster: Cluster, lost_after: float) -> list[str]:
    """One server killed (server, worker, procwraps) while its part runs: wall time and result."""
    # Finer source sampling than workload (c): the parts must outlast the kill.
    args = ["-h", "-I", "-ab", "0", "-dt", "0", "-ds", "0.008", "scene.oct"]
    command = [
        "run",
        "--json",
        "--hosts",
        ",".join(cluster.names),
        "--lost-after",
        f"{lost_after:g}",
        "--stdin",
        "grid.pts",
    ]
    t0 = time.perf_counter()
    calm = cluster.rayfront(*command, "--stdout", "calm.dat", "--", "rtrace", *args, timeout=600)
    calm_wall = time.perf_counter() - t0
    if calm.returncode != 0:
        raise SystemExit(f"undisturbed run failed: {calm.stderr}")
    victim = cluster.servers[-1]
    t0 = time.perf_counter()
    with cluster.started(*command, "--stdout", "lost.dat", "--", "rtrace", *args) as proc:
        while not any(j["state"] == "running" for j in jobs_of(victim)):
            if time.perf_counter() - t0 > 60:
                raise SystemExit("the victim's part never started")
            time.sleep(0.05)
        time.sleep(1.0)
        killed_at = time.perf_counter() - t0
        os.killpg(victim.proc.pid, signal.SIGKILL)
        for pid in our_pids(victim.home.path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        victim.proc.wait(10)
        result = finish(proc, 600)
    lost_wall = time.perf_counter() - t0
    summary = as_json(result)
    same = (cluster.project / "lost.dat").read_bytes() == (
        cluster.project / "calm.dat"
    ).read_bytes()
    retried = [p for p in summary["parts"] if len(p["attempts"]) > 1]
    if not retried:
        raise SystemExit("the killed server's part had ended before the kill: nothing measured")
    return [
        "| run (3 servers, grid -ab 0) | wall s | parts re-run | result |",
        "|---|---|---|---|",
        f"| undisturbed | {calm_wall:.2f} | 0 | reference |",
        f"| server 3 killed {killed_at:.1f} s in, --lost-after {lost_after:g} "
        f"| {lost_wall:.2f} | {len(retried)} "
        f"| {'byte-identical' if same and result.returncode == 0 else 'DIFFERENT'} |",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="1 repetition and ~1/4 of the work (a smoke run)"
    )
    parser.add_argument(
        "--pin", action="store_true", help="2 servers, each pinned to a core of its own"
    )
    parser.add_argument(
        "--json", type=Path, help="also write each workload's speed-up on all servers here"
    )
    args = parser.parse_args()
    global SERVERS
    if args.pin:
        SERVERS = 2
        PINNED["direct"] = 0
    reps = 1 if args.quick else 3
    points = 5000 if args.quick else 20000
    load_start = os.getloadavg()
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="rayserver-split-bench-"))
    ws = workloads(args.quick, points)
    try:
        print(f"starting {SERVERS} rayservers (1 cpu each) on 127.0.0.1-{SERVERS} ...", flush=True)
        cluster = make_cluster(tmp, SERVERS, cpus=1)
        if args.pin:
            for k, server in enumerate(cluster.servers):
                pin_tree(server.proc.pid, k % (os.cpu_count() or 1))
        try:
            write_scene(cluster.project)
            write_points(cluster.project / "grid.pts", points)
            # Warm the servers (spare procwraps, page cache) so the first measured
            # split run does not pay for it alone.
            run_split(
                cluster,
                Workload("warm", "", "rtrace", ["-h", "-ab", "0", "scene.oct"], "grid.pts", "warm"),
                SERVERS,
            )
            measure(cluster, ws, reps, points)
            shares = share_check_times(cluster, reps)
            # Last: it kills server 3 (not with --pin: two servers, a core each).
            loss = [] if args.pin else host_loss(cluster, 2.0)
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - started
    load_end = os.getloadavg()
    bin_dir = radiance.bin_dir(SETTINGS)
    lines = [
        f"Machine: {platform.node()}, os.cpu_count() = {os.cpu_count()}, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"{radiance.version(str(bin_dir), ENV['RAYPATH'])}",
        f"Load average (1/5/15 min) at start {' '.join(f'{x:.2f}' for x in load_start)}, "
        f"at end {' '.join(f'{x:.2f}' for x in load_end)}",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}, whole run {total:.0f} s, "
        f"{reps} repetition{'s' if reps > 1 else ''}{' (--quick)' if args.quick else ''}; "
        f"{SERVERS} rayservers with 1 cpu each, runs on k servers use the first k"
        + (", server k and its jobs pinned to core k-1, direct runs to core 0" if args.pin else ""),
        "",
        "Commands (in the project directory; split runs are `rayfront run --json --hosts H1,..,Hk"
        " [--stdin F] --stdout OUT -- COMMAND`):",
        "",
        *[f"- {w.title}: `{w.command}`" for w in ws],
        "",
        *table(ws),
        "",
        "wall s: client start to exit, median; speed-up vs 1 server: median(1 server) / "
        'median(k servers); sum of part s: the parts\' "seconds" from the --json summary '
        "(submit to seen done, polled every 0.25 s; includes waiting for a core); cpu s: "
        "the part programs' CPU seconds from the servers' job records (direct: the "
        "program's own); per-server efficiency: speed-up / k.",
        "",
        f"Per part, on {SERVERS} servers (last repetition; cpu seconds from the job records, so "
        "not inflated by parts sharing a core):",
        "",
        *part_table(ws),
        "",
        "The share check before a split (medians):",
        "",
        *shares,
        "",
        "A server lost mid-way:",
        "",
        *loss,
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(speedups(ws)))
    return 0


def speedups(ws: list[Workload]) -> dict[str, float]:
    """Median wall on 1 server over median wall on all of them, per workload key."""
    return {
        w.key: statistics.median(w.times["1"]) / statistics.median(w.times[str(SERVERS)])
        for w in ws
    }


if __name__ == "__main__":
    raise SystemExit(main())
