"""Following one job to its end: the log as it grows, a progress bar, a summary.

``rayfront run`` and ``rayfront demo`` share this code. The log comes from
``GET /v1/jobs/<id>/log?follow=1`` (a stream that ends when the job is final
and its log is read to the end); the bar is fed by a small thread that
long-polls the job object (``GET /v1/jobs/<id>?wait=..&since=<version>``,
answered when the job changes), because the log stream blocks. A server that
sends no ``version`` in its job objects (older ones) is polled every
:data:`POLL_SECONDS` instead. A broken stream (server restart) is resumed
from the byte offset already shown, so nothing is printed twice.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from rayserver.client.connection import Client, ClientError
from rayserver.common.states import FINAL_STATES, JobState

# rpict's `-t` reports: the bar shows them, so the log view leaves them out.
_PROGRESS_LINE = re.compile(r"^\w+: \d+ rays, [\d.]+% after ")
POLL_SECONDS = 0.5  # servers without long polls
LONG_POLL = 60.0  # seconds a long poll may wait for the next change
STREAM_RETRIES = 10


def job_exit_code(job: dict[str, Any]) -> int:
    """The exit status ``rayfront run`` ends with: the job's, or 128+signal, or 1."""
    status = job.get("exit_status")
    if isinstance(status, int) and status != 0:
        return status if 0 < status < 256 else 1
    sig = job.get("signal")
    if isinstance(sig, int) and sig > 0:
        return 128 + sig
    return 0 if job.get("state") == JobState.DONE else 1


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def summary_lines(job: dict[str, Any], project_dir: Path | None) -> list[str]:
    """A person's summary of a final job: state, exit status, times, output files."""
    state = job.get("state")
    head = f"job {job.get('id')} {state}"
    if job.get("exit_status") is not None:
        head += f", exit status {job['exit_status']}"
    if job.get("signal"):
        head += f", signal {job['signal']}"
    if job.get("reason"):
        head += f" ({job['reason']})"
    lines = [head]
    queued = None
    if isinstance(job.get("started_at"), int | float) and isinstance(
        job.get("submitted_at"), int | float
    ):
        queued = job["started_at"] - job["submitted_at"]
    times = f"  wall {_seconds(job.get('wall_time'))}, cpu {_seconds(job.get('cpu_time'))}"
    if queued is not None:
        times += f", queued {_seconds(queued)}"
    if isinstance(job.get("max_rss_kb"), int):
        times += f", max memory {job['max_rss_kb'] / 1024:.1f} MB"
    lines.append(times)
    for warning in job.get("warnings") or []:
        lines.append(f"  warning: {warning}")
    outputs = job.get("outputs") or []
    if outputs:
        lines.append("  outputs:")
        lines += output_lines(job, project_dir, indent="    ")
    return lines


def size_text(size: Any) -> str:
    """Bytes for a person: 812 B, 3.4 kB, 1.2 MB, 5.0 GB (powers of 1000, like ls -h --si)."""
    if not isinstance(size, int):
        return "?"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover - the loop returns first


def output_lines(
    job: dict[str, Any], project_dir: Path | None, *, indent: str, limit: int = 100
) -> list[str]:
    """One line per output file (path, size), the first ``limit`` of them, then a count."""
    outputs = [o for o in job.get("outputs") or [] if isinstance(o, dict)]
    lines = []
    for out in outputs[:limit]:
        name = out.get("path", "?")
        shown = project_dir / name if project_dir else name
        lines.append(f"{indent}{shown}  ({size_text(out.get('size'))})")
    total = job.get("outputs_count", len(outputs))
    if isinstance(total, int) and total > min(limit, len(outputs)):
        more = total - min(limit, len(outputs))
        lines.append(
            f"{indent}... and {more} more (rayfront status --json {job.get('id')} lists all)"
        )
    return lines


