"""Planning a simulation split across render hosts, and merging its parts.

Two kinds of work split cleanly:

* **Sensor grids**: ``rtrace`` reading rays from a ``--stdin`` file. The
  input is cut into contiguous runs of records, one part per cpu, and the
  outputs are concatenated in input order (the header of the first part kept,
  the others' dropped), which gives the bytes one run would give. ``rcontrib``
  and ``rfluxmtx`` are cut the same way, in whole matrix rows, with the
  header fixes of :mod:`rayserver.client.splitmatrix`.
* **Pictures**: ``rpict``. The picture is cut into horizontal bands of whole
  scanlines. Each band is an ordinary rpict whose view is narrowed to the band
  (``-vv``, ``-vl``) at the full picture's exact resolution (``-pa 0``), so
  every pixel centre falls where it falls in the single render; the bands are
  merged with ``pcompos`` and the merged header gets the full picture's
  ``VIEW=`` line back. ``rpiece`` is not used: see docs/split.md for why.

Nothing here talks to a server: :mod:`rayserver.client.splitrun` does.
"""

from __future__ import annotations

import math
import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rayserver.client.connection import EXIT_USAGE, ClientError
from rayserver.common.picture import strip_header

GRID_PROGRAMS = ("rtrace", "rcontrib", "rfluxmtx")
PICTURE_PROGRAMS = ("rpict",)
SPLIT_PROGRAMS = (*PICTURE_PROGRAMS, *GRID_PROGRAMS, "rad")
# Bytes per ray of the binary input formats: 6 floats or 6 doubles.
_BINARY_RECORD = {"f": 24, "d": 48}
_VIEW_KEYS = ("-vp", "-vd", "-vu", "-vh", "-vv", "-vo", "-va", "-vs", "-vl")


def usage_error(message: str) -> ClientError:
    return ClientError(message, exit_code=EXIT_USAGE)


@dataclass(frozen=True)
class Part:
    """One piece of the work: its arguments, its input bytes (grids) and its share."""

    index: int
    count: int
    label: str  # "rays 1-500 of 2000" or "rows 0-79 of 480"
    weight: float  # fraction of the whole work, for the progress bar
    args: tuple[str, ...]
    input_range: tuple[int, int] | None = None  # byte range of the --stdin file
    rows: tuple[int, int] | None = None  # scanlines [first, last+1) from the top

    @property
    def name(self) -> str:
        return f"part {self.index + 1}/{self.count} ({self.label})"


def option_value(args: Sequence[str], option: str) -> str | None:
    """The value after the last ``option`` among ``args`` (Radiance: the last one wins)."""
    value = None
    for i, word in enumerate(args[:-1]):
        if word == option:
            value = args[i + 1]
    return value


# ------------------------------------------------------------------ sensor grids


def grid_input_format(args: Sequence[str]) -> str:
    """'a', 'f' or 'd': the ray input format given by rtrace/rcontrib's ``-f`` option."""
    fmt = "a"
    for word in args:
        if len(word) >= 3 and word.startswith("-f") and word[2] in "afd" and word[2:].isalpha():
            fmt = word[2]
    return fmt


def check_grid_args(program: str, args: Sequence[str]) -> None:
    """Refuse rtrace options a split cannot honour (rcontrib's: rayserver.client.splitmatrix)."""
    for option in ("-x", "-y"):
        value = option_value(args, option)
        if value is not None and value not in ("0",):
            raise usage_error(
                f"{program} {option} {value}: a split run cannot keep an output resolution "
                f"(each part would claim the whole picture); leave {option} out or run on one host"
            )


def grid_records(data: bytes, fmt: str, source: str) -> list[int]:
    """Byte offsets where each input ray starts, plus the end offset.

    ASCII input: one ray per non-blank line of six numbers (rtrace reads
    numbers, not lines, so a line with another count would shift every
    ray after it: refused, naming the line). Binary input: fixed records.
    """
    if fmt in _BINARY_RECORD:
        size = _BINARY_RECORD[fmt]
        if len(data) % size:
            raise usage_error(
                f"--stdin {source}: {len(data)} bytes is not a whole number of "
                f"{size}-byte rays (-f{fmt} input)"
            )
        return list(range(0, len(data) + 1, size))
    offsets: list[int] = []
    pos = 0
    for number, line in enumerate(data.splitlines(keepends=True), start=1):
        words = line.split()
        if words:
            if len(words) != 6:
                raise usage_error(
                    f"--stdin {source} line {number}: {len(words)} values; expected 6 numbers "
                    "per line (origin x y z, direction x y z)"
                )
            try:
                [float(w) for w in words]
            except ValueError:
                raise usage_error(
                    f"--stdin {source} line {number}: {line.strip()[:60]!r} is not 6 numbers"
                ) from None
            offsets.append(pos)
        pos += len(line)
    if not offsets:
        raise usage_error(f"--stdin {source}: no rays in it (expected lines of 6 numbers)")
    offsets.append(pos)
    return offsets


