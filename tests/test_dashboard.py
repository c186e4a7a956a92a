"""Dashboard routes and the preview endpoint, on a real socket with a real job database.

A small aiohttp app mounts only the dashboard (and, where a test says so, the
security middlewares) over a real JobDB in a temporary home; pictures are made
by real Radiance programs (rpict, pcomb, rad) and converted by real pcond and
ra_ppm. Nothing is mocked; one test wraps the converter to count its calls.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import os
import shutil
import struct
import subprocess
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from rayserver.common import radiance
from rayserver.common.paths import Layout
from rayserver.common.picture import PictureError, read_scanlines, to_rgb8
from rayserver.common.png import rgb_to_png
from rayserver.common.settings import Settings
from rayserver.jobs.jobdb import JobDB
from rayserver.server import security
from rayserver.server.dashboard import routes as dashboard

SCENE = """\
void light bright 0 0 3 100 100 100
bright sphere lamp 0 0 4 0 0 3 0.5
void plastic red 0 0 5 .7 .1 .1 0 0
red sphere ball 0 0 4 0 0 0 1
void plastic grey 0 0 5 .5 .5 .5 0 0
grey polygon floor 0 0 12 -5 -5 -1 5 -5 -1 5 5 -1 -5 5 -1
"""
VIEW = ["-vp", "0", "-6", "1", "-vd", "0", "1", "-0.2", "-vh", "50", "-vv", "40"]


def env() -> dict[str, str]:
    return radiance.simulation_env(Settings())


def bin_path(name: str) -> str:
    return str(radiance.bin_dir(Settings()) / name)


# One xdist worker runs this module: its module-scoped fixture is built once.
pytestmark = [pytest.mark.xdist_group("dashboard"), pytest.mark.shared_server]


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real rpict rendering (64 x 48 asked; rpict keeps square pixels)."""
    d = tmp_path_factory.mktemp("pic")
    (d / "s.rad").write_text(SCENE)
    with open(d / "s.oct", "wb") as out:
        subprocess.run([bin_path("oconv"), "s.rad"], cwd=d, env=env(), stdout=out, check=True)
    with open(d / "s.hdr", "wb") as out:
        subprocess.run(
            [bin_path("rpict"), *VIEW, "-x", "64", "-y", "48", "s.oct"],
            cwd=d,
            env=env(),
            stdout=out,
            check=True,
        )
    return d / "s.hdr"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature and every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    pos, size, kinds = 8, None, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + payload) & 0xFFFFFFFF, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            size = struct.unpack(">II", payload[:8])
        kinds.append(kind)
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND", kinds
    assert size is not None
    return size


class Env:
    """A temporary home with a real JobDB and a project folder."""

    def __init__(self, base: Path, token: str | None = None) -> None:
        self.layout = Layout(base / "home", "testhost")
        self.db = JobDB(self.layout.db_path)
        self.project = base / "projects" / "p1"
        self.project.mkdir(parents=True)
        self.ctx = SimpleNamespace(
            layout=self.layout,
            live=SimpleNamespace(settings=Settings()),
            db=self.db,
            token=token,
            hosts=None,
            record=None,
        )

    def job(self, steps: list[dict[str, Any]], state: str = "done") -> int:
        full = [
            {
                "program": s["program"],
                "path": bin_path(s["program"]),
                "args": s.get("args", []),
                "stdin": s.get("stdin"),
                "stdout": s.get("stdout"),
            }
            for s in steps
        ]
        job_id = self.db.submit(
            name="t",
            priority=0,
            client="127.0.0.1",
            location="projects",
            project="p1",
            workdir=str(self.project),
            steps=full,
            env={},
        )
        if state in ("running", "done", "failed"):
            assert self.db.mark_starting(job_id)
            assert self.db.claim(job_id, os.getpid())
        if state in ("done", "failed"):
            assert self.db.finish(
                job_id, state, exit_status=0 if state == "done" else 1, progress=100.0
            )
        return job_id


def run_app(
    ctx: Any,
    body: Callable[[aiohttp.ClientSession, str], Awaitable[None]],
    with_security: bool = False,
) -> None:
    """Serve the dashboard on 127.0.0.1 (a real socket) while ``body`` runs."""

    async def main() -> None:
        app = web.Application(middlewares=security.middlewares(ctx) if with_security else [])
        dashboard.setup_dashboard(app, ctx)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as session:
                await body(session, str(server.make_url("")).rstrip("/"))
        finally:
            await server.close()

    asyncio.run(main())


