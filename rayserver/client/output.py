"""How rayfront prints: JSON for ``--json``, the job table and one job's details."""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def print_json(data: Any, out: Any = None) -> None:
    out = out or sys.stdout
    json.dump(data, out, indent=2, sort_keys=True)
    out.write("\n")


def when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "-"
    return time.strftime("%m-%d %H:%M:%S", time.localtime(ts))


def job_table(jobs: list[dict[str, Any]]) -> str:
    header = ("ID", "STATE", "PROG", "PRIO", "USER", "SUBMITTED", "WALL", "EXIT", "NAME")
    rows = [header]
    for j in jobs:
        wall = j.get("wall_time")
        if not isinstance(wall, int | float) and isinstance(j.get("started_at"), int | float):
            wall = (j.get("ended_at") or time.time()) - j["started_at"]
        rows.append(
            (
                str(j.get("id")),
                state_cell(j),
                f"{j.get('progress') or 0:.0f}%",
                str(j.get("priority", 0)),
                str(j.get("user") or "-"),
                when(j.get("submitted_at")),
                f"{wall:.1f}s" if isinstance(wall, int | float) else "-",
                "-" if j.get("exit_status") is None else str(j["exit_status"]),
                str(j.get("name") or ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in rows
    )


def state_cell(job: dict[str, Any]) -> str:
    """The state as the table shows it: ``*`` marks a cancel request, ``>`` what it waits for."""
    cell = str(job.get("state")) + ("*" if job.get("cancel_requested") else "")
    waiting = job.get("waiting_for") or []
    if waiting:
        cell += " >" + ",".join(map(str, waiting))
    return cell


def job_details(job: dict[str, Any]) -> str:
    keys = (
        "id",
        "name",
        "state",
        "progress",
        "priority",
        "location",
        "project",
        "user",
        "client",
        "submitted_at",
        "started_at",
        "ended_at",
        "current_step",
        "step_count",
        "exit_status",
        "signal",
        "reason",
        "wall_time",
        "cpu_time",
        "max_rss_kb",
        "cancel_requested",
        "pid",
        "after",
        "waiting_for",
        "warnings",
    )
    lines = []
    for key in keys:
        value = job.get(key)
        if key.endswith("_at"):
            value = when(value) if value is not None else "-"
        elif key == "warnings":
            value = "; ".join(value or []) or "-"
        elif key in ("after", "waiting_for"):
            value = ", ".join(map(str, value or [])) or "-"
        lines.append(f"{key:>16}: {'-' if value is None else value}")
    for n, step in enumerate(job.get("steps") or [], start=1):
        cmd = " ".join([step.get("program", "?"), *step.get("args", [])])
        for key, sign in (("stdin", "<"), ("stdout", ">")):
            if isinstance(step.get(key), dict):
                cmd += f" {sign} (streamed)"
            elif step.get(key):
                cmd += f" {sign} {step[key]}"
        lines.append(f"{'step ' + str(n):>16}: {cmd}")
    lines.append(_outputs_head(job))
    if job.get("outputs"):
        from rayserver.client.follow import output_lines

        lines += output_lines(job, None, indent=" " * 18)
    return "\n".join(lines)


def _outputs_head(job: dict[str, Any]) -> str:
    outputs = [o for o in job.get("outputs") or [] if isinstance(o, dict)]
    count = job.get("outputs_count", len(outputs))
    if not count:
        return f"{'outputs':>16}: -"
    total = sum(o["size"] for o in outputs if isinstance(o.get("size"), int))
    return f"{'outputs':>16}: {count} file{'s' if count != 1 else ''}, {total} bytes"