def plan_grid(
    program: str, args: Sequence[str], data: bytes, parts: int, source: str
) -> list[Part]:
    """Contiguous runs of rays, as even as possible, at most ``parts`` (rtrace)."""
    check_grid_args(program, args)
    offsets = grid_records(data, grid_input_format(args), source)
    rays = len(offsets) - 1
    count = max(1, min(parts, rays))
    plan = []
    for k in range(count):
        first, last = rays * k // count, rays * (k + 1) // count
        plan.append(
            Part(
                index=k,
                count=count,
                label=f"rays {first + 1}-{last} of {rays}",
                weight=(last - first) / rays,
                args=tuple(args),
                input_range=(offsets[first], offsets[last]),
            )
        )
    return plan


def merge_grid(outputs: Sequence[Path], target: Path | None, stream: object = None) -> int:
    """Concatenate part outputs in order into ``target`` (atomically) or ``stream``.

    Returns the number of bytes written. The first part keeps its header.
    """
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        out = os.fdopen(fd, "wb")
    else:
        out = stream  # type: ignore[assignment]
        tmp = ""
    written = 0
    try:
        for n, path in enumerate(outputs):
            data = path.read_bytes()
            chunk = data if n == 0 else strip_header(data)
            out.write(chunk)
            written += len(chunk)
        out.flush()
        if target is not None:
            os.fchmod(out.fileno(), 0o666 & ~_umask())
            out.close()
            os.replace(tmp, target)
    except BaseException:
        if target is not None:
            out.close()
            Path(tmp).unlink(missing_ok=True)
        raise
    return written


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------ pictures


@dataclass(frozen=True)
class PictureView:
    """The full picture rpict would make: view type, view options and resolution."""

    vtype: str  # one letter: v l a h c s
    values: dict[str, str]  # "-vp" -> "1 2 3", "-vv" -> "45", ...
    width: int
    height: int

    def view_line(self) -> str:
        return " ".join(
            [f"-vt{self.vtype}", *(f"{k} {self.values[k]}" for k in _VIEW_KEYS if k in self.values)]
        )

    def band_view(self, first: int, last: int) -> list[str]:
        """-vv and -vl that narrow the view to scanlines [first, last) counted from the top."""
        fraction = (last - first) / self.height
        centre = (2 * self.height - first - last) / (2 * self.height)
        vv = float(self.values["-vv"])
        lift = float(self.values.get("-vl", "0"))
        half = math.radians(vv / 2)
        # How far the image plane reaches for each view type (Radiance's setview()).
        if self.vtype in "vc":
            band = 2 * math.degrees(math.atan(math.tan(half) * fraction))
        elif self.vtype in "la":
            band = vv * fraction
        elif self.vtype == "h":
            band = 2 * math.degrees(math.asin(math.sin(half) * fraction))
        elif self.vtype == "s":
            band = 4 * math.degrees(math.atan(math.tan(half / 2) * fraction))
        else:
            raise usage_error(f"view type -vt{self.vtype} cannot be split into bands")
        return ["-vv", f"{band:.12g}", "-vl", f"{(centre - 0.5 + lift) / fraction:.12g}"]


def split_rpict_args(args: Sequence[str]) -> tuple[list[str], str, str | None]:
    """(options, octree, -o output) of an rpict command line; refuses what cannot split."""
    if not args or args[-1].startswith("-"):
        raise usage_error(
            "rpict needs the octree as its last argument for a split run, "
            "e.g. rayfront run --hosts all --stdout pic.hdr -- rpict -vf v.vf x.oct"
        )
    options, octree = list(args[:-1]), args[-1]
    refused = {
        "-S": "renders a sequence of pictures",
        "-r": "recovers an old picture",
        "-ro": "recovers an old picture",
        "-z": "writes a depth buffer",
    }
    output = None
    kept: list[str] = []
    i = 0
    while i < len(options):
        word = options[i]
        if word in refused:
            raise usage_error(
                f"rpict {word} {refused[word]}: it cannot be split across hosts; "
                "leave it out or run on one host"
            )
        if word == "-o":
            if i + 1 >= len(options):
                raise usage_error("rpict -o needs a file name")
            output = options[i + 1]
            i += 2
            continue
        kept.append(word)
        i += 1
    return kept, octree, output