# ---------------------------------------------------------------- static files


def test_index_and_static_files(tmp_path: Path) -> None:
    e = Env(tmp_path)

    async def body(s: aiohttp.ClientSession, base: str) -> None:
        async with s.get(base + "/") as r:
            assert r.status == 200
            assert r.content_type == "text/html"
            html = await r.text()
            assert '<script src="/static/app.js"' in html
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
            etag = r.headers["ETag"]
        async with s.get(base + "/", headers={"If-None-Match": etag}) as r:
            assert r.status == 304
        for name, ctype in (
            ("app.js", "text/javascript"),
            ("farm.js", "text/javascript"),
            ("app.css", "text/css"),
        ):
            async with s.get(f"{base}/static/{name}") as r:
                assert r.status == 200 and r.content_type == ctype
                assert len(await r.read()) > 1000
        for bad in ("index.html", "nope.js", "..%2Fdashboard.py", ".app.js"):
            async with s.get(f"{base}/static/{bad}") as r:
                assert r.status == 404, bad
                err = await r.json()
                assert (
                    err["status"] == 404
                    and "known files: app.css, app.js, farm.js, favicon.svg" in err["error"]
                )

    run_app(e.ctx, body)


def test_page_loads_nothing_from_elsewhere() -> None:
    """No CDN, no web fonts: every URL in the page's files is local."""
    root = Path(dashboard.__file__).with_name("static")
    for name in ("index.html", "app.css", "app.js", "farm.js"):
        text = (root / name).read_text()
        assert "http://" not in text and "https://" not in text, name
        assert "@import" not in text and "innerHTML" not in text, name


# ---------------------------------------------------------------- preview


def test_preview_of_stdout_picture_is_cached(tmp_path: Path, picture: Path) -> None:
    e = Env(tmp_path)
    shutil.copy(picture, e.project / "out.hdr")
    job_id = e.job([{"program": "rpict", "args": [*VIEW, "s.oct"], "stdout": "out.hdr"}])
    width, height = dashboard.picture_size(picture)

    async def body(s: aiohttp.ClientSession, base: str) -> None:
        async with s.get(f"{base}/v1/jobs/{job_id}/preview.png") as r:
            assert r.status == 200, await r.text()
            assert r.content_type == "image/png"
            assert r.headers["X-Preview-Step"] == "0"
            first = await r.read()
        assert png_size(first) == (width, height)
        cached = e.layout.job_dir(job_id) / "preview-0.png"
        assert cached.read_bytes() == first
        stamp = cached.stat().st_mtime_ns
        async with s.get(f"{base}/v1/jobs/{job_id}/preview.png?step=0") as r:
            assert r.status == 200 and await r.read() == first
        assert cached.stat().st_mtime_ns == stamp, "the cached preview was made again"
        # a newer picture (a re-run wrote the file again) makes a new preview
        later = time.time() + 5
        os.utime(e.project / "out.hdr", (later, later))
        async with s.get(f"{base}/v1/jobs/{job_id}/preview.png") as r:
            assert r.status == 200
        assert cached.stat().st_mtime_ns != stamp

    run_app(e.ctx, body)
    assert not list(e.layout.job_dir(job_id).glob(".*")), "scratch files were left behind"


