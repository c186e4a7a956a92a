"""Benchmarks: rayserver against running Radiance directly and against ssh.

Run from a checkout with the project installed (see README):

    .venv/bin/python bench/run.py [--quick] [--out docs/benchmarks.md]

Everything is measured side by side in one run on this machine, with
medians, and printed as a Markdown table (also written to --out). Nothing
here is a pass/fail test; the targets are printed next to the numbers.
Network traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rayserver.common import radiance  # noqa: E402
from rayserver.common.settings import Settings  # noqa: E402

SETTINGS = Settings()
BIN = radiance.bin_dir(SETTINGS)
ENV = radiance.simulation_env(SETTINGS)
HOSTNAME = "benchhost"

SCENE = """\
void light bright 0 0 3 1000 1000 1000
bright sphere lamp 0 0 4 1.5 1.5 2.6 0.15
void plastic wall 0 0 5 .6 .6 .6 0 0
wall polygon floor 0 0 12  0 0 0  3 0 0  3 3 0  0 3 0
wall polygon ceiling 0 0 12  0 0 3  0 3 3  3 3 3  3 0 3
wall polygon west 0 0 12  0 0 0  0 3 0  0 3 3  0 0 3
wall polygon east 0 0 12  3 0 0  3 0 3  3 3 3  3 3 0
wall polygon south 0 0 12  0 0 0  0 0 3  3 0 3  3 0 0
wall polygon north 0 0 12  0 3 0  3 3 0  3 3 3  0 3 3
void plastic red 0 0 5 .7 .1 .1 0 0
red sphere ball 0 0 4 1 1.2 .5 .5
"""
VIEW = "-vtv -vp 2.5 0.3 1.6 -vd -0.5 1 -0.3 -vh 70 -vv 60"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Bench:
    """One temporary installation with a real server; rows collect the results."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.tmp = Path(tempfile.mkdtemp(prefix="rayserver-bench-"))
        self.home = self.tmp / "home"
        self.project = self.tmp / "projects" / "room"
        self.project.mkdir(parents=True)
        (self.home / "config").mkdir(parents=True)
        self.rows: list[tuple[str, str, str, str]] = []
        self.notes: list[str] = []
        self.server: subprocess.Popen[str] | None = None
        self.port = 0
        self.token: str | None = None
        self._make_scene()

    # ---- setup ---------------------------------------------------------------
    def _make_scene(self) -> None:
        (self.project / "room.rad").write_text(SCENE)
        with (self.project / "room.oct").open("wb") as out:
            subprocess.run(
                [str(BIN / "oconv"), "room.rad"], cwd=self.project, env=ENV, stdout=out, check=True
            )
        (self.project / "pt.txt").write_text("1.5 1.5 1 0 0 1\n")

    def write_config(self, cpus: int) -> None:
        self.port = free_port()
        (self.home / "config" / "hosts").write_text(
            f'{HOSTNAME} {cpus} projects="{self.project.parent}"\n'
        )
        (self.home / "config" / "rayserver.toml").write_text(
            f'bind = "127.0.0.1"\nport = {self.port}\n'
        )

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(RAYFRONT_HOME=str(self.home), RAYFRONT_HOSTNAME=HOSTNAME, PYTHONUNBUFFERED="1")
        return env

    def start_server(self, cpus: int = 2) -> float:
        """Start `rayserver -f`; returns seconds until the first answered request."""
        self.stop_server()
        self.write_config(cpus)
        t0 = time.perf_counter()
        self.server = subprocess.Popen(
            [sys.executable, "-m", "rayserver", "-f"],
            env=self.env,
            text=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        while True:
            try:
                status, _ = self.request("GET", "/v1/info", auth=False, timeout=1)
                if status == 200:
                    break
            except OSError:
                pass
            if self.server.poll() is not None:
                raise SystemExit(
                    f"rayserver exited with {self.server.returncode}; "
                    f"see {self.home}/srvlogs/{HOSTNAME}"
                )
            if time.perf_counter() - t0 > 30:
                raise SystemExit("rayserver did not answer within 30 s")
            time.sleep(0.002)
        elapsed = time.perf_counter() - t0
        tok = self.home / "config" / "token"
        self.token = tok.read_text().strip() if tok.exists() else None
        self._conn: http.client.HTTPConnection | None = None
        return elapsed

    def stop_server(self) -> None:
        if self.server and self.server.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.pid, signal.SIGTERM)
            try:
                self.server.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait()
        self.server = None

    def close(self) -> None:
        self.stop_server()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- HTTP ----------------------------------------------------------------
    def headers(self, auth: bool = True) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if auth and self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def request(
        self,
        method: str,
        path: str,
        body: object | None = None,
        auth: bool = True,
        timeout: float = 60,
    ) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            return self._send(conn, method, path, body, auth)
        finally:
            conn.close()

    def keepalive(self, method: str, path: str, body: object | None = None) -> tuple[int, dict]:
        """A request over one persistent connection, as a client library would hold it."""
        if getattr(self, "_conn", None) is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            return self._send(self._conn, method, path, body, True)
        except (http.client.HTTPException, OSError):
            self._conn.close()
            self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            return self._send(self._conn, method, path, body, True)

    def _send(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        body: object | None,
        auth: bool,
    ) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers=self.headers(auth))
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, {"raw": raw.decode("utf-8", "replace")}

    def submit(self, steps: list[dict], name: str | None = None) -> int:
        body: dict = {"location": "projects", "project": "room", "steps": steps}
        if name:
            body["name"] = name
        status, job = self.keepalive("POST", "/v1/jobs", body)
        if status != 201:
            raise SystemExit(f"submit failed: {status} {job}")
        return int(job["id"])

    def submit_batch(self, jobs: list[list[dict]]) -> list[int]:
        """Queue one job per list of steps in a single POST /v1/jobs/batch; their ids."""
        body = {"jobs": [{"location": "projects", "project": "room", "steps": s} for s in jobs]}
        status, answer = self.keepalive("POST", "/v1/jobs/batch", body)
        if status != 201:
            raise SystemExit(f"batch submit failed: {status} {answer}")
        return [int(job["id"]) for job in answer["jobs"]]

    def wait(self, job_id: int) -> dict:
        while True:
            status, job = self.keepalive("GET", f"/v1/jobs/{job_id}?wait=120")
            if status != 200:
                raise SystemExit(f"status failed: {status} {job}")
            if job["state"] in ("done", "failed", "cancelled", "interrupted"):
                return job

    def row(self, what: str, value: str, target: str, verdict: str) -> None:
        self.rows.append((what, value, target, verdict))
        print(f"  {what}: {value}   [{target}] {verdict}", flush=True)