def resolve_picture(options: Sequence[str], cwd: Path, env: dict[str, str]) -> PictureView:
    """Ask rpict (with -defaults) and vwrays (-d) what view and resolution these options give.

    Radiance itself reads ``-vf`` files and ``@`` option files and applies the
    pixel aspect ratio, so the plan cannot disagree with a single render.
    """
    out = run_tool(["rpict", *options, "-defaults"], cwd, env)
    vtype = ""
    values: dict[str, str] = {}
    res: dict[str, str] = {}
    for line in out.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        key = words[0]
        if key.startswith("-vt") and len(key) == 4:
            vtype = key[3]
        elif key in _VIEW_KEYS:
            values[key] = " ".join(words[1:])
        elif key in ("-x", "-y", "-pa") and len(words) == 2:
            res[key] = words[1]
    if not vtype or "-vv" not in values or not {"-x", "-y", "-pa"} <= res.keys():
        raise ClientError(f"cannot read the view from 'rpict -defaults' (got: {out[:300]!r})")
    view_args = [f"-vt{vtype}"] + [
        w for k in _VIEW_KEYS if k in values for w in (k, *values[k].split())
    ]
    size = run_tool(
        ["vwrays", *view_args, "-x", res["-x"], "-y", res["-y"], "-pa", res["-pa"], "-d"], cwd, env
    ).split()
    try:
        width, height = int(size[size.index("-x") + 1]), int(size[size.index("-y") + 1])
    except (ValueError, IndexError):
        raise ClientError(f"cannot read the resolution from 'vwrays -d': {size!r}") from None
    return PictureView(vtype, values, width, height)


def plan_picture(options: Sequence[str], octree: str, view: PictureView, parts: int) -> list[Part]:
    """Horizontal bands of whole scanlines, at most one per scanline."""
    count = max(1, min(parts, view.height))
    plan = []
    for k in range(count):
        first, last = view.height * k // count, view.height * (k + 1) // count
        args = [
            *options,
            *view.band_view(first, last),
            "-x",
            str(view.width),
            "-y",
            str(last - first),
            "-pa",
            "0",
            octree,
        ]
        plan.append(
            Part(
                index=k,
                count=count,
                label=f"rows {first}-{last - 1} of {view.height}",
                weight=(last - first) / view.height,
                args=tuple(args),
                rows=(first, last),
            )
        )
    return plan


def merge_picture(
    bands: Sequence[tuple[Part, Path]],
    view: PictureView,
    target: Path,
    cwd: Path,
    env: dict[str, str],
) -> None:
    """pcompos the bands into ``target`` (atomically), with the full picture's VIEW= line."""
    placement: list[str] = []
    for part, path in bands:
        assert part.rows is not None
        # pcompos places a picture by its lower left corner, counted from the bottom.
        placement += [os.path.relpath(path, cwd), "0", str(view.height - part.rows[1])]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            pcompos = subprocess.Popen(
                ["pcompos", "-x", str(view.width), "-y", str(view.height), *placement],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            getinfo = subprocess.Popen(
                ["getinfo", "-a", f"VIEW= {view.view_line()}"],
                cwd=cwd,
                env=env,
                stdin=pcompos.stdout,
                stdout=out,
                stderr=subprocess.PIPE,
            )
            assert pcompos.stdout is not None
            pcompos.stdout.close()
            _, err2 = getinfo.communicate()
            err1 = pcompos.stderr.read() if pcompos.stderr else b""
            pcompos.wait()
            if pcompos.stderr:
                pcompos.stderr.close()
            if pcompos.returncode or getinfo.returncode:
                raise ClientError(
                    "merging the bands failed: pcompos exit "
                    f"{pcompos.returncode} ({err1.decode(errors='replace').strip()}), getinfo exit "
                    f"{getinfo.returncode} ({err2.decode(errors='replace').strip()})"
                )
            os.fchmod(out.fileno(), 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_tool(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    """A Radiance program's standard output, run here to plan a split; its refusal as an error."""
    try:
        done = subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClientError(f"cannot run {command[0]} here to plan the split: {exc}") from exc
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise usage_error(
            f"{' '.join(command[:1])} refused the options: "
            f"{message[-1] if message else f'exit status {done.returncode}'}"
        )
    return done.stdout
