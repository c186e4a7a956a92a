"""Radiance file headers and pictures: headers (pictures, rtrace output), partial pictures.

A Radiance header starts with ``#?RADIANCE`` and ends at the first empty
line; a picture's resolution string follows it, then its scanlines, which
:func:`read_scanlines` decodes as far as they are written (a running
render's picture so far) and :func:`to_rgb8` turns into 8-bit RGB.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

HEADER_MAGIC = b"#?RADIANCE"


def has_header(data: bytes) -> bool:
    """True when ``data`` starts with a Radiance header."""
    return data[: len(HEADER_MAGIC)] == HEADER_MAGIC


def strip_header(data: bytes) -> bytes:
    """Output without its Radiance header (which ends at the first empty line)."""
    if not has_header(data):
        return data
    end = data.find(b"\n\n")
    return b"" if end < 0 else data[end + 2 :]


# ---------------------------------------------------------------- partial pictures
#
# rpict writes its picture to stdout a scanline at a time, from the top, so a
# running render's output file holds the header, the resolution line and the
# scanlines computed so far (the last one maybe cut short). These functions
# decode the complete scanlines of such a file, flat or run-length encoded
# (Radiance's two scanline formats), for a preview of the picture so far.


class PictureError(ValueError):
    """Bytes that are not (the start of) a Radiance picture; the message says why."""


@dataclass
class Scanlines:
    """The complete scanlines of a (maybe still growing) picture, top first.

    ``rows`` hold ``width`` RGBE pixels each (4 bytes a pixel, flat), in file
    order; ``bottom_up`` (+Y) and ``right_to_left`` (-X) say how the file runs.
    """

    width: int
    height: int
    rows: list[bytes]
    bottom_up: bool = False
    right_to_left: bool = False


_RESOLUTION = re.compile(rb"([-+])([XY]) +(\d+) +([-+])([XY]) +(\d+)\s*")


def _resolution(data: bytes) -> tuple[int, int, bool, bool, int]:
    """(width, height, bottom_up, right_to_left, offset of the first scanline)."""
    if not has_header(data):
        raise PictureError("not a Radiance picture: it does not start with #?RADIANCE")
    end = data.find(b"\n\n")
    if end < 0:
        raise PictureError("the Radiance header has not ended yet (no blank line)")
    eol = data.find(b"\n", end + 2)
    if eol < 0:
        raise PictureError("the resolution line is not written yet")
    match = _RESOLUTION.fullmatch(data[end + 2 : eol])
    if not match or match[2] != b"Y" or match[5] != b"X":
        line = data[end + 2 : eol][:40].decode("ascii", "replace")
        raise PictureError(f"resolution line {line!r}: expected '-Y <height> +X <width>'")
    height, width = int(match[3]), int(match[6])
    if not (0 < width < 1 << 20 and 0 < height < 1 << 20):
        raise PictureError(f"picture size {width}x{height} is out of range")
    return width, height, match[1] == b"+", match[4] == b"-", eol + 1


def _rle_scanline(data: bytes, pos: int, width: int) -> tuple[bytes, int] | None:
    """One new-style (per-component run-length) scanline at ``pos``: (RGBE, next) or None."""
    parts: list[bytes] = []
    for _component in range(4):
        chunks: list[bytes] = []
        got = 0
        while got < width:
            if pos >= len(data):
                return None
            code = data[pos]
            if code > 128:  # a run: one value, code-128 times
                if pos + 1 >= len(data):
                    return None
                count = code - 128
                chunks.append(data[pos + 1 : pos + 2] * count)
                pos += 2
            else:  # code literal values
                count = code
                if count == 0 or pos + 1 + count > len(data):
                    if count == 0:
                        raise PictureError("bad run-length code 0 in a scanline")
                    return None
                chunks.append(data[pos + 1 : pos + 1 + count])
                pos += 1 + count
            got += count
        if got != width:
            raise PictureError(f"a scanline's runs overrun its width {width}")
        parts.append(b"".join(chunks))
    r, g, b, e = parts
    pixels = bytearray(width * 4)
    pixels[0::4], pixels[1::4], pixels[2::4], pixels[3::4] = r, g, b, e
    return bytes(pixels), pos


def _flat_scanline(data: bytes, pos: int, width: int) -> tuple[bytes, int] | None:
    """One old-style scanline (4-byte pixels, (1,1,1,n) repeating the last): (RGBE, next)."""
    out = bytearray()
    shift = 0
    while len(out) < width * 4:
        if pos + 4 > len(data):
            return None
        pixel = data[pos : pos + 4]
        pos += 4
        if pixel[:3] == b"\x01\x01\x01" and out:
            count = pixel[3] << shift
            out += out[-4:] * count
            shift += 8
        else:
            out += pixel
            shift = 0
    if len(out) != width * 4:
        raise PictureError(f"a scanline's repeats overrun its width {width}")
    return bytes(out), pos


def read_scanlines(data: bytes) -> Scanlines:
    """The complete scanlines of ``data``, a Radiance picture as far as it is written."""
    width, height, bottom_up, right_to_left, pos = _resolution(data)
    rows: list[bytes] = []
    while len(rows) < height and pos < len(data):
        head = data[pos : pos + 4]
        if len(head) < 4:
            break
        rle = 8 <= width < 32768 and head[0] == 2 and head[1] == 2 and not head[2] & 0x80
        if rle and (head[2] << 8 | head[3]) != width:
            raise PictureError(f"a scanline says it is {head[2] << 8 | head[3]} wide, not {width}")
        line = _rle_scanline(data, pos + 4, width) if rle else _flat_scanline(data, pos, width)
        if line is None:
            break  # the scanline being written: not complete yet
        rows.append(line[0])
        pos = line[1]
    return Scanlines(width, height, rows, bottom_up, right_to_left)


def _luminance_scale(samples: list[tuple[float, float, float]]) -> float:
    """A multiplier that puts the log-average luminance of ``samples`` at mid grey."""
    lums = [0.265 * r + 0.670 * g + 0.065 * b for r, g, b in samples]
    lums = [v for v in lums if v > 0]
    if not lums:
        return 1.0
    key = math.exp(sum(math.log(v) for v in lums) / len(lums))
    return 0.18 / key


def to_rgb8(scan: Scanlines, max_side: int = 640) -> tuple[int, int, bytes]:
    """(width, height, 8-bit RGB rows) of the picture so far, shrunk to ``max_side``.

    Missing scanlines are black. Exposure from the log-average luminance of
    what is computed (so the preview does not darken as black rows fill in),
    then a gamma of 2.2: a preview, not pcond's human-vision tone mapping.
    """
    step = max(1, math.ceil(max(scan.width, scan.height) / max_side))
    out_w, out_h = math.ceil(scan.width / step), math.ceil(scan.height / step)
    xs = range(0, scan.width, step)
    if scan.right_to_left:
        xs = range(scan.width - 1, -1, -step)
    ldexp = math.ldexp
    table = [ldexp(1.0, e - 136) if e else 0.0 for e in range(256)]
    sampled: list[list[tuple[float, float, float]]] = []
    for y in range(0, len(scan.rows), step):
        row = scan.rows[y]
        sampled.append(
            [
                (
                    (row[4 * x] + 0.5) * (f := table[row[4 * x + 3]]),
                    (row[4 * x + 1] + 0.5) * f,
                    (row[4 * x + 2] + 0.5) * f,
                )
                for x in xs
            ]
        )
    scale = _luminance_scale([p for row in sampled for p in row])
    gamma = [min(255, int(255 * (i / 1023) ** (1 / 2.2) + 0.5)) for i in range(1024)]
    pixels = bytearray(out_w * out_h * 3)
    for y, row in enumerate(sampled):
        target = (out_h - 1 - y) if scan.bottom_up else y
        base = target * out_w * 3
        for x, (r, g, b) in enumerate(row):
            i = base + 3 * x
            pixels[i] = gamma[min(1023, int(r * scale * 1023))]
            pixels[i + 1] = gamma[min(1023, int(g * scale * 1023))]
            pixels[i + 2] = gamma[min(1023, int(b * scale * 1023))]
    return out_w, out_h, bytes(pixels)