def test_preview_refusals(tmp_path: Path, picture: Path) -> None:
    e = Env(tmp_path)
    outside = tmp_path / "outside.hdr"
    shutil.copy(picture, outside)
    shutil.copy(picture, e.project / "ok.hdr")
    (e.project / "text.hdr").write_text("not a picture\n")
    os.symlink(outside, e.project / "link.hdr")
    os.mkfifo(e.project / "fifo.hdr")
    running = e.job([{"program": "rpict", "stdout": "ok.hdr"}], state="running")
    running_text = e.job([{"program": "rpict", "stdout": "text.hdr"}], state="running")
    queued = e.job([{"program": "rpict", "stdout": "ok.hdr"}], state="queued")
    failed = e.job([{"program": "rpict", "stdout": "ok.hdr"}], state="failed")
    text = e.job([{"program": "rpict", "stdout": "text.hdr"}])
    link = e.job([{"program": "rpict", "stdout": "link.hdr"}])
    absolute = e.job([{"program": "rpict", "stdout": str(outside)}])
    dotdot = e.job([{"program": "rpict", "stdout": "../../outside.hdr"}])
    fifo = e.job([{"program": "rpict", "stdout": "fifo.hdr"}])
    no_stdout = e.job([{"program": "oconv", "args": ["s.rad"]}])
    two = e.job([{"program": "rpict", "stdout": "ok.hdr"}, {"program": "oconv", "args": []}])

    cases = [
        (f"/v1/jobs/{queued}/preview.png", 409, "is queued"),
        (f"/v1/jobs/{failed}/preview.png", 409, "is failed"),
        ("/v1/jobs/9999/preview.png", 404, "no job 9999"),
        ("/v1/jobs/abc/preview.png", 400, "bad job id 'abc'"),
        ("/v1/jobs/0/preview.png", 400, "bad job id '0'"),
        ("/v1/jobs/1_0/preview.png", 400, "bad job id '1_0'"),
        ("/v1/jobs/99999999999999999999999/preview.png", 400, "expected a whole number >= 1"),
        (f"/v1/jobs/{text}/preview.png?step=x", 400, "bad step 'x'"),
        (f"/v1/jobs/{text}/preview.png?step=-1", 400, "bad step '-1'"),
        (f"/v1/jobs/{text}/preview.png?step=1", 404, "numbered 0 to 0"),
        (f"/v1/jobs/{text}/preview.png", 404, "wrote no Radiance picture"),
        (f"/v1/jobs/{link}/preview.png", 403, "outside the job's folder"),
        (f"/v1/jobs/{absolute}/preview.png", 403, "outside the job's folder"),
        (f"/v1/jobs/{dotdot}/preview.png", 403, "outside the job's folder"),
        (f"/v1/jobs/{fifo}/preview.png", 404, "wrote no Radiance picture"),
        (f"/v1/jobs/{no_stdout}/preview.png", 404, "wrote no Radiance picture"),
        (f"/v1/jobs/{two}/preview.png?step=1", 404, "step 1 of job"),
    ]

    async def body(s: aiohttp.ClientSession, base: str) -> None:
        for path, status, words in cases:
            async with s.get(base + path, timeout=aiohttp.ClientTimeout(total=10)) as r:
                got = await r.json()
                assert (r.status, got["status"]) == (status, status), (path, got)
                assert words in got["error"], (path, got)
        # the default step is the last one with a picture
        async with s.get(f"{base}/v1/jobs/{two}/preview.png") as r:
            assert r.status == 200 and r.headers["X-Preview-Step"] == "0"
        # a running job's picture so far (here all of it), never cached
        async with s.get(f"{base}/v1/jobs/{running}/preview.png") as r:
            assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
            done, height = r.headers["X-Preview-Rows"].split("/")
            assert done == height and int(height) > 0
            png_size(await r.read())
        async with s.get(f"{base}/v1/jobs/{running_text}/preview.png") as r:
            assert r.status == 204  # nothing to show yet: no error while it runs
        async with s.get(f"{base}/v1/jobs/{running}/preview.png?step=1") as r:
            assert r.status == 404 and "has no step 1" in (await r.json())["error"]

    run_app(e.ctx, body)
    assert not (e.layout.job_dir(link) / "preview-0.png").exists()


