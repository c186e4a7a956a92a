"""Benchmark: a stream through ``rayfront run`` against the same pipe run directly.

    .venv/bin/python bench/streams.py [--mib 1024] [--repeat 3]

``getinfo -`` strips a Radiance header and copies the rest: the program does
(almost) nothing, so the times are the transport's. Directly: generator ->
getinfo -> this process. Through one server on 127.0.0.1: generator ->
``rayfront run -- getinfo -`` (PUT stdin, GET stdout, the procwrap's splice
relays) -> this process. Wall times are medians; memory is each process's
peak resident size (VmHWM, sampled every 0.25 s): the client, the worker
(and its peak before the runs), the job's procwrap. Printed as Markdown.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import BIN, ENV, Bench  # noqa: E402

HEADER = b"#?RADIANCE\nFORMAT=binary\n\n"
BLOCK = 1 << 20


def hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pid: int) -> float:
    """User + system seconds of a live process (0 once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def titled(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                words = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in words:
                found.append(int(entry.name))
    return found


def pump(proc: subprocess.Popen[bytes], mib: int) -> tuple[str, str, int]:
    """Feed ``mib`` MiB (after the header) and read what comes back; (sent, got) sha1, bytes."""
    sent, got = hashlib.sha1(), hashlib.sha1()
    block = bytearray(os.urandom(BLOCK))

    def feed() -> None:
        assert proc.stdin is not None
        proc.stdin.write(HEADER)
        for i in range(mib):
            block[:8] = i.to_bytes(8, "big")
            sent.update(block)
            proc.stdin.write(block)
        proc.stdin.close()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    received = 0
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(BLOCK):
        got.update(chunk)
        received += len(chunk)
    proc.wait()
    feeder.join()
    return sent.hexdigest(), got.hexdigest(), received


def direct(b: Bench, mib: int) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(BIN / "getinfo"), "-"],
        cwd=b.project,
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    sent, got, n = pump(proc, mib)
    assert sent == got and n == mib * BLOCK, "the direct pipe lost bytes"
    return time.perf_counter() - t0


def through(b: Bench, mib: int, peaks: dict[str, int], cpu: dict[str, float]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rayserver.client.cli", "run", "-q", "--", "getinfo", "-"],
        cwd=b.project,
        env=b.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    pids = {"client": proc.pid, "worker": titled(f"{b.home}/server/start.pyo worker")[0]}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            if "procwrap" not in pids and (found := titled(f"{b.home}/procwrap.pyo job=")):
                pids["procwrap"] = found[0]
            for name, pid in pids.items():
                peaks[name] = max(peaks.get(name, 0), hwm_kb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    worker_cpu = cpu_s(pids["worker"])
    try:
        sent, got, n = pump(proc, mib)
    finally:
        stop.set()
        sampler.join()
    assert proc.returncode == 0 and sent == got and n == mib * BLOCK, "the stream lost bytes"
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu["client"] = usage.ru_utime + usage.ru_stime - cpu.get("children_before", 0.0)
    cpu["children_before"] = usage.ru_utime + usage.ru_stime
    cpu["worker"] = cpu_s(pids["worker"]) - worker_cpu
    pids.pop("procwrap", None)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="MiB each way (default 1024)")
    parser.add_argument("--repeat", type=int, default=3)
    ns = parser.parse_args()
    b = Bench(quick=False)
    try:
        b.start_server(cpus=2)
        worker = titled(f"{b.home}/server/start.pyo worker")[0]
        before = hwm_kb(worker)
        peaks: dict[str, int] = {}
        cpu: dict[str, float] = {}
        d, t = [], []
        for _ in range(ns.repeat):
            d.append(direct(b, ns.mib))
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu["children_before"] = usage.ru_utime + usage.ru_stime  # (getinfo of direct())
            t.append(through(b, ns.mib, peaks, cpu))
        load = os.getloadavg()[0]
    finally:
        b.close()
    dm, tm = statistics.median(d), statistics.median(t)
    mb = ns.mib * BLOCK / 1e6
    print(
        f"{ns.mib} MiB in and out of `getinfo -`, medians of {ns.repeat}, load average {load:.1f}\n"
    )
    print("| | wall s | MB/s each way | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| direct pipe | {dm:.1f} | {mb / dm:.0f} | 1.00 |")
    print(f"| rayfront run (one server, 127.0.0.1) | {tm:.1f} | {mb / tm:.0f} | {tm / dm:.2f} |")
    print("\n| process | peak RSS MB | cpu s (last run) |")
    print("|---|---:|---:|")
    print(f"| rayfront (client) | {peaks.get('client', 0) / 1024:.1f} | {cpu['client']:.2f} |")
    print(
        f"| worker (before the runs {before / 1024:.1f} MB) | {peaks.get('worker', 0) / 1024:.1f} "
        f"| {cpu['worker']:.2f} |"
    )
    print(f"| procwrap | {peaks.get('procwrap', 0) / 1024:.1f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