RTRACE_STEP = {
    "program": "rtrace",
    "args": ["-h", "room.oct"],
    "stdin": "pt.txt",
    "stdout": "pt.out",
}


def direct_rtrace(project: Path) -> Callable[[], None]:
    cmd = [str(BIN / "rtrace"), "-h", "room.oct"]

    def run() -> None:
        with (project / "pt.txt").open("rb") as src, (project / "pt-direct.out").open("wb") as dst:
            subprocess.run(cmd, cwd=project, env=ENV, stdin=src, stdout=dst, check=True)

    return run


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


# ---- the measurements ---------------------------------------------------------
def bench_dispatch(b: Bench) -> float:
    n = 20 if b.quick else 40
    direct = direct_rtrace(b.project)

    def through_server() -> None:
        job = b.wait(b.submit([RTRACE_STEP]))
        if job["state"] != "done":
            raise SystemExit(f"rtrace job ended {job['state']}: {job}")

    def new_connections() -> None:
        # Like curl or urllib: a new TCP connection for the submit and for the wait.
        body = {"location": "projects", "project": "room", "steps": [RTRACE_STEP]}
        status, job = b.request("POST", "/v1/jobs", body)
        if status != 201:
            raise SystemExit(f"submit failed: {status} {job}")
        _status, job = b.request("GET", f"/v1/jobs/{job['id']}?wait=120")
        if job.get("state") != "done":
            raise SystemExit(f"rtrace job ended {job.get('state')}: {job}")

    for _ in range(3):  # warm every path
        direct()
        through_server()
        new_connections()
    d, s, c = [], [], []
    for _ in range(n):  # interleaved, so drift hits all alike
        d += timed(direct, 1)
        s += timed(through_server, 1)
        c += timed(new_connections, 1)
    overhead = med(s) - med(d)
    fresh = med(c) - med(d)
    b.row("1. tiny rtrace, direct (median ms)", f"{med(d):.1f}", "", "")
    b.row(
        "1. tiny rtrace, through rayserver (median ms)",
        f"{med(s):.1f}",
        "",
        f"ratio {med(s) / med(d):.2f}x",
    )
    b.row(
        "1. dispatch overhead, keep-alive long poll (median ms)",
        f"{overhead:.1f}",
        "< 3 ms",
        "met" if overhead < 3 else "NOT met",
    )
    b.row(
        "1. dispatch overhead, a new connection per request (median ms)",
        f"{fresh:.1f}",
        "< 6 ms",
        "met" if fresh < 6 else "NOT met",
    )
    return overhead


