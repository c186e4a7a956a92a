"""Benchmark: GET /metrics and GET /v1/jobs latency against the number of jobs in the database.

    .venv/bin/python bench/metrics.py [--sizes 0,1000,10000] [--requests 50]

Starts a real ``rayserver -f`` on 127.0.0.1 with a temporary home, fills its
job database with finished jobs (rows written straight into the SQLite file,
with wall times and an event on every tenth job, so /metrics has real counts
to compute), then times requests one after another and prints a Markdown
table of medians side by side. Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rayserver.jobs.jobdb import JobDB  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, token: str) -> float:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    if resp.status != 200:
        raise SystemExit(f"GET {path}: {resp.status}")
    return (time.perf_counter() - start) * 1000


def _fill(db: JobDB, count: int) -> None:
    step = {"program": "rpict", "path": "/bin/true", "args": ["scene.oct"], "stdout": "o.hdr"}
    now = time.time()
    for i in range(count):
        job = db.submit(
            name=f"b{i}",
            priority=0,
            client="127.0.0.1",
            location="p",
            project="x",
            workdir="/tmp",
            steps=[step],
            env={},
            user="alice" if i % 2 else None,
        )
        with db._write() as conn:
            conn.execute(
                "UPDATE jobs SET state='done', started_at=?, ended_at=?, wall_time=? WHERE id=?",
                (now, now + i % 500, float(i % 500), job),
            )
        if i % 10 == 0:
            db.add_event(job, "log_capped")


def _start(home: Path, port: int) -> subprocess.Popen[bytes]:
    (home / "config").mkdir(parents=True)
    (home / "config" / "hosts").write_text(f'benchhost 2 p="{home}"\n')
    (home / "config" / "rayserver.toml").write_text(f'bind = "127.0.0.1"\nport = {port}\n')
    env = {**os.environ, "RAYFRONT_HOME": str(home), "RAYFRONT_HOSTNAME": "benchhost"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rayserver", "-f"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            if (home / "config" / "token").exists():
                return proc
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("server did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="0,1000,10000")
    ap.add_argument("--requests", type=int, default=50)
    opts = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        home, port = Path(tmp) / "home", _free_port()
        proc = _start(home, port)
        try:
            token = (home / "config" / "token").read_text().strip()
            db = JobDB(home / "srvstate" / "jobs.sqlite3", check=False)
            have = 0
            for size in (int(s) for s in opts.sizes.split(",")):
                _fill(db, size - have)
                have = size
                metrics = [_get(port, "/metrics", token) for _ in range(opts.requests)]
                jobs = [_get(port, "/v1/jobs?limit=100", token) for _ in range(opts.requests)]
                rows.append((size, statistics.median(metrics), statistics.median(jobs)))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
    print("| jobs in the database | GET /metrics median ms | GET /v1/jobs?limit=100 median ms |")
    print("|---:|---:|---:|")
    for size, m, j in rows:
        print(f"| {size} | {m:.1f} | {j:.1f} |")
    print(f"\n({opts.requests} sequential requests each, one new connection per request)")


if __name__ == "__main__":
    main()