class _Poller(threading.Thread):
    """Polls the job object and moves the bar; the last job seen is kept for the caller."""

    def __init__(self, client: Client, job: dict[str, Any], bar: Any) -> None:
        super().__init__(daemon=True, name="rayfront-progress")
        self.client = client
        self.job = job
        self.bar = bar
        self.stop = threading.Event()

    def run(self) -> None:
        job_id = int(self.job["id"])
        while not self.stop.is_set():
            version = self.job.get("version")
            try:
                if isinstance(version, int) and not isinstance(version, bool):
                    job = self.client.job(job_id, wait=LONG_POLL, since=version)
                elif self.stop.wait(POLL_SECONDS):
                    return
                else:
                    job = self.client.job(job_id)
            except ClientError:
                # The log stream reports a lost server; the bar just pauses.
                if self.stop.wait(POLL_SECONDS):
                    return
                continue
            if self.stop.is_set():
                return
            self.job = job
            self.show(job)
            if job.get("state") in FINAL_STATES:
                return

    def show(self, job: dict[str, Any]) -> None:
        if self.bar is None:
            return
        progress = job.get("progress")
        if isinstance(progress, int | float):
            self.bar.n = max(0.0, min(100.0, float(progress)))
        state = job.get("state", "?")
        step, count = job.get("current_step"), job.get("step_count")
        desc = f"job {job.get('id')} {state}"
        if isinstance(step, int) and isinstance(count, int) and count > 1:
            desc += f" step {min(step + 1, count)}/{count}"
        if job.get("waiting_for"):
            desc += f" (after job {', '.join(map(str, job['waiting_for']))})"
        self.bar.set_description_str(desc, refresh=False)
        self.bar.refresh()


def follow(
    client: Client,
    job: dict[str, Any],
    *,
    show_log: bool = True,
    show_bar: bool = True,
    out: IO[str] | None = None,
) -> dict[str, Any]:
    """Follow ``job`` until it is final; returns the final job object."""
    out = out or sys.stdout
    job_id = int(job["id"])
    bar = _progress_bar(job_id, job.get("state", JobState.QUEUED)) if show_bar else None
    poller = _Poller(client, job, bar)
    poller.show(job)
    poller.start()

    def emit(line: str) -> None:
        if not show_log or _PROGRESS_LINE.match(line):
            return
        if bar is not None:
            bar.write(line, file=out)
        else:
            out.write(line + "\n")
            out.flush()

    final: dict[str, Any] | None = None
    try:
        stream_log(client, job_id, lambda raw: emit(raw.decode("utf-8", "replace")))
        final = client.job(job_id, wait=30)
        while final.get("state") not in FINAL_STATES:
            final = client.job(job_id, wait=60)
    finally:
        poller.stop.set()
        # Its long poll is answered by the job's end; after an error it is left behind.
        poller.join(2 if final is not None else 0.1)
    if bar is not None:
        poller.show(final)
        bar.close()
    return final


def _progress_bar(job_id: int, state: str) -> Any:
    """A tqdm bar on stderr for one job (tqdm is imported only by those who show one)."""
    import os

    from tqdm import tqdm

    # A terminal that reports no size (a bare pty, `script`) would hide the bar:
    # tqdm takes 0 rows/columns literally.
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
        known = size.columns > 0 and size.lines > 0
    except (OSError, ValueError, AttributeError):
        known = False  # not a terminal: tqdm's own defaults apply
        size = None
    sized: dict[str, Any] = (
        {"dynamic_ncols": True} if known or size is None else {"ncols": 80, "nrows": 24}
    )
    return tqdm(
        total=100,
        unit="%",
        file=sys.stderr,
        **sized,
        desc=f"job {job_id} {state}",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}",
    )


def stream_log(client: Client, job_id: int, emit: Callable[[bytes], None]) -> None:
    """Every line of the job's log (bytes, no newline) to ``emit`` until the stream ends with the job.

    A lost connection is resumed from the bytes already shown (a 4xx is final).
    """
    offset = 0
    pending = b""
    failures = 0
    while True:
        try:
            for chunk in client.follow_log(job_id, offset):
                offset += len(chunk)
                failures = 0
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    emit(raw)
            break
        except ClientError as exc:
            failures += 1
            if exc.status is not None or failures > STREAM_RETRIES:
                raise
            time.sleep(min(3.0, 0.3 * failures))
    if pending:
        emit(pending)