def test_broken_picture_gives_a_clear_error(tmp_path: Path) -> None:
    e = Env(tmp_path)
    (e.project / "bad.hdr").write_bytes(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 10 +X\n")
    (e.project / "cut.hdr").write_bytes(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 10 +X 10\nab")
    bad = e.job([{"program": "rpict", "stdout": "bad.hdr"}])
    cut = e.job([{"program": "rpict", "stdout": "cut.hdr"}])

    async def body(s: aiohttp.ClientSession, base: str) -> None:
        async with s.get(f"{base}/v1/jobs/{bad}/preview.png") as r:
            got = await r.json()
            assert r.status == 422 and "bad resolution line" in got["error"], got
        async with s.get(f"{base}/v1/jobs/{cut}/preview.png") as r:
            got = await r.json()
            assert r.status == 500 and "cut.hdr" in got["error"], got
            assert "failed" in got["error"] or "unreadable" in got["error"], got

    run_app(e.ctx, body)


def test_big_picture_is_shrunk_and_the_server_stays_responsive(tmp_path: Path) -> None:
    e = Env(tmp_path)
    with open(e.project / "big.hdr", "wb") as out:
        subprocess.run(
            [bin_path("pcomb"), "-x", "3000", "-y", "2000", "-e", "ro=x/3000;go=y/2000;bo=.5"],
            env=env(),
            stdout=out,
            check=True,
        )
    job_id = e.job([{"program": "pcomb", "stdout": "big.hdr"}])

    async def body(s: aiohttp.ClientSession, base: str) -> None:
        async def get_preview() -> bytes:
            async with s.get(f"{base}/v1/jobs/{job_id}/preview.png") as r:
                assert r.status == 200, await r.text()
                return await r.read()

        task = asyncio.ensure_future(get_preview())
        await asyncio.sleep(0.03)
        # while pfilt/pcond/ra_ppm run, other requests are answered
        answered = []
        for _ in range(5):
            t0 = time.monotonic()
            async with s.get(f"{base}/static/app.css") as r:
                assert r.status == 200
            answered.append((time.monotonic() - t0, task.done()))
        data = await task
        assert png_size(data) == (1600, 1067)
        print(f"static answers during a 3000x2000 conversion: {answered}")
        assert any(not done for _, done in answered), "the conversion finished too fast to tell"
        assert all(t < 0.5 for t, _ in answered), answered

    run_app(e.ctx, body)


def test_one_conversion_per_job(
    tmp_path: Path, picture: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    e = Env(tmp_path)
    shutil.copy(picture, e.project / "out.hdr")
    job_id = e.job([{"program": "rpict", "stdout": "out.hdr"}])
    calls: list[float] = []
    real = dashboard.picture_to_png

    async def counting(*args: Any, **kwargs: Any) -> bytes:
        calls.append(time.monotonic())
        await asyncio.sleep(0.2)  # widen the window in which requests overlap
        return await real(*args, **kwargs)

    monkeypatch.setattr(dashboard, "picture_to_png", counting)

    async def body(s: aiohttp.ClientSession, base: str) -> None:
        async def one() -> bytes:
            async with s.get(f"{base}/v1/jobs/{job_id}/preview.png") as r:
                assert r.status == 200
                return await r.read()

        results = await asyncio.gather(*(one() for _ in range(6)))
        assert len(set(results)) == 1

    run_app(e.ctx, body)
    assert len(calls) == 1, f"{len(calls)} conversions for one job"


def test_token_protects_the_preview_but_not_the_page(tmp_path: Path, picture: Path) -> None:
    e = Env(tmp_path, token="s3cret-token-value")
    shutil.copy(picture, e.project / "out.hdr")
    job_id = e.job([{"program": "rpict", "stdout": "out.hdr"}])

    async def body(s: aiohttp.ClientSession, base: str) -> None:
        for path in ("/", "/static/app.js", "/static/app.css"):
            async with s.get(base + path) as r:
                assert r.status == 200, path
        async with s.get(f"{base}/v1/jobs/{job_id}/preview.png") as r:
            assert r.status == 401
        async with s.get(
            f"{base}/v1/jobs/{job_id}/preview.png", headers={"Authorization": "Bearer wrong"}
        ) as r:
            assert r.status == 401
        async with s.get(
            f"{base}/v1/jobs/{job_id}/preview.png",
            headers={"Authorization": "Bearer s3cret-token-value"},
        ) as r:
            assert r.status == 200 and r.content_type == "image/png"

    run_app(e.ctx, body, with_security=True)


# ---------------------------------------------------------------- rad jobs


RIF = """\
# comments and spaces around '=' as rad allows
ZONE= E -5 5 -5 5 -1 4
scene = s.rad
OCTREE= t.oct
PICT= img/pic
RESOLUTION= 48
QUALITY= low
view= front -vp 0 -6 1 -vd 0 1 -0.2 -vh 50 -vv 40
vi= -vp 0 6 1 -vd 0 -1 -0.2
"""


def test_rif_and_log_pictures(tmp_path: Path) -> None:
    (tmp_path / "t.rif").write_text(RIF)
    assert dashboard.rif_pictures(tmp_path / "t.rif") == [
        "img/pic_front.hdr",
        "img/pic_front.pic",
        "img/pic_2.hdr",
        "img/pic_2.pic",
    ]
    (tmp_path / "u.rif").write_text("scene= s.rad\n")
    assert dashboard.rif_pictures(tmp_path / "u.rif") == ["u_X.hdr", "u_X.pic"]
    log = (
        "\toconv s.rad > t.oct\n\trpict -x 64 t.oct > img/pic_front.unf\n"
        "\tpfilt img/pic_front.unf > img/pic_front.hdr\n\trm -f img/pic_front.unf\n"
        "\tmv b_2.unf b_2.pic\n\tpfilt img/pic_front.unf > img/pic_front.hdr\n"
    )
    assert dashboard.log_pictures(log) == ["img/pic_front.hdr", "b_2.pic"]


def test_preview_of_a_rad_job(tmp_path: Path) -> None:
    """A real rad run; the picture is found from its log, and from the rif alone."""
    e = Env(tmp_path)
    (e.project / "s.rad").write_text(SCENE)
    (e.project / "t.rif").write_text(RIF)
    (e.project / "img").mkdir()
    run = subprocess.run(
        [bin_path("rad"), "t.rif"],
        cwd=e.project,
        env=env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert (e.project / "img" / "pic_front.hdr").exists(), run.stdout + run.stderr
    with_log = e.job([{"program": "rad", "args": ["t.rif"]}])
    e.layout.job_dir(with_log).mkdir(parents=True, exist_ok=True)
    e.db.log_path(with_log).write_text(run.stdout + run.stderr)
    rif_only = e.job([{"program": "rad", "args": ["-w", "t.rif"]}])  # no log: rad was up to date
    expected = dashboard.picture_size(e.project / "img" / "pic_front.hdr")

    async def body(s: aiohttp.ClientSession, base: str) -> None:
        for job_id in (with_log, rif_only):
            async with s.get(f"{base}/v1/jobs/{job_id}/preview.png") as r:
                assert r.status == 200, await r.text()
                assert png_size(await r.read()) == expected

    run_app(e.ctx, body)


def test_resolution_line_orientations(tmp_path: Path) -> None:
    for line, size in (
        (b"-Y 48 +X 61", (61, 48)),
        (b"+X 30 -Y 20", (30, 20)),
        (b"-Y 1 -X 7", (7, 1)),
    ):
        p = tmp_path / "p.hdr"
        p.write_bytes(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n" + line + b"\n")
        assert dashboard.picture_size(p) == size
    p.write_bytes(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 4 -Y 4\n")
    with pytest.raises(dashboard.PreviewError, match="expected e.g. '-Y 480 \\+X 640'"):
        dashboard.picture_size(p)


def test_open_regular_checks_the_opened_file(tmp_path: Path, picture: Path) -> None:
    """The descriptor the converter reads is checked, not just the path before it."""
    root = tmp_path / "work"
    root.mkdir()
    shutil.copy(picture, tmp_path / "outside.hdr")
    os.symlink(tmp_path / "outside.hdr", root / "link.hdr")
    with pytest.raises(dashboard.PreviewError, match="outside the job's folder") as info:
        dashboard.open_regular(root / "link.hdr", root)
    assert info.value.status == 403
    os.mkfifo(root / "fifo.hdr")
    t0 = time.monotonic()
    with pytest.raises(dashboard.PreviewError, match="not a regular file"):
        dashboard.open_regular(root / "fifo.hdr", root)
    assert time.monotonic() - t0 < 1
    shutil.copy(picture, root / "in.hdr")
    fd = dashboard.open_regular(root / "in.hdr", root)
    try:
        assert dashboard.picture_size(fd, "in.hdr") == dashboard.picture_size(picture)
    finally:
        os.close(fd)


def test_rad_job_preview_through_the_real_server(server: Any) -> None:
    """A rad job submitted to a real rayserver: its picture is found and previewed."""
    project = server.home.projects / "radp"
    project.mkdir()
    (project / "s.rad").write_text(SCENE)
    (project / "t.rif").write_text(RIF)
    (project / "img").mkdir()
    status, job = server.request(
        "POST",
        "/v1/jobs",
        {"location": "projects", "project": "radp", "rad": {"rif": "t.rif", "options": []}},
    )
    assert status == 201, job
    status, job = server.request("GET", f"/v1/jobs/{job['id']}?wait=60", timeout=70)
    assert status == 200 and job["state"] == "done", job
    status, body = server.request("GET", f"/v1/jobs/{job['id']}/preview.png", token=False)
    assert status == 401, body
    conn_status, data, headers = _get_bytes(server, f"/v1/jobs/{job['id']}/preview.png")
    assert conn_status == 200, data[:300]
    assert headers["Content-Type"] == "image/png"
    assert png_size(data) == dashboard.picture_size(project / "img" / "pic_front.hdr")


def _get_bytes(server: Any, path: str) -> tuple[int, bytes, dict[str, str]]:
    """GET with the server's token; the raw body (conftest's helper decodes text)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.home.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {server.home.token()}"})
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


def test_preview_of_an_output_by_its_path(tmp_path: Path, picture: Path) -> None:
    """A picture a job wrote without naming it as stdout (a script, rcontrib -o)."""
    e = Env(tmp_path)
    (e.project / "pics").mkdir()
    shutil.copy(picture, e.project / "pics" / "view_1.hdr")
    (e.project / "notes.txt").write_text("not a picture\n")
    job_id = e.job([{"program": "rcontrib", "args": ["-o", "pics/view_%d.hdr"]}])
    outputs = [{"path": "pics/view_1.hdr", "size": 1}, {"path": "notes.txt", "size": 14}]
    e.db._conn().execute("UPDATE jobs SET outputs=? WHERE id=?", (json.dumps(outputs), job_id))
    width, height = dashboard.picture_size(picture)

    async def body(s: aiohttp.ClientSession, base: str) -> None:
        url = f"{base}/v1/jobs/{job_id}/preview.png?path="
        async with s.get(url + "pics/view_1.hdr") as r:
            assert r.status == 200, await r.text()
            assert png_size(await r.read()) == (width, height)
            assert "X-Preview-Step" not in r.headers
        for name, status, text in (
            ("notes.txt", 404, "is not a Radiance picture"),
            ("s.hdr", 404, "is not an output of job"),  # a picture, but not this job's
            ("../p1/pics/view_1.hdr", 404, "is not an output of job"),
        ):
            async with s.get(url + name) as r:
                assert r.status == status and text in (await r.json())["error"], name
        async with s.get(url + "pics/view_1.hdr&step=0") as r:
            assert r.status == 400

    run_app(e.ctx, body)


# ---------------------------------------------------------------- pictures so far


def png_rows(data: bytes) -> list[bytes]:
    """The RGB rows of a PNG as rayserver writes it (8-bit RGB, filter 0 on every row)."""
    width, height = png_size(data)
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    assert len(raw) == stride * height
    assert all(raw[y * stride] == 0 for y in range(height))
    return [raw[y * stride + 1 : (y + 1) * stride] for y in range(height)]


def test_picture_so_far_is_decoded(picture: Path, tmp_path: Path) -> None:
    """A real rpict picture cut short: its complete scanlines, the rest black."""
    data = picture.read_bytes()
    whole = read_scanlines(data)
    assert len(whole.rows) == whole.height and whole.width > 8  # run-length encoded
    # Exactly as Radiance decodes it: pvalue's numbers for each pixel.
    pv = subprocess.run(
        [bin_path("pvalue"), "-h", "-H", "-df", str(picture)], env=env(), capture_output=True
    ).stdout
    floats = struct.unpack(f"{len(pv) // 4}f", pv)
    mine = [
        (row[i + c] + 0.5) * math.ldexp(1.0, row[i + 3] - 136) if row[i + 3] else 0.0
        for row in whole.rows
        for i in range(0, len(row), 4)
        for c in range(3)
    ]
    assert mine == pytest.approx(floats, rel=1e-6)
    cut = data[: len(data) - (len(data) - data.index(b"+X")) // 2]
    part = read_scanlines(cut)
    assert 0 < len(part.rows) < part.height and part.rows == whole.rows[: len(part.rows)]
    width, height, pixels = to_rgb8(part)
    rows = png_rows(rgb_to_png(width, height, pixels))
    # (the top rows are sky: black; the ball and floor are in the rows computed)
    assert any(b"".join(rows[: len(part.rows)])) and not any(b"".join(rows[len(part.rows) :]))
    # A picture narrower than 8 pixels is written flat (4 bytes a pixel)
    with open(tmp_path / "thin.hdr", "wb") as out:
        subprocess.run(
            [
                bin_path("rpict"),
                *VIEW,
                "-x",
                "4",
                "-y",
                "4",
                "-pa",
                "0",
                "s.oct",
            ],
            cwd=picture.parent,
            env=env(),
            stdout=out,
            check=True,
        )
    thin = read_scanlines((tmp_path / "thin.hdr").read_bytes())
    assert (thin.width, len(thin.rows)) == (4, thin.height) and any(b"".join(thin.rows))
    with pytest.raises(PictureError, match="does not start with #\\?RADIANCE"):
        read_scanlines(b"P6 1 1 255\n")
