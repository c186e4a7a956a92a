"""The web dashboard: static page at ``/``, its files under ``/static/``, and picture previews.

The page itself (``rayserver/server/dashboard/static/``: index.html, app.css, app.js) is
plain HTML/CSS/JS shipped as package data and talks only to the JSON API.
This module adds the one server-side piece the API lacks:
``GET /v1/jobs/{id}/preview.png?step=<n>``, a tone-mapped PNG of a finished
job's Radiance picture.

A preview is only ever made of a job's own output: the stdout file of a step
(or, for a ``rad`` step, the pictures that rad wrote, or with ``?path=`` one
of the job's recorded outputs), resolved inside the
job's workdir with symlinks followed, and only if the file starts with the
Radiance picture header. The conversion runs Radiance's ``pfilt`` (only to
shrink big pictures), ``pcond`` and ``ra_ppm`` as asyncio subprocesses, one
conversion per job at a time and a few at most overall, and the PNG is cached
in ``<state_dir>/jobs/<id>/preview-<step>.png``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.resources
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from rayserver.common import radiance
from rayserver.common.paths import is_inside, job_folder
from rayserver.common.picture import HEADER_MAGIC, PictureError, read_scanlines, to_rgb8
from rayserver.common.png import PPMError, ppm_to_png, rgb_to_png
from rayserver.common.states import JobState
from rayserver.jobs.rows import JobRow, StepSpec
from rayserver.server.api import error_response

log = logging.getLogger("rayserver.server.dashboard.routes")

# Bigger pictures are shrunk with pfilt first: a preview is for a browser, and
# pcond/ra_ppm/zlib time grows with the pixel count.
PREVIEW_MAX_SIDE = 1600
CONVERT_TIMEOUT = 120.0
MAX_CONCURRENT_CONVERSIONS = 2
PICTURE_SUFFIXES = (".hdr", ".pic")
# A running render's picture so far is decoded in Python (pcond needs a whole
# picture): read at most this much of it, and shrink it to this size.
PARTIAL_MAX_BYTES = 256 * 1024 * 1024
PARTIAL_MAX_SIDE = 640
PARTIALS_KEPT = 16

# The only files /static/ serves, with their media types; index.html is served at /.
STATIC_FILES: dict[str, str] = {
    "app.css": "text/css",
    "app.js": "text/javascript",
    "farm.js": "text/javascript",
    "favicon.svg": "image/svg+xml",
}
INDEX_FILE = "index.html"

# The page loads nothing from elsewhere (the render host may have no internet);
# previews are blob: URLs made by fetch(), so the token never goes in a URL.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

CTX_KEY = web.AppKey("dashboard_ctx", object)
SERVICE_KEY: web.AppKey[PreviewService] = web.AppKey("dashboard_previews")
FILES_KEY: web.AppKey[dict[str, tuple[bytes, str, str]]] = web.AppKey("dashboard_files")


class PreviewError(Exception):
    """A preview that cannot be made; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------- static files


def load_static_files() -> dict[str, tuple[bytes, str, str]]:
    """name -> (bytes, content type, ETag) of the dashboard's files, read once."""
    root = importlib.resources.files("rayserver.server.dashboard") / "static"
    files = {}
    for name, ctype in [(INDEX_FILE, "text/html"), *STATIC_FILES.items()]:
        data = (root / name).read_bytes()
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        files[name] = (data, ctype, etag)
    return files


def _file_response(request: web.Request, name: str) -> web.Response:
    data, ctype, etag = request.app[FILES_KEY][name]
    # no-cache = revalidate every time, so an upgraded server never runs a stale app.js
    headers = {"ETag": etag, "Cache-Control": "no-cache", **SECURITY_HEADERS}
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    charset = None if ctype.startswith("image/") else "utf-8"
    return web.Response(body=data, content_type=ctype, charset=charset, headers=headers)


async def index(request: web.Request) -> web.Response:
    return _file_response(request, INDEX_FILE)


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        return error_response(
            404, f"no dashboard file {name!r}; known files: {', '.join(sorted(STATIC_FILES))}"
        )
    return _file_response(request, name)