@contextlib.contextmanager
def sshd(b: Bench) -> Iterator[list[str] | None]:
    """A private sshd on 127.0.0.1 for the comparison; None when it cannot run."""
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd_bin).exists() and os.geteuid() == 0 and shutil.which("apt-get"):
        print("  installing openssh-server for the ssh comparison ...", flush=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openssh-server"],
            capture_output=True,
            check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    if not Path(sshd_bin).exists() or not shutil.which("ssh"):
        b.notes.append("ssh comparison skipped: openssh-server could not be installed here.")
        yield None
        return
    d = b.tmp / "ssh"
    d.mkdir()
    for key, kind in (("host", "ed25519"), ("user", "ed25519")):
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(d / key)], check=True)
    auth = Path.home() / ".ssh"
    auth.mkdir(mode=0o700, exist_ok=True)
    authorized = d / "authorized_keys"
    authorized.write_text((d / "user.pub").read_text())
    authorized.chmod(0o600)
    port = free_port()
    user = (
        os.environ.get("USER")
        or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    )
    cfg = d / "sshd_config"
    cfg.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\n"
        f"AuthorizedKeysFile {authorized}\nPasswordAuthentication no\nUsePAM no\n"
        f"PidFile {d / 'sshd.pid'}\nStrictModes no\nPermitRootLogin yes\n"
        f"SetEnv RAYPATH={ENV['RAYPATH']} PATH={ENV['PATH']}\nAcceptEnv *\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sshd_bin, "-D", "-e", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = [
        "ssh",
        "-q",
        "-p",
        str(port),
        "-i",
        str(d / "user"),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        f"UserKnownHostsFile={d / 'known'}",
        "-l",
        user,
    ]
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield base
    finally:
        subprocess.run(
            [*base, "-o", f"ControlPath={d / 'cm'}", "-O", "exit", "127.0.0.1"],
            capture_output=True,
            check=False,
            timeout=10,
        )
        proc.terminate()
        proc.wait(10)


