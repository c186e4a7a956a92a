"""``GET /v1/jobs/{id}/grid.png``: a false-colour top view of a job's sensor grid.

How a grid is recognised (no flag in the job says so): some step reads a
points file as its stdin whose every line holds six numbers (``x y z dx dy
dz``, as rtrace takes them), and that step or a later one writes a stdout
file (Radiance header or not) with exactly as many lines of one or three
numbers. Three numbers are the RGB irradiances of ``rtrace -I``, shown as
illuminance ``179 * (0.265 R + 0.670 G + 0.065 B)`` lux; one number (after
``rcalc``) is shown as it is, called lux when the rtrace step had ``-I``.
The last such output wins. Files are read only inside the job's folder
(:func:`routes.open_regular` with the folder as root), at most
:data:`MAX_GRID_BYTES` each.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from aiohttp import web

from rayserver.common.falsecolor import GridError, grid_png, parse_points, parse_values
from rayserver.common.states import JobState
from rayserver.jobs.rows import JobRow, StepSpec
from rayserver.server.api import error_response
from rayserver.server.dashboard import routes

MAX_GRID_BYTES = 64 * 1024 * 1024


def _read(row: JobRow, name: str) -> bytes | None:
    """A file of the job's folder, or None when it is missing, too big or outside."""
    try:
        path = routes.resolve_output(Path(row.workdir), name)
        fd = routes.open_regular(path, Path(row.workdir))
    except (OSError, routes.PreviewError):
        return None
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0) if size <= MAX_GRID_BYTES else None
    finally:
        os.close(fd)


def _irradiance(step: StepSpec) -> bool:
    args = [str(a) for a in step.get("args") or []]
    return str(step.get("program")) == "rtrace" and any(a in ("-I", "-I+") for a in args)


def find_grid(row: JobRow) -> dict[str, Any]:
    """The job's grid: points, values, unit and the files they came from.

    Raises PreviewError(404) saying what was looked for when there is none.
    """
    steps = list(row.steps or [])
    for first, step in enumerate(steps):
        stdin = step.get("stdin")
        data = _read(row, stdin) if isinstance(stdin, str) else None
        if data is None:
            continue
        try:
            points = parse_points(data.decode("ascii", "replace"))
        except GridError:
            continue
        found = _values_after(row, steps, first, len(points))
        if found is not None:
            values, numbers, source = found
            lux = numbers == 3 or any(_irradiance(s) for s in steps[first:])
            return {
                "points": points,
                "values": values,
                "unit": "lx" if lux else "",
                "points_file": stdin,
                "values_file": source,
            }
    raise routes.PreviewError(
        404,
        f"job {row.id} has no sensor grid: no step reads a points file (6 numbers a line) "
        "whose points a step's output matches line for line (1 or 3 numbers a line)",
    )


def _values_after(
    row: JobRow, steps: list[StepSpec], first: int, count: int
) -> tuple[list[float], int, str] | None:
    for step in reversed(steps[first:]):
        stdout = step.get("stdout")
        data = _read(row, stdout) if isinstance(stdout, str) else None
        if data is None:
            continue
        try:
            values, numbers = parse_values(data)
        except GridError:
            continue
        if len(values) == count:
            return values, numbers, str(stdout)
    return None


def _make(row: JobRow) -> tuple[bytes, dict[str, Any]]:
    grid = find_grid(row)
    return grid_png(grid["points"], grid["values"]), grid


async def grid_preview(request: web.Request) -> web.StreamResponse:
    ctx = request.app[routes.CTX_KEY]
    try:
        job_id = routes._parse_int(request.match_info["id"], "job id", 1)
        row = ctx.db.get(job_id)
        if row is None:
            raise routes.PreviewError(404, f"no job {job_id}")
        if row.state != JobState.DONE:
            raise routes.PreviewError(
                409, f"job {job_id} is {row.state}; a grid is shown for a job that is done"
            )
        png, grid = await asyncio.to_thread(_make, row)
    except routes.PreviewError as exc:
        return error_response(exc.status, exc.message)
    values = grid["values"]
    return web.Response(
        body=png,
        content_type="image/png",
        headers={
            "Cache-Control": "private, no-cache",
            "X-Grid-Points": str(len(values)),
            "X-Grid-Min": f"{min(values):.6g}",
            "X-Grid-Max": f"{max(values):.6g}",
            "X-Grid-Unit": grid["unit"],
            "X-Content-Type-Options": "nosniff",
        },
    )


def setup_grid(app: web.Application) -> None:
    """Register GET /v1/jobs/{id}/grid.png (after routes.setup_dashboard)."""
    app.router.add_get("/v1/jobs/{id}/grid.png", grid_preview)