# ---------------------------------------------------------------- finding the picture


def resolve_output(workdir: Path, name: str) -> Path:
    """The real path of a job's output ``name`` (relative to workdir or absolute).

    Raises PreviewError(403) when it leaves the workdir, symlinks included.
    """
    root = Path(os.path.realpath(workdir))
    real = Path(os.path.realpath(workdir / name))
    if not is_inside(real, root):
        raise PreviewError(403, f"output {name!r} resolves outside the job's folder {workdir}")
    return real


def open_regular(path: Path, root: Path | None = None) -> int:
    """A read-only descriptor of the regular file ``path`` (the caller closes it).

    O_NONBLOCK: a job could leave a FIFO under an output's name, and opening
    it must not hang the server. With ``root``, the file actually opened must
    lie inside it (checked on the descriptor, so a path swapped after
    resolving cannot lead out).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PreviewError(404, f"{path.name} is not a regular file")
        if root is not None:
            try:
                opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                opened = Path(os.path.realpath(path))  # no /proc: the resolved path
            if not is_inside(opened, Path(os.path.realpath(root))):
                raise PreviewError(403, f"{path.name} resolves outside the job's folder {root}")
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_head(path: Path, limit: int) -> bytes:
    """Up to ``limit`` bytes from the start of a regular file (never blocks on a FIFO)."""
    fd = open_regular(path)
    try:
        return os.pread(fd, limit, 0)
    finally:
        os.close(fd)


def is_picture(path: Path) -> bool:
    """True when ``path`` is a regular file starting with the Radiance picture header."""
    try:
        return read_head(path, len(HEADER_MAGIC)) == HEADER_MAGIC
    except (OSError, PreviewError):
        return False


def picture_size(picture: Path | int, name: str = "") -> tuple[int, int]:
    """(width, height) from a Radiance picture's header and resolution line.

    ``picture`` is a path or an open descriptor (then ``name`` is used in messages).
    """
    if isinstance(picture, int):
        head = os.pread(picture, 65536, 0)
    else:
        head = read_head(picture, 65536)
        name = name or picture.name
    end = head.find(b"\n\n")
    if end < 0:
        raise PreviewError(422, f"{name}: Radiance picture header has no end (blank line)")
    line = head[end + 2 :].split(b"\n", 1)[0].decode("ascii", "replace")
    match = re.fullmatch(r"\s*([-+])([XY])\s+(\d+)\s+([-+])([XY])\s+(\d+)\s*", line)
    if not match or match[2] == match[5]:
        raise PreviewError(
            422, f"{name}: bad resolution line {line[:40]!r}; expected e.g. '-Y 480 +X 640'"
        )
    sizes = {match[2]: int(match[3]), match[5]: int(match[6])}
    if sizes["X"] < 1 or sizes["Y"] < 1:
        raise PreviewError(422, f"{name}: empty picture ({sizes['X']}x{sizes['Y']})")
    return sizes["X"], sizes["Y"]


# rad's variable names may be abbreviated (rad.c: PICTURE to 3 letters, view to 2).
_RIF_ASSIGN = re.compile(r"^\s*([A-Za-z]+)\s*=\s*(.*?)\s*$")
# rad echoes each command; its pictures are the targets of '>' (pfilt ... > x.hdr) or mv.
_LOG_PICTURE = re.compile(r"(?:>\s*|^\s*mv\s+\S+\s+)([^\s>|;&]+\.(?:hdr|pic))\s*$", re.MULTILINE)


def rif_pictures(rif: Path) -> list[str]:
    """The pictures a rif makes: <PICTURE>_<view>.hdr/.pic for each view (rad's naming)."""
    try:
        text = read_head(rif, 1 << 20).decode(errors="replace")
    except (OSError, PreviewError):
        return []
    picture = rif.stem
    views: list[str] = []
    for raw in text.splitlines():
        match = _RIF_ASSIGN.match(raw.split("#", 1)[0])
        if not match:
            continue
        key, value = match[1], match[2]
        if len(key) >= 3 and "PICTURE".startswith(key.upper()) and key.isupper() and value:
            picture = value.split()[0]
        elif len(key) >= 2 and "view".startswith(key) and key.islower():
            first = value.split()[0] if value.split() else ""
            # an unnamed view ("view= -vp ...") is called by its number, counting from 1
            views.append(first if first and not first.startswith("-") else str(len(views) + 1))
    names = []
    for view in views or ["X"]:
        names += [f"{picture}_{view}{suffix}" for suffix in PICTURE_SUFFIXES]
    return names


def log_pictures(text: str) -> list[str]:
    """Pictures named as output in rad's echoed commands (in order, without repeats)."""
    seen: dict[str, None] = {}
    for match in _LOG_PICTURE.finditer(text):
        seen.setdefault(match[1], None)
    return list(seen)


def _rad_rif(step: StepSpec) -> str | None:
    args = [str(a) for a in step.get("args") or []]
    for arg in args:
        if arg.endswith(".rif"):
            return arg
    plain = [a for a in args if not a.startswith("-")]
    return plain[-1] if plain else None


def _is_rad(step: StepSpec) -> bool:
    program = str(step.get("program") or step.get("path") or "")
    return Path(program).name == "rad"


# rad renders each view into <PICTURE>_<view>.unf ("rpict ... > x.unf", or "-ro x.unf"
# when it recovers one) before pfilt makes the .hdr: a running rad step's picture so far.
_LOG_UNFILTERED = re.compile(r">\s*([^\s>|;&]+\.unf)\s*$|\s-ro\s+([^\s>|;&]+\.unf)\s", re.MULTILINE)


def rad_picture_so_far(row: JobRow, log_text: str) -> Path | None:
    """The unfiltered picture a running rad step renders now (the last one its log names)."""
    names = [m[1] or m[2] for m in _LOG_UNFILTERED.finditer(log_text)]
    for name in reversed(names):
        try:
            path = resolve_output(Path(row.workdir), name)
        except PreviewError:
            continue
        if is_picture(path):
            return path
    return None


def step_pictures(row: JobRow, index: int, log_text: str = "") -> list[Path]:
    """Real paths of the Radiance pictures step ``index`` of a job wrote, best first.

    Raises PreviewError(403) when the step's only candidate leads out of the
    job's folder, so a refused output is reported as refused, not as missing.
    """
    workdir = Path(row.workdir)
    step = row.steps[index]
    names: list[str] = []
    if isinstance(step.get("stdout"), str):  # (not a stream: that went to the client)
        names.append(step["stdout"])
    if _is_rad(step):
        names += log_pictures(log_text)
        names += [o["path"] for o in row.all_outputs() if o["path"].endswith(PICTURE_SUFFIXES)]
        rif = _rad_rif(step)
        if rif:
            with contextlib.suppress(PreviewError):
                names += rif_pictures(resolve_output(workdir, rif))
    found: list[Path] = []
    refused: PreviewError | None = None
    for name in names:
        try:
            path = resolve_output(workdir, name)
        except PreviewError as exc:
            refused = refused or exc  # never a job output; remember why, try the others
            continue
        if path not in found and is_picture(path):
            found.append(path)
    if not found and refused is not None:
        raise refused
    return found


def _project_root(row: JobRow) -> Path:
    """The folder the job's outputs are named from (the project; the steps' folder before)."""
    return Path(getattr(row, "project_dir", None) or row.workdir)


def output_picture(row: JobRow, name: str) -> Path:
    """The real path of the job's recorded output ``name``, when it is a Radiance picture."""
    if name not in {o["path"] for o in row.all_outputs()}:
        raise PreviewError(404, f"{name!r} is not an output of job {row.id}")
    path = resolve_output(_project_root(row), name)
    if not is_picture(path):
        raise PreviewError(404, f"output {name!r} of job {row.id} is not a Radiance picture")
    return path


def find_picture(row: JobRow, step: int | None, log_text: str = "") -> tuple[int, Path]:
    """(step index, picture) to preview; the last step with a picture when step is None."""
    steps = row.steps or []
    if step is not None:
        if not 0 <= step < len(steps):
            raise PreviewError(
                404,
                f"job {row.id} has no step {step}; its steps are numbered 0 to {len(steps) - 1}",
            )
        pictures = step_pictures(row, step, log_text)
        if not pictures:
            raise PreviewError(
                404,
                f"step {step} of job {row.id} wrote no Radiance picture "
                f"(a file starting with #?RADIANCE in the job's folder)",
            )
        return step, pictures[0]
    refused: PreviewError | None = None
    for index in reversed(range(len(steps))):
        try:
            pictures = step_pictures(row, index, log_text)
        except PreviewError as exc:
            refused = refused or exc
            continue
        if pictures:
            return index, pictures[0]
    if refused is not None:
        raise refused
    raise PreviewError(
        404,
        f"job {row.id} wrote no Radiance picture (a file starting with #?RADIANCE "
        f"in the job's folder)",
    )


# ---------------------------------------------------------------- conversion


def partial_png(picture: Path, root: Path) -> tuple[bytes, int, int]:
    """(PNG, complete scanlines, height) of ``picture`` as far as it is written."""
    try:
        fd = open_regular(picture, root)
    except OSError as exc:
        raise PreviewError(404, f"{picture.name} cannot be read: {exc.strerror or exc}") from exc
    try:
        size = os.fstat(fd).st_size
        if size > PARTIAL_MAX_BYTES:
            raise PreviewError(
                422,
                f"{picture.name} is {size} bytes, over {PARTIAL_MAX_BYTES} for a preview so far",
            )
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    try:
        scan = read_scanlines(data)
    except PictureError as exc:
        raise PreviewError(422, f"{picture.name}: {exc}") from exc
    width, height, pixels = to_rgb8(scan, PARTIAL_MAX_SIDE)
    return rgb_to_png(width, height, pixels), len(scan.rows), scan.height


async def _run(
    argv: list[str],
    env: dict[str, str],
    cwd: Path,
    *,
    stdin: int | None = None,
    stdout: int | None = None,
    pass_fds: tuple[int, ...] = (),
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=str(cwd),
        pass_fds=pass_fds,
        stdin=stdin if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=stdout if stdout is not None else asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _reap(procs: list[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _stderr(data: bytes) -> str:
    return data.decode(errors="replace").strip()[-500:] or "no message"


async def picture_to_png(
    picture_fd: int,
    name: str,
    bin_dir: Path,
    env: dict[str, str],
    scratch: Path,
    timeout: float = CONVERT_TIMEOUT,
) -> bytes:
    """PNG bytes of an open Radiance picture: [pfilt to shrink] -> pcond -> ra_ppm -> PNG.

    The programs read the already verified descriptor as /dev/fd/N, never the
    path again. pcond reads its input twice, so it gets a file, never a pipe;
    a picture larger than PREVIEW_MAX_SIDE is first shrunk into ``scratch``.
    """
    width, height = picture_size(picture_fd, name)
    run = _Conversion(name, bin_dir, env, scratch.parent)
    try:
        async with asyncio.timeout(timeout):
            source, fds = f"/dev/fd/{picture_fd}", (picture_fd,)
            if max(width, height) > PREVIEW_MAX_SIDE:
                await run.shrink(source, fds, width, height, scratch)
                source, fds = str(scratch), ()
            ppm = await run.to_ppm(source, fds)
    except TimeoutError as exc:
        raise PreviewError(500, f"converting {name} took longer than {timeout:g} s") from exc
    finally:
        await _reap(run.procs)
        with contextlib.suppress(FileNotFoundError):
            scratch.unlink()
    try:
        # zlib releases the GIL; a thread keeps a big picture from stalling the event loop
        return await asyncio.to_thread(ppm_to_png, ppm)
    except PPMError as exc:
        raise PreviewError(500, f"ra_ppm wrote an unreadable PPM for {name}: {exc}") from exc


@dataclass
class _Conversion:
    """The Radiance programs of one preview; every process started is in ``procs``."""

    name: str
    bin_dir: Path
    env: dict[str, str]
    cwd: Path
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)

    async def shrink(
        self, source: str, fds: tuple[int, ...], width: int, height: int, scratch: Path
    ) -> None:
        """pfilt the picture into ``scratch`` at most PREVIEW_MAX_SIDE on its longer side."""
        scale = PREVIEW_MAX_SIDE / max(width, height)
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        argv = [str(self.bin_dir / "pfilt"), "-1", "-x", str(w), "-y", str(h), "-p", "0", source]
        with open(scratch, "wb") as out:
            proc = await _run(argv, self.env, self.cwd, stdout=out.fileno(), pass_fds=fds)
        self.procs.append(proc)
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise PreviewError(
                500, f"pfilt failed on {self.name} (exit {proc.returncode}): {_stderr(err)}"
            )

    async def to_ppm(self, source: str, fds: tuple[int, ...]) -> bytes:
        """pcond | ra_ppm: the picture as 8-bit PPM, as a person would see it."""
        read_end, write_end = os.pipe()
        try:
            pcond = await _run(
                [str(self.bin_dir / "pcond"), source],
                self.env,
                self.cwd,
                stdout=write_end,
                pass_fds=fds,
            )
            self.procs.append(pcond)
            os.close(write_end)
            write_end = -1
            ra_ppm = await _run([str(self.bin_dir / "ra_ppm")], self.env, self.cwd, stdin=read_end)
            self.procs.append(ra_ppm)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
        assert pcond.stderr is not None
        (ppm, ppm_err), pcond_err = await asyncio.gather(ra_ppm.communicate(), pcond.stderr.read())
        await pcond.wait()
        if pcond.returncode != 0:
            raise PreviewError(
                500, f"pcond failed on {self.name} (exit {pcond.returncode}): {_stderr(pcond_err)}"
            )
        if ra_ppm.returncode != 0:
            raise PreviewError(
                500, f"ra_ppm failed on {self.name} (exit {ra_ppm.returncode}): {_stderr(ppm_err)}"
            )
        return ppm


@dataclass
class PreviewService:
    """Makes and caches previews; one conversion per job at a time, a few overall."""

    state_dir: Path  # the installation's state folder (the jobs' folders are in it)
    max_concurrent: int = MAX_CONCURRENT_CONVERSIONS
    # job id -> (lock, number of requests using it); dropped when unused
    _locks: dict[int, tuple[asyncio.Lock, int]] = field(default_factory=dict)
    _tasks: set[asyncio.Task[Path]] = field(default_factory=set)
    _slots: asyncio.Semaphore | None = None
    # (path, size, mtime) -> a picture so far, the oldest dropped first
    _partials: dict[tuple[str, int, int], tuple[bytes, int, int]] = field(default_factory=dict)

    def cache_path(self, job_id: int, step: int | str) -> Path:
        """The PNG of a step's picture (``step``: its index) or of an output (a key of its path)."""
        return job_folder(self.state_dir, job_id) / f"preview-{step}.png"

    async def preview(
        self,
        job_id: int,
        step: int | str,
        picture: Path,
        workdir: Path,
        bin_dir: Path,
        env: dict[str, str],
    ) -> Path:
        """The cached PNG for (job, step), made first if missing or older than the picture."""
        task = asyncio.ensure_future(self._make(job_id, step, picture, workdir, bin_dir, env))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # shield: a client that goes away does not waste a half-done conversion
        return await asyncio.shield(task)

    async def _make(
        self,
        job_id: int,
        step: int | str,
        picture: Path,
        workdir: Path,
        bin_dir: Path,
        env: dict[str, str],
    ) -> Path:
        png = self.cache_path(job_id, step)
        lock, users = self._locks.get(job_id, (asyncio.Lock(), 0))
        self._locks[job_id] = (lock, users + 1)
        try:
            async with lock:
                # Opened (and checked to be inside the workdir) once; from here on
                # only this descriptor is read, whatever happens to the path.
                try:
                    fd = open_regular(picture, workdir)
                except OSError as exc:
                    raise PreviewError(
                        404, f"{picture.name} cannot be read: {exc.strerror or exc}"
                    ) from exc
                try:
                    if os.pread(fd, len(HEADER_MAGIC), 0) != HEADER_MAGIC:
                        raise PreviewError(404, f"{picture.name} is no longer a Radiance picture")
                    with contextlib.suppress(FileNotFoundError):
                        if png.stat().st_mtime_ns >= os.fstat(fd).st_mtime_ns:
                            return png
                    if self._slots is None:
                        self._slots = asyncio.Semaphore(self.max_concurrent)
                    async with self._slots:
                        png.parent.mkdir(parents=True, exist_ok=True)
                        scratch = png.with_name(f".preview-{step}.{os.getpid()}.hdr")
                        data = await picture_to_png(fd, picture.name, bin_dir, env, scratch)
                finally:
                    os.close(fd)
                tmp = png.with_name(f".{png.name}.{os.getpid()}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, png)  # atomic: a reader never sees half a PNG
                log.info(
                    "preview of job %d step %d: %s (%d bytes)", job_id, step, picture, len(data)
                )
                return png
        finally:
            lock, users = self._locks[job_id]
            if users <= 1:
                del self._locks[job_id]
            else:
                self._locks[job_id] = (lock, users - 1)

    async def partial(self, picture: Path, root: Path) -> tuple[bytes, int, int]:
        """(PNG, complete scanlines, height) of a picture still being written.

        Kept in memory while the file's size and time stay the same (tabs that
        look at one render between two of rpict's writes cost one decoding);
        shares the conversion slots with the finished pictures' previews.
        """
        try:
            st = await asyncio.to_thread(os.stat, picture)
            key = (str(picture), st.st_size, st.st_mtime_ns)
        except OSError:
            key = None
        cached = self._partials.get(key) if key else None
        if cached is not None:
            return cached
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrent)
        async with self._slots:
            made = await asyncio.to_thread(partial_png, picture, root)
        if key is not None:
            if len(self._partials) >= PARTIALS_KEPT:
                self._partials.pop(next(iter(self._partials)))
            self._partials[key] = made
        return made

    async def close(self) -> None:
        """Cancel running conversions (their processes are killed and reaped)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# ---------------------------------------------------------------- the endpoint


def _job_log(ctx: Any, job_id: int) -> str:
    """The job's log text (for rad's echoed command lines); empty if there is none."""
    log_path = getattr(ctx.db, "log_path", None)
    path = log_path(job_id) if log_path else ctx.layout.job_dir(job_id) / "log"
    try:
        with open(path, "rb") as fh:
            return fh.read(4 * 1024 * 1024).decode(errors="replace")
    except OSError:
        return ""


def _locate_picture(ctx: Any, row: JobRow, step: int | None) -> tuple[int, Path]:
    """:func:`find_picture` for a job, with its log when rad's command lines can tell."""
    log_text = _job_log(ctx, row.id) if any(_is_rad(s) for s in row.steps) else ""
    return find_picture(row, step, log_text)


def _parse_int(value: str, what: str, minimum: int) -> int:
    # digits only and at most 18 of them: int() would take "1_0" or " 5", and a
    # bigger number overflows SQLite's INTEGER
    if not (value.isascii() and value.isdigit() and len(value) <= 18) or int(value) < minimum:
        raise PreviewError(400, f"bad {what} {value!r}: expected a whole number >= {minimum}")
    return int(value)


def _pictures_so_far(ctx: Any, row: JobRow, index: int) -> list[Path]:
    """A running step's picture candidates: a rad step's .unf being rendered first."""
    if not _is_rad(row.steps[index]):
        return step_pictures(row, index)
    log_text = _job_log(ctx, row.id)
    unfiltered = rad_picture_so_far(row, log_text)
    return [unfiltered] if unfiltered else step_pictures(row, index, log_text)


async def _running_preview(
    request: web.Request, ctx: Any, row: JobRow, step: int | None
) -> web.Response:
    """The picture so far of a running job's step (default: the step running now)."""
    index = step if step is not None else max(0, int(row.current_step or 1) - 1)
    if not 0 <= index < len(row.steps or []):
        raise PreviewError(404, f"job {row.id} has no step {index}")
    if index > max(0, int(row.current_step or 1) - 1):
        raise PreviewError(404, f"step {index} of job {row.id} has not started yet")
    pictures = await asyncio.to_thread(_pictures_so_far, ctx, row, index)
    try:
        if not pictures:
            raise PreviewError(204, "no picture yet")
        found = await request.app[SERVICE_KEY].partial(pictures[0], Path(row.workdir))
    except PreviewError as exc:
        if exc.status not in (204, 422):
            raise
        # Nothing to show yet (no header out, a step that makes no picture): not an
        # error while the job runs, so the page's refreshes log none.
        return web.Response(status=204, headers={"Cache-Control": "no-store"})
    png, done, height = found
    return web.Response(
        body=png,
        content_type="image/png",
        headers={
            "Cache-Control": "no-store",
            "X-Preview-Step": str(index),
            "X-Preview-Rows": f"{done}/{height}",
            "X-Content-Type-Options": "nosniff",
        },
    )


async def preview(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX_KEY]
    try:
        job_id = _parse_int(request.match_info["id"], "job id", 1)
        step = request.query.get("step")
        step_index = _parse_int(step, "step", 0) if step is not None else None
        row = ctx.db.get(job_id)
        if row is None:
            raise PreviewError(404, f"no job {job_id}")
        if row.state == JobState.RUNNING and "path" not in request.query:
            return await _running_preview(request, ctx, row, step_index)
        if row.state != JobState.DONE:
            raise PreviewError(
                409,
                f"job {job_id} is {row.state}; a preview exists only for a job that is "
                "running (its picture so far) or done",
            )
        output = request.query.get("path")
        if output is not None and step is not None:
            raise PreviewError(400, "give step (a step's picture) or path (an output), not both")
        # The job's folder may be on a network share: its log and files are read in a thread.
        if output is not None:
            key: int | str = "o" + hashlib.sha1(output.encode()).hexdigest()[:16]
            picture = await asyncio.to_thread(output_picture, row, output)
            root = _project_root(row)
        else:
            key, picture = await asyncio.to_thread(_locate_picture, ctx, row, step_index)
            root = Path(row.workdir)
        settings = ctx.live.settings
        try:
            bin_dir = radiance.bin_dir(settings)
            env = radiance.simulation_env(settings)
        except FileNotFoundError as exc:
            raise PreviewError(500, str(exc)) from exc
        service = request.app[SERVICE_KEY]
        png = await service.preview(job_id, key, picture, root, bin_dir, env)
    except PreviewError as exc:
        return error_response(exc.status, exc.message)
    which = {"X-Preview-Step": str(key)} if isinstance(key, int) else {}
    return web.FileResponse(
        png,
        headers={
            "Content-Type": "image/png",
            # the same URL shows another picture after a re-render of the file: revalidate
            "Cache-Control": "private, no-cache",
            **which,
            "X-Content-Type-Options": "nosniff",
        },
    )


def setup_dashboard(app: web.Application, ctx: Any) -> None:
    """Register GET /, GET /static/{name}, GET /v1/jobs/{id}/preview.png and grid.png.

    ``ctx`` provides ``.layout`` (Layout), ``.live.settings`` (Settings, read
    per request so a reload applies) and ``.db`` (JobDB with ``get(id)``).
    The security middleware protects /v1/*; / and /static/* are open.
    """
    app[CTX_KEY] = ctx
    app[FILES_KEY] = load_static_files()
    service = PreviewService(ctx.layout.state_dir)
    app[SERVICE_KEY] = service

    async def close(_app: web.Application) -> None:
        await service.close()

    app.on_cleanup.append(close)
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/v1/jobs/{id}/preview.png", preview)
    from rayserver.server.dashboard import grid  # (grid uses this module's helpers)

    grid.setup_grid(app)


__all__ = [
    "PreviewError",
    "PreviewService",
    "find_picture",
    "log_pictures",
    "picture_size",
    "picture_to_png",
    "resolve_output",
    "rif_pictures",
    "setup_dashboard",
]
