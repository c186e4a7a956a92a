"""What the job sandbox costs: per step, and per tiny job through a real server.

    .venv/bin/python bench/sandbox.py [--n 40]

Side by side in one run, interleaved so drift hits every variant alike,
medians (and 90th percentiles) in milliseconds, printed as a Markdown table:

1. one tiny rtrace step started by the procwrap's code (``Box.spawn``):
   unconfined ``posix_spawn`` (what a step cost before the sandbox), the
   box with no confinement (sandbox = "off": the prlimit wrapper for the
   limits), the default way (a confined thread, posix_spawn through
   prlimit) with and (as root) without a network namespace, and the forked
   way (no prlimit) with a user + network namespace where allowed; with the
   cpu time of this process and its children per step;
2. a tiny rtrace job through a real rayserver (submit, then GET ?wait),
   one server with ``sandbox = "on"`` and one with ``"off"``.

Network traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import BIN, RTRACE_STEP, Bench, pct  # noqa: E402

from rayserver.common import radiance  # noqa: E402
from rayserver.common.settings import Settings  # noqa: E402
from rayserver.jobs.procwrap import kernel, sandbox  # noqa: E402

BEFORE = "posix_spawn, unconfined (before the sandbox)"
OFF = 'sandbox = "off": prlimit wrapper only'


class SandboxBench(Bench):
    """A Bench whose server runs with the given ``sandbox`` setting."""

    def __init__(self, mode: str) -> None:
        super().__init__(quick=True)
        self.mode = mode

    def write_config(self, cpus: int) -> None:
        super().write_config(cpus)
        settings = self.home / "config" / "rayserver.toml"
        settings.write_text(settings.read_text() + f'sandbox = "{self.mode}"\n')


def step_runner(project: Path, variant: str) -> Callable[[], None]:
    """One tiny rtrace (one point) started as the procwrap starts a step."""
    settings = Settings()
    argv = [str(BIN / "rtrace"), "-h", "room.oct"]
    env = sandbox.clean_env(
        bin_dir=str(BIN), raypath=radiance.raypath(settings), tmpdir=str(project)
    )
    reads = (*sandbox.SYSTEM_READ, str(BIN), *radiance.lib_dirs(settings))
    policy = sandbox.Policy(
        read=reads,
        write=(str(project),),
        confine=variant != OFF,
        netns="netns" in variant,
        threaded=not variant.startswith("forked"),
    )
    box = sandbox.Box.build(policy)
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)

    def run() -> None:
        src = os.open(project / "pt.txt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if variant == BEFORE:
                pid = os.posix_spawn(
                    argv[0],
                    argv,
                    env,
                    file_actions=[(os.POSIX_SPAWN_DUP2, src, 0), (os.POSIX_SPAWN_DUP2, null, 1)],
                    setpgroup=0,
                )
            else:
                pid = box.spawn(
                    argv, cwd=str(project), env=env, stdin_fd=src, stdout_fd=null, stderr_fd=null
                )
        finally:
            os.close(src)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise SystemExit(f"{variant}: rtrace ended with wait status {status}")

    return run


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def interleaved(
    runs: dict[str, Callable[[], None]], n: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Wall times (ms) of each run, and the mean cpu ms of this process and its children
    (only meaningful where the work happens in our own children: the steps)."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    cpu = dict.fromkeys(runs, 0.0)
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(n):
        for name, fn in runs.items():
            c0, t0 = _cpu(), time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000)
            cpu[name] += (_cpu() - c0) * 1000 / n
    return times, cpu


def table(
    title: str, times: dict[str, list[float]], base: str, cpu: dict[str, float] | None
) -> list[str]:
    head = "| variant | median ms | p90 ms | + median ms |" + (" cpu ms |" if cpu else "")
    rows = [f"### {title}", "", head, "|---|---|---|---|" + ("---|" if cpu else "")]
    ref = statistics.median(times[base])
    for name, vals in times.items():
        m = statistics.median(vals)
        extra = f" {cpu[name]:.2f} |" if cpu else ""
        rows.append(f"| {name} | {m:.2f} | {pct(vals, 0.9):.2f} | {m - ref:+.2f} |{extra}")
    return rows + [""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=40, help="runs of each variant (default 40)")
    ns = parser.parse_args()
    benches = {mode: SandboxBench(mode) for mode in ("on", "off")}
    try:
        project = benches["on"].project
        os.chdir(project)  # as the procwrap does (posix_spawn has no cwd of its own)
        variants = [BEFORE, OFF, "threaded: landlock+seccomp"]
        if os.geteuid() == 0:
            variants.append("threaded: landlock+seccomp+netns (root)")
        variants.append(
            "forked: landlock+seccomp" + ("+userns+netns" if kernel.userns_available() else "")
        )
        steps, step_cpu = interleaved({v: step_runner(project, v) for v in variants}, ns.n)
        for b in benches.values():
            b.start_server(cpus=2)

        def job(b: Bench) -> Callable[[], None]:
            def run() -> None:
                final = b.wait(b.submit([RTRACE_STEP]))
                if final["state"] != "done":
                    raise SystemExit(f"job ended {final['state']}: {final}")

            return run

        jobs, _ = interleaved({f"sandbox = {m!r}": job(b) for m, b in benches.items()}, ns.n)
        _, info = benches["on"].request("GET", "/v1/info", auth=False)
    finally:
        for b in benches.values():
            b.close()
    lines = [
        f"kernel {os.uname().release}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}, "
        f"n = {ns.n} each, mechanism {info.get('sandbox', {}).get('mechanism')}",
        "",
        *table("1. one tiny rtrace step, as the procwrap starts it", steps, variants[0], step_cpu),
        *table("2. a tiny rtrace job through rayserver", jobs, "sandbox = 'off'", None),
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
