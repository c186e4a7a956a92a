"""A running render's picture so far, and a daylight grid's false-colour view (issue 18 item 2).

Both through a real rayserver with real Radiance: a slow rpict whose stdout
file grows a few scanlines at a time (stdio's buffer), previewed while it
runs; and gensky + oconv + rtrace -I + rcalc over a 7 x 7 sensor grid in a
room with a window, drawn by GET /v1/jobs/{id}/grid.png.
"""

from __future__ import annotations

import http.client
import time
from typing import Any

import pytest
from jobtools import make_project, rpict, submit, wait_final
from test_dashboard import png_rows

from rayserver.common.falsecolor import colour, parse_values

pytestmark = pytest.mark.shared_server


def fetch(server: Any, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.home.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {server.home.token()}"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _rows_so_far(
    server: Any, job_id: int, more_than: int, timeout: float
) -> tuple[int, int, bytes]:
    """(complete scanlines, height, PNG) once more than ``more_than`` scanlines are done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, headers, body = fetch(server, f"/v1/jobs/{job_id}/preview.png")
        if status == 200:
            done, height = (int(n) for n in headers["X-Preview-Rows"].split("/"))
            if done > more_than:
                return done, height, body
        else:
            assert status in (204, 409), body  # queued: 409; running, nothing out yet: 204
        time.sleep(0.3)
    raise AssertionError(f"job {job_id}: no more than {more_than} scanlines in {timeout} s")


def test_preview_of_a_running_render(server: Any) -> None:
    make_project(server.home)
    # Every pixel samples 1000 ambient rays (-aa 0: no cache): about a minute in all,
    # so the test sees it part done; it is cancelled when seen.
    job = submit(server, [rpict(240, "-ab", "1", "-aa", "0", "-ad", "1000")])
    try:
        done, height, png = _rows_so_far(server, job["id"], 0, 60)
        rows = png_rows(png)
        # (rpict keeps pixels square: 240 x 172 for this view)
        assert len(rows) == height == 172 and 0 < done < height, (done, height)
        # The top rows (the lit wall) are there; below the last complete scanline, black.
        assert all(any(row) for row in rows[:done]), "a computed scanline is black"
        assert not any(b"".join(rows[done:]))
        later, _, _ = _rows_so_far(server, job["id"], done, 60)  # it is refreshed as it grows
        assert later > done
    finally:
        server.request("DELETE", f"/v1/jobs/{job['id']}")
    assert wait_final(server, job["id"])["state"] == "cancelled"
    assert fetch(server, f"/v1/jobs/{job['id']}/preview.png")[0] == 409


def test_preview_of_a_running_rad_render(server: Any) -> None:
    """rad renders into <PICTURE>_<view>.unf (its log says so) before pfilt: that is shown."""
    project = make_project(server.home)
    (project / "r.rif").write_text(
        "scene= scene.rad\nOCTREE= r.oct\nPICTURE= r\nRESOLUTION= 240\nQUALITY= low\n"
        "view= w -vp 2 -1 2 -vd 0 1 -0.5 -vh 60 -vv 45\nrender= -ab 1 -aa 0 -ad 1000\n"
    )
    job = submit(server, [{"program": "rad", "args": ["r.rif"]}])
    try:
        done, height, png = _rows_so_far(server, job["id"], 0, 90)
        assert 0 < done < height and len(png_rows(png)) == height
        assert (project / "r_w.unf").exists() and not (project / "r_w.hdr").exists()
    finally:
        server.request("DELETE", f"/v1/jobs/{job['id']}")
    assert wait_final(server, job["id"])["state"] == "cancelled"


ROOM = """\
skyfunc glow sky_glow 0 0 4 .9 .9 1.15 0
sky_glow source sky 0 0 4 0 0 1 180
skyfunc glow ground_glow 0 0 4 1.4 .9 .6 0
ground_glow source ground 0 0 4 0 0 -1 180
void plastic wall 0 0 5 .6 .6 .6 0 0
wall polygon floor 0 0 12 0 0 0 0 4 0 4 4 0 4 0 0
wall polygon ceiling 0 0 12 0 0 3 4 0 3 4 4 3 0 4 3
wall polygon north 0 0 12 0 4 0 0 4 3 4 4 3 4 4 0
wall polygon west 0 0 12 0 0 0 0 0 3 0 4 3 0 4 0
wall polygon east 0 0 12 4 0 0 4 4 0 4 4 3 4 0 3
wall polygon sill 0 0 12 0 0 0 4 0 0 4 0 .9 0 0 .9
wall polygon head 0 0 12 0 0 2.1 4 0 2.1 4 0 3 0 0 3
wall polygon pier1 0 0 12 0 0 .9 .5 0 .9 .5 0 2.1 0 0 2.1
wall polygon pier2 0 0 12 3.5 0 .9 4 0 .9 4 0 2.1 3.5 0 2.1
"""
COORDS = [0.5 + 0.5 * i for i in range(7)]
LUX = "$1=179*(.265*$1+.670*$2+.065*$3)"


def test_false_colour_view_of_a_daylight_grid(server: Any) -> None:
    project = server.home.projects / "daylight"
    project.mkdir()
    (project / "room.rad").write_text(ROOM)
    (project / "grid.pts").write_text(
        "".join(f"{x} {y} 0.8 0 0 1\n" for y in COORDS for x in COORDS)
    )
    steps = [
        {"program": "gensky", "args": ["3", "21", "12", "+s", "-a", "52", "-o", "0", "-m", "0"]},
        {"program": "oconv", "args": ["sky.rad", "room.rad"], "stdout": "room.oct"},
        {
            "program": "rtrace",
            "args": ["-h", "-I", "-ab", "1", "-ad", "256", "-aa", "0", "room.oct"],
            "stdin": "grid.pts",
            "stdout": "irr.dat",
        },
        {"program": "rcalc", "args": ["-e", LUX], "stdin": "irr.dat", "stdout": "lux.dat"},
    ]
    steps[0]["stdout"] = "sky.rad"
    job = submit(server, steps, project="daylight")
    assert wait_final(server, job["id"], 120)["state"] == "done"
    lux = [float(v) for v in (project / "lux.dat").read_text().split()]
    # The three irradiances, weighted as rcalc did: the same numbers to rcalc's print
    # precision (six significant digits: 44325.05 came out of rcalc as 44325.1).
    irr, numbers = parse_values((project / "irr.dat").read_bytes())
    assert numbers == 3 and irr == pytest.approx(lux, rel=1e-5)
    near, far = sum(lux[:7]), sum(lux[-7:])
    assert near > 2 * far, (near, far)  # the window side is brighter

    status, headers, body = fetch(server, f"/v1/jobs/{job['id']}/grid.png")
    assert status == 200, body
    (server.home.path / "grid.png").write_bytes(body)
    assert headers["X-Grid-Points"] == "49" and headers["X-Grid-Unit"] == "lx"
    assert abs(float(headers["X-Grid-Max"]) - max(lux)) < 1e-5 * max(lux)
    rows = png_rows(body)
    # Seen from above, y up: each sensor's square has its value's colour (0 to the maximum).
    scale = 460 / 3.5
    height = len(rows)
    for k, value in enumerate(lux):
        x, y = COORDS[k % 7], COORDS[k // 7]
        px = round(10 + (x - 0.25) * scale)
        py = round(height - 10 - (y - 0.25) * scale)
        assert tuple(rows[py][3 * px : 3 * px + 3]) == colour(value / max(lux)), (x, y)
    # a job that is not a grid: told why
    plain = submit(server, steps[:1], project="daylight")
    assert wait_final(server, plain["id"])["state"] == "done"
    status, _, body = fetch(server, f"/v1/jobs/{plain['id']}/grid.png")
    assert status == 404 and b"no sensor grid" in body