def bench_ssh(b: Bench, overhead: float) -> None:
    n = 10 if b.quick else 20
    remote = f"cd {b.project} && rtrace -h room.oct < pt.txt > pt-ssh.out"
    with sshd(b) as base:
        if base is None:
            return
        plain = [*base, "127.0.0.1", remote]
        probe = subprocess.run(plain, capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            b.notes.append(
                f"ssh comparison skipped: ssh to 127.0.0.1 failed ({probe.stderr.strip()})"
            )
            return
        direct = direct_rtrace(b.project)
        d = timed(direct, n)
        s = timed(lambda: subprocess.run(plain, check=True, timeout=30), n)
        cm = [
            *base,
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={b.tmp / 'ssh' / 'cm'}",
            "-o",
            "ControlPersist=60",
            "127.0.0.1",
            remote,
        ]
        subprocess.run(cm, check=True, timeout=30)
        c = timed(lambda: subprocess.run(cm, check=True, timeout=30), n)
        ssh_over = med(s) - med(d)
        cm_over = med(c) - med(d)
        b.row("2. ssh, new connection: overhead (median ms)", f"{ssh_over:.1f}", "", "")
        b.row("2. ssh with ControlMaster: overhead (median ms)", f"{cm_over:.1f}", "", "")
        ratio = overhead / cm_over if cm_over > 0 else float("nan")
        b.row(
            "2. rayserver overhead / ssh-ControlMaster overhead",
            f"{ratio:.2f}",
            "<= 0.25",
            "met" if ratio <= 0.25 else "NOT met",
        )


def bench_throughput(b: Bench) -> None:
    n = 100 if b.quick else 200
    cmds = (
        "\n".join(f"cd {b.project} && rtrace -h room.oct < pt.txt > tp-{i}.out" for i in range(n))
        + "\n"
    )
    t0 = time.perf_counter()
    subprocess.run(
        ["xargs", "-P", "2", "-I", "{}", "sh", "-c", "{}"],
        input=cmds,
        text=True,
        env=ENV,
        check=True,
    )
    xargs = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = [b.submit([{**RTRACE_STEP, "stdout": f"tps-{i}.out"}]) for i in range(n)]
    for job_id in ids:
        job = b.wait(job_id)
        if job["state"] != "done":
            raise SystemExit(f"throughput job {job_id} ended {job['state']}")
    server = time.perf_counter() - t0
    t0 = time.perf_counter()
    batch = b.submit_batch([[{**RTRACE_STEP, "stdout": f"tpb-{i}.out"}] for i in range(n)])
    for job_id in batch:
        if b.wait(job_id)["state"] != "done":
            raise SystemExit(f"throughput job {job_id} (batch) did not end done")
    batched = time.perf_counter() - t0
    b.row(f"3. {n} tiny jobs, xargs -P 2 (s)", f"{xargs:.2f}", "", f"{n / xargs:.0f} jobs/s")
    b.row(
        f"3. {n} tiny jobs, rayserver cpus=2 (s)", f"{server:.2f}", "", f"{n / server:.0f} jobs/s"
    )
    b.row(
        "3. rayserver / xargs wall time",
        f"{server / xargs:.2f}x",
        "within 1.5x",
        "met" if server / xargs <= 1.5 else "NOT met",
    )
    b.row(
        f"3. {n} tiny jobs in one POST /v1/jobs/batch / xargs wall time",
        f"{batched / xargs:.2f}x",
        "within 1.5x",
        f"{batched:.2f} s; " + ("met" if batched / xargs <= 1.5 else "NOT met"),
    )


def render_args(res: int) -> list[str]:
    # -aa 0: no ambient cache, so the cost grows with the pixel count (calibratable).
    return [
        *VIEW.split(),
        "-x",
        str(res),
        "-y",
        str(res),
        "-ab",
        "1",
        "-aa",
        "0",
        "-ad",
        "128",
        "-as",
        "0",
        "room.oct",
    ]


def calibrate_render(b: Bench, target: float) -> int:
    """A resolution whose render takes about ``target`` seconds here."""
    res = 128
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run(
            [str(BIN / "rpict"), *render_args(res)],
            cwd=b.project,
            env=ENV,
            stdout=subprocess.DEVNULL,
            check=True,
        )
        took = time.perf_counter() - t0
        if 0.8 * target <= took <= 1.25 * target:
            break
        res = max(32, min(4096, int(res * (target / took) ** 0.5)))
    return res


def bench_render(b: Bench) -> int:
    target = 3.0 if b.quick else 10.0
    res = calibrate_render(b, target)
    n = 1 if b.quick else 3
    d, s = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        with (b.project / "direct.hdr").open("wb") as out:
            subprocess.run(
                [str(BIN / "rpict"), *render_args(res)],
                cwd=b.project,
                env=ENV,
                stdout=out,
                check=True,
            )
        d.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        job = b.wait(
            b.submit(
                [
                    {
                        "program": "rpict",
                        "args": render_args(res),
                        "stdin": None,
                        "stdout": "server.hdr",
                    }
                ]
            )
        )
        s.append(time.perf_counter() - t0)
        if job["state"] != "done":
            raise SystemExit(f"render job ended {job['state']}")
    ratio = med(s) / med(d)
    b.row(f"4. render {res}x{res}, direct (median s)", f"{med(d):.2f}", "", "")
    b.row(
        f"4. render {res}x{res}, through rayserver (median s)",
        f"{med(s):.2f}",
        "",
        f"{(ratio - 1) * 100:+.1f} %",
    )
    b.row(
        "4. render slowdown through rayserver",
        f"{(ratio - 1) * 100:+.1f} %",
        "< 3 %",
        "met" if ratio < 1.03 else "NOT met",
    )
    return res


def server_cpu_seconds(b: Bench) -> float:
    """CPU seconds used so far by the server's own processes (not the simulations)."""
    assert b.server is not None
    total = 0.0
    for pid in [b.server.pid, *descendants(b.server.pid)]:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"server/start.pyo" not in title:
            continue  # procwraps and Radiance: the simulation side
        fields = stat.rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def poll_clients(
    port: int, token: str | None, job_id: int, clients: int, interval: float, stop_file: Path
) -> dict:
    """The load generator (run in its own process): clients poll until stop_file appears."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"http://127.0.0.1:{port}/v1/jobs/{job_id}"

    async def poll(session: aiohttp.ClientSession, offset: float) -> None:
        nonlocal errors
        await asyncio.sleep(offset)
        while not stop_file.exists():
            t0 = time.perf_counter()
            try:
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append((time.perf_counter() - t0) * 1000)
            if interval:
                await asyncio.sleep(max(0.0, interval - (time.perf_counter() - t0)))

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(poll(session, interval * i / clients) for i in range(clients)))
    return {"seconds": time.perf_counter() - t0, "latencies": latencies, "errors": errors}


def idle_priority() -> None:
    """The load generator only gets cpu time nobody else wants (it stands for other hosts)."""
    os.nice(19)
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def bench_status_load(b: Bench, res: int) -> None:
    """200 clients poll a job's status while two renders run.

    The clients run in a separate process at nice 19: in real use they sit
    on the designers' workstations, not on the render host, so on this
    2-core machine they must not take cpu time from the renders. Two load
    shapes: each client polling every 0.5 s (rayfront and the dashboard poll
    at most once a second each), and a closed loop where every client sends
    its next request as soon as the last one answered (the server's ceiling).
    The server's own cpu time during the load is reported beside it.
    """
    clients = 200
    render = {"program": "rpict", "args": render_args(res), "stdin": None, "stdout": "load.hdr"}

    render_cpu = [0.0]  # the renders' own cpu seconds (their job records), loaded runs

    def two_renders() -> float:
        t0 = time.perf_counter()
        ids = [b.submit([{**render, "stdout": f"load-{i}.hdr"}]) for i in range(2)]
        render_cpu[0] += sum(float(b.wait(job_id)["cpu_time"] or 0) for job_id in ids)
        return time.perf_counter() - t0

    job_id = b.submit([RTRACE_STEP])
    b.wait(job_id)
    # Repetitions alternate "alone" and "loaded", so drift on this shared machine
    # hits both alike; the slowdown is the ratio of the medians.
    reps = 1 if b.quick else 3
    for interval, label, n in ((0.5, "each every 0.5 s", reps), (0.0, "closed loop", 1)):
        alone_times: list[float] = []
        loaded_times: list[float] = []
        latencies: list[float] = []
        errors = 0
        seconds = server_cpu = loaded_cpu = 0.0
        for rep in range(n):
            alone_times.append(two_renders())
            stop = b.tmp / f"stop-{interval}-{rep}"
            out = b.tmp / f"poll-{interval}-{rep}.json"
            poller = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--poller",
                    json.dumps([b.port, b.token, job_id, clients, interval, str(stop), str(out)]),
                ],
                preexec_fn=idle_priority,
            )
            time.sleep(1.0)  # all clients connected and polling
            cpu0 = server_cpu_seconds(b)
            before = render_cpu[0]
            loaded_times.append(two_renders())
            server_cpu += server_cpu_seconds(b) - cpu0
            loaded_cpu += render_cpu[0] - before
            stop.touch()
            poller.wait(60)
            result = json.loads(out.read_text())
            latencies += result["latencies"]
            errors += result["errors"]
            seconds += result["seconds"]
        slowdown = (med(loaded_times) / med(alone_times) - 1) * 100
        b.row(
            f"5. {clients} clients polling status, {label}: requests/s",
            f"{len(latencies) / seconds:.0f}",
            "",
            f"{errors} errors",
        )
        b.row(
            f"5. status latency p50 / p99, {label} (ms)",
            f"{pct(latencies, 0.5):.1f} / {pct(latencies, 0.99):.1f}",
            "",
            "",
        )
        b.row(
            f"5. server cpu while polled, {label} (% of one core)",
            f"{server_cpu / sum(loaded_times) * 100:.0f} %",
            "",
            "",
        )
        b.row(
            f"5. server cpu / the renders' cpu while polled, {label} (bound on the slowdown "
            "the server's work can cause)",
            f"{server_cpu / loaded_cpu * 100:.1f} %",
            "",
            "",
        )
        b.row(
            f"5. two renders slowed by the polling, {label} (median of {n})",
            f"{slowdown:+.1f} %",
            "< 5 %" if interval else "",
            ("met" if slowdown < 5 else "NOT met") if interval else "",
        )


def bench_office(b: Bench, res: int) -> None:
    """An office: 20 dashboards open and 20 `rayfront run` followers while two renders run.

    The load (bench/office.py, its own process at idle priority like the
    pollers above) makes the dashboard page's own requests through aiohttp
    (the event stream where the server has one) and runs rayfront's own
    follow code (a long-polled progress thread and the followed log), ten
    followers on each render. "Alone" and "loaded" repetitions alternate.
    """
    dashboards = followers = 20
    render = {"program": "rpict", "args": render_args(res), "stdin": None, "stdout": "office.hdr"}
    reps = 1 if b.quick else 3
    alone: list[float] = []
    loaded: list[float] = []
    server_cpu = 0.0
    counts: dict[str, float] = {}

    def two_renders(ids_file: Path | None) -> float:
        t0 = time.perf_counter()
        ids = [b.submit([{**render, "stdout": f"office-{i}.hdr"}]) for i in range(2)]
        if ids_file is not None:
            ids_file.write_text(json.dumps(ids))
        cpu = sum(float(b.wait(job_id)["cpu_time"] or 0) for job_id in ids)
        if ids_file is not None:
            counts["render_cpu"] = counts.get("render_cpu", 0) + cpu
        return time.perf_counter() - t0

    for rep in range(reps):
        cpu0 = server_cpu_seconds(b)
        alone.append(two_renders(None))
        counts["alone_cpu"] = counts.get("alone_cpu", 0) + server_cpu_seconds(b) - cpu0
        stop, ids_file, out = (b.tmp / f"office-{k}-{rep}" for k in ("stop", "ids", "out"))
        load = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "bench" / "office.py"),
                json.dumps(
                    [b.port, b.token, dashboards, followers, str(ids_file), str(stop), str(out)]
                ),
            ],
            preexec_fn=idle_priority,
        )
        time.sleep(1.5)  # every dashboard has loaded its lists and opened its stream
        cpu0 = server_cpu_seconds(b)
        loaded.append(two_renders(ids_file))
        server_cpu += server_cpu_seconds(b) - cpu0
        stop.touch()
        load.wait(90)
        for key, value in json.loads(out.read_text()).items():
            counts[key] = counts.get(key, 0) + value
    office_rows(b, alone, loaded, server_cpu, counts)


def office_rows(
    b: Bench, alone: list[float], loaded: list[float], server_cpu: float, counts: dict[str, float]
) -> None:
    """The office scenario's rows (bench_office)."""
    dashboards = followers = 20
    reps = len(loaded)
    slowdown = (med(loaded) / med(alone) - 1) * 100
    b.row(
        f"9. office load: requests/s, events/s (per run; {dashboards} dashboards, "
        f"{followers} followers)",
        f"{counts['requests'] / counts['seconds']:.1f}, {counts['events'] / counts['seconds']:.1f}",
        "",
        f"{int(counts['errors'])} errors, {int(counts['pushed'])} streams, "
        f"{int(counts['followed'])}/{followers * reps} followed to the end",
    )
    b.row(
        "9. server cpu during the office load (% of one core)",
        f"{server_cpu / sum(loaded) * 100:.1f} %",
        "",
        "",
    )
    # The server's cpu the load added (its cpu alone, per second, is the baseline), against
    # the renders' own cpu: what the server's work for the clients can take from them.
    added = server_cpu - counts["alone_cpu"] / sum(alone) * sum(loaded)
    b.row(
        "9. server cpu without the load, during two renders (% of one core)",
        f"{counts['alone_cpu'] / sum(alone) * 100:.1f} %",
        "",
        "",
    )
    # On a host that only renders, two renders have both cores: the cpu the server's work
    # for the clients takes is then at most this share of theirs.
    share = added / ((os.cpu_count() or 1) * sum(loaded))
    b.row(
        "9. server cpu the office load added, share of the machine's cpu during the renders "
        "(bound on the slowdown it can cause on a host that only renders)",
        f"{share * 100:.2f} %",
        "< 2 %",
        "met" if share < 0.02 else "NOT met",
    )
    b.row(
        "9. the clients' own cpu (the load process, idle priority, stands for other machines)",
        f"{counts['client_cpu'] / sum(loaded) * 100:.1f} % of one core",
        "",
        f"renders' own cpu {counts['render_cpu'] / sum(loaded) * 100:.0f} % of one core",
    )
    b.row(
        f"9. an office: {dashboards} dashboards + {followers} `rayfront run` followers "
        f"while 2 renders run: renders slowed (median of {reps})",
        f"{slowdown:+.1f} %",
        "< 2 %",
        "met" if slowdown < 2 else "NOT met",
    )


def bench_client(b: Bench) -> None:
    n = 10
    rayfront = [sys.executable, "-m", "rayserver.client"]
    exe = Path(sys.executable).parent / "rayfront"
    if exe.exists():
        rayfront = [str(exe)]
    env = {**b.env, "RAYFRONT_HOSTNAME": HOSTNAME}

    def status() -> None:
        subprocess.run(
            [*rayfront, "status", "--json"],
            env=env,
            cwd=b.project,
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def submit() -> None:
        subprocess.run(
            [
                *rayfront,
                "submit",
                "--json",
                "--stdin",
                "pt.txt",
                "--stdout",
                "cli.out",
                "--",
                "rtrace",
                "-h",
                "room.oct",
            ],
            env=env,
            cwd=b.project,
            check=True,
            stdout=subprocess.DEVNULL,
        )

    python = timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), n)
    st = timed(status, n)
    sb = timed(submit, n)
    b.row("6. python -c pass (median ms, for scale)", f"{med(python):.0f}", "", "")
    b.row(
        "6. rayfront status (median ms)",
        f"{med(st):.0f}",
        "< 150 ms",
        "met" if med(st) < 150 else "NOT met",
    )
    b.row("6. rayfront submit (median ms)", f"{med(sb):.0f}", "", "")


def bench_shim(b: Bench) -> None:
    """Row 11: a tiny command through a shim (``rayfront shim``) against it run here."""
    n = 10 if b.quick else 20
    exe = Path(sys.executable).parent / "rayfront"
    rayfront = [str(exe)] if exe.exists() else [sys.executable, "-m", "rayserver.client"]
    shims = b.tmp / "shims"
    env = {**b.env, "PWD": str(b.project)}
    env.pop("RAYPATH", None)  # as a tool's shell has it: the shims find Radiance's own
    made = subprocess.run(
        [*rayfront, "shim", str(shims)], env=env, cwd=b.project, capture_output=True, text=True
    )
    if made.returncode != 0:
        b.notes.append(f"shim rows skipped: rayfront shim failed ({made.stderr.strip()})")
        return
    rays = (b.project / "pt.txt").read_bytes()
    cmd = ["rtrace", "-h", "room.oct"]
    envs = {
        "local": {**ENV, "PATH": f"{BIN}:{os.environ['PATH']}"},
        "shim, RAYFRONT_SHIM=off": {
            **env,
            "PATH": f"{shims}:{env['PATH']}",
            "RAYFRONT_SHIM": "off",
        },
        "shim": {**env, "PATH": f"{shims}:{env['PATH']}"},
    }

    def once(which: str) -> float:
        t0 = time.perf_counter()
        subprocess.run(
            cmd, cwd=b.project, env=envs[which], input=rays, capture_output=True, check=True
        )
        return time.perf_counter() - t0

    first = once("shim")  # no plan yet: the full client works it out and keeps it
    runs: dict[str, list[float]] = {k: [] for k in envs}
    for _ in range(n):  # interleaved: load drift hits all three alike
        for which in envs:
            runs[which].append(once(which))
    for which, times in runs.items():
        b.row(f"11. tiny rtrace, {which} (median of {n}, ms)", f"{med(times) * 1000:.1f}", "", "")
    b.row(
        "11. tiny rtrace, first shim call in a folder (full client, ms)",
        f"{first * 1000:.0f}",
        "",
        "",
    )
    over = (med(runs["shim"]) - med(runs["local"])) * 1000
    b.row(
        f"11. tiny command through a shim vs local: overhead (median of {n}, ms)",
        f"{over:.1f}",
        "< 30 ms",
        "met" if over < 30 else "NOT met",
    )


def _proc_kb(pid: int, file: str, key: str) -> int:
    """The kB figure of ``key`` in /proc/<pid>/<file>; 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kb(pid: int) -> int:
    return _proc_kb(pid, "status", "VmRSS:")


def pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (the interpreter, libraries, a fork's
    copy-on-write pages) divided among the processes that share them."""
    return _proc_kb(pid, "smaps_rollup", "Pss:")


def descendants(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in task.read_text().split():
                out.append(int(child))
                out.extend(descendants(int(child)))
    return out


def bench_footprint(b: Bench, starts: list[float]) -> None:
    assert b.server is not None
    # Idle: the fork server lets warm procwraps go 5 s after the last launch or end,
    # keeping one fresh spare (the sections before this one ran jobs).
    time.sleep(6.0)
    pids = [b.server.pid, *descendants(b.server.pid)]
    total = sum(rss_kb(p) for p in pids)
    # The tree is supervisor -> worker -> fork server -> spare procwrap.
    for name, pid in zip(("supervisor", "idle worker", "fork server", "spare"), pids, strict=False):
        b.row(f"7. RSS of the {name} (MiB)", f"{rss_kb(pid) / 1024:.1f}", "", f"pid {pid}")
    b.row(
        "7. RSS supervisor + idle worker + fork server + spare (MiB)",
        f"{total / 1024:.1f}",
        "< 60 MiB",
        f"{len(pids)} processes; " + ("met" if total / 1024 < 60 else "NOT met"),
    )
    # RSS counts the interpreter once per process; PSS is what the four cost together.
    b.row(
        "7. PSS supervisor + idle worker + fork server + spare (MiB)",
        f"{sum(pss_kb(p) for p in pids) / 1024:.1f}",
        "",
        "shared pages divided among their processes",
    )
    job = b.submit(
        [{"program": "rpict", "args": render_args(256), "stdin": None, "stdout": "fp.hdr"}]
    )
    procwrap_rss = 0
    for _ in range(200):
        status, row = b.keepalive("GET", f"/v1/jobs/{job}")
        if row.get("pid") and row.get("state") == "running":
            procwrap_rss = rss_kb(int(row["pid"]))
            break
        time.sleep(0.01)
    b.wait(job)
    b.row("7. RSS of one procwrap (MiB)", f"{procwrap_rss / 1024:.1f}", "", "")
    b.row(
        "7. rayserver -f to first answered request (median ms)",
        f"{med(starts) * 1000:.0f}",
        "",
        f"n={len(starts)}",
    )


def bench_growth(b: Bench) -> None:
    sizes = (1000, 2000) if b.quick else (1000, 10000)
    # cpus=1 and a long first job keep everything behind it queued.
    b.start_server(cpus=1)
    blocker = b.submit(
        [{"program": "rpict", "args": render_args(2048), "stdin": None, "stdout": "block.hdr"}]
    )
    submitted = 0
    for size in sizes:
        t0 = time.perf_counter()
        added = size - submitted
        while submitted < size:
            b.submit([RTRACE_STEP])
            submitted += 1
        took = time.perf_counter() - t0
        lat = timed(lambda: b.keepalive("GET", "/v1/jobs?state=queued&limit=100"), 20)
        _status, page = b.keepalive("GET", "/v1/jobs?state=queued&limit=100")
        paged = len(page.get("jobs", [])) == 100 and page.get("next") is not None
        b.row(f"8. queue growing to {size}: submit rate (jobs/s)", f"{added / took:.0f}", "", "")
        b.row(
            f"8. queue of {size}: list first page (median ms)",
            f"{med(lat):.1f}",
            "",
            "paged" if paged else "NOT paged",
        )
    b.keepalive("DELETE", f"/v1/jobs/{blocker}")


def bench_pinned_split(b: Bench) -> None:
    """Row 10: bench/split.py --pin (two servers, a core each, against one), in its own run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speedups.json"
        cmd = [sys.executable, str(REPO / "bench" / "split.py"), "--pin", "--json", str(out)]
        done = subprocess.run(
            [*cmd, *(["--quick"] if b.quick else [])],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
        got = json.loads(out.read_text()) if out.exists() else {}
    if done.returncode != 0 or not got:
        b.notes.append(f"bench/split.py --pin failed ({done.returncode}): {done.stderr[-500:]}")
    for key, what in (
        ("picture", "picture"),
        ("grid", "grid -ab 1"),
        ("grid-direct", "grid -ab 0"),
    ):
        speed = got.get(key)
        b.row(
            f"10. split over 2 servers pinned to a core each (taskset) vs 1 server on 1 core, {what}",
            f"{speed:.2f}x" if speed else "failed",
            ">= 1.8x",
            ("met" if speed >= 1.8 else "NOT met") if speed else "see notes",
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--out", type=Path, help="write the Markdown report here")
    parser.add_argument("--skip-ssh", action="store_true")
    parser.add_argument(
        "--only",
        help="comma-separated sections to run (dispatch, ssh, throughput, render, status, "
        "office, client, footprint, growth, split); default all",
    )
    parser.add_argument("--poller", help=argparse.SUPPRESS)  # internal: the load generator
    args = parser.parse_args()
    if args.poller:
        port, token, job_id, clients, interval, stop, out = json.loads(args.poller)
        result = asyncio.run(poll_clients(port, token, job_id, clients, interval, Path(stop)))
        Path(out).write_text(json.dumps(result))
        return 0
    b = Bench(args.quick)
    started = time.perf_counter()
    try:
        print("starting rayserver (5 cold starts for the start-up time) ...", flush=True)
        starts = [b.start_server(cpus=2) for _ in range(3 if args.quick else 5)]
        run_sections(b, starts, args)
    finally:
        b.close()
    total = time.perf_counter() - started
    report = render_report(b, total)
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


def run_sections(b: Bench, starts: list[float], args: argparse.Namespace) -> None:
    """The sections of the table, in order (``--only`` picks some)."""
    only = set(args.only.split(",")) if args.only else None

    def wanted(name: str) -> bool:
        return only is None or name in only

    overhead = bench_dispatch(b) if wanted("dispatch") or wanted("ssh") else 0.0
    if wanted("ssh") and not args.skip_ssh:
        bench_ssh(b, overhead)
    if wanted("throughput"):
        bench_throughput(b)
    if wanted("render") or wanted("status") or wanted("office"):
        res = bench_render(b)
        if wanted("status"):
            bench_status_load(b, res)
        if wanted("office"):
            bench_office(b, res)
    if wanted("client"):
        bench_client(b)
    if wanted("footprint"):
        bench_footprint(b, starts)
    if wanted("growth"):
        bench_growth(b)
    if wanted("split"):
        bench_pinned_split(b)
    if only is not None:
        b.notes.append(f"only these sections were run: {', '.join(sorted(only))}")


def render_report(b: Bench, total: float) -> str:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    lines = [
        f"Machine: {platform.node()}, {os.cpu_count()} cpus ({cpu}), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"{radiance.version(str(BIN), ENV['RAYPATH'])}",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}, whole run {total:.0f} s"
        f"{' (--quick)' if b.quick else ''}",
        "",
        "| measurement | value | target | result |",
        "|---|---|---|---|",
    ]
    lines += [f"| {w} | {v} | {t} | {r} |" for w, v, t, r in b.rows]
    if b.notes:
        lines += ["", *[f"- {n}" for n in b.notes]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
