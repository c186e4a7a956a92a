"""Sensor grids: reading points and values, and a false-colour top view as PNG.

A grid job sends rtrace a points file, one sensor a line as ``x y z dx dy dz``
(six numbers), and writes one line of results per point: three numbers (the
RGB irradiances of ``rtrace -I``) or one (after ``rcalc``, e.g. illuminance or
a daylight factor). :func:`parse_points` and :func:`parse_values` read them;
:func:`grid_png` draws the sensors seen from above (x to the right, y up),
each a square coloured by its value, with a colour scale and its numbers
(a built-in 3 x 5 pixel font: no imaging library, no fonts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rayserver.common.picture import strip_header
from rayserver.common.png import rgb_to_png

# Radiance's luminous efficacy and the weights of its RGB primaries (as rcalc's
# usual illuminance expression 179*(.265*$1+.670*$2+.065*$3)).
EFFICACY = 179.0
RGB_WEIGHTS = (0.265, 0.670, 0.065)
# (position on the scale, r, g, b): dark blue through cyan and green to red.
PALETTE = (
    (0.0, 20, 20, 140),
    (0.2, 0, 90, 255),
    (0.4, 0, 200, 200),
    (0.6, 90, 210, 0),
    (0.8, 255, 200, 0),
    (1.0, 215, 0, 0),
)
# 3 x 5 pixel glyphs, one string of 15 "#"/"." cells a glyph, rows top first.
GLYPHS = {
    "0": "####.##.##.####",
    "1": ".#.##..#..#.###",
    "2": "###..#####..###",
    "3": "###..####..####",
    "4": "#.##.####..#..#",
    "5": "####..###..####",
    "6": "####..####.####",
    "7": "###..#..#..#..#",
    "8": "####.#####.####",
    "9": "####.####..####",
    ".": "............#..",
    "-": "......###......",
}


class GridError(ValueError):
    """Text that is not a points file or a values file; the message says why."""


def _numbers(text: str, what: str, counts: tuple[int, ...]) -> list[list[float]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) not in counts:
            want = " or ".join(str(c) for c in counts)
            raise GridError(f"{what} line {number} has {len(words)} numbers, expected {want}")
        try:
            values = [float(w) for w in words]
        except ValueError as exc:
            raise GridError(f"{what} line {number}: {exc}") from exc
        if not all(math.isfinite(v) for v in values):
            raise GridError(f"{what} line {number}: not a finite number")
        rows.append(values)
    if not rows:
        raise GridError(f"{what} has no numbers")
    return rows


def parse_points(text: str) -> list[tuple[float, float]]:
    """(x, y) of each sensor of a points file (``x y z dx dy dz`` a line)."""
    return [(row[0], row[1]) for row in _numbers(text, "points file", (6,))]


def parse_values(data: bytes) -> tuple[list[float], int]:
    """(one value a point, numbers a line) of rtrace/rcalc output, header or not.

    Three numbers a line are RGB irradiances, made illuminance (lux) as
    ``179 * (0.265 R + 0.670 G + 0.065 B)``; one number is taken as it is.
    """
    text = strip_header(data).decode("ascii", "replace")
    rows = _numbers(text, "output", (1, 3))
    width = len(rows[0])
    if any(len(r) != width for r in rows):
        raise GridError("output mixes lines of 1 and 3 numbers")
    if width == 1:
        return [r[0] for r in rows], 1
    return [EFFICACY * sum(w * v for w, v in zip(RGB_WEIGHTS, r, strict=True)) for r in rows], 3


def colour(t: float) -> tuple[int, int, int]:
    """The palette's colour at ``t`` in [0, 1] (clamped), linearly between its stops."""
    t = min(1.0, max(0.0, t))
    for (t0, *c0), (t1, *c1) in zip(PALETTE, PALETTE[1:], strict=False):
        if t <= t1:
            f = (t - t0) / (t1 - t0)
            r, g, b = (round(a + (z - a) * f) for a, z in zip(c0, c1, strict=True))
            return r, g, b
    return PALETTE[-1][1], PALETTE[-1][2], PALETTE[-1][3]


def label(value: float) -> str:
    """A scale number in the glyphs there are (digits, point, minus)."""
    size = abs(value)
    text = f"{value:.0f}" if size >= 100 else f"{value:.1f}" if size >= 10 else f"{value:.2f}"
    return "0" if text.strip("-0.") == "" else text


@dataclass
class Canvas:
    """An RGB picture being drawn (top row first)."""

    width: int
    height: int

    def __post_init__(self) -> None:
        self.pixels = bytearray(b"\xff" * (self.width * self.height * 3))

    def fill(self, x0: int, y0: int, x1: int, y1: int, rgb: tuple[int, int, int]) -> None:
        """Fill [x0, x1) x [y0, y1), clipped to the canvas."""
        x0, x1 = max(0, x0), min(self.width, x1)
        run = bytes(rgb) * max(0, x1 - x0)
        for y in range(max(0, y0), min(self.height, y1)):
            start = (y * self.width + x0) * 3
            self.pixels[start : start + len(run)] = run

    def text(self, x: int, y: int, text: str, scale: int = 2) -> None:
        """``text`` in the 3 x 5 glyphs, its top left corner at (x, y)."""
        for char in text:
            glyph = GLYPHS.get(char, "")
            for i, cell in enumerate(glyph):
                if cell == "#":
                    gx, gy = x + (i % 3) * scale, y + (i // 3) * scale
                    self.fill(gx, gy, gx + scale, gy + scale, (0, 0, 0))
            x += 4 * scale

    def png(self) -> bytes:
        return rgb_to_png(self.width, self.height, bytes(self.pixels))


def _spacing(coords: list[float]) -> float:
    """The grid's spacing along one axis: the smallest step between distinct coordinates."""
    distinct = sorted(set(round(c, 6) for c in coords))
    steps = [b - a for a, b in zip(distinct, distinct[1:], strict=False) if b - a > 1e-6]
    return min(steps) if steps else 0.0


def _legend(canvas: Canvas, left: int, low: float, high: float) -> None:
    top, bottom = 20, canvas.height - 20
    for y in range(top, bottom):
        canvas.fill(left, y, left + 20, y + 1, colour((bottom - 1 - y) / (bottom - 1 - top)))
    for i in range(5):
        y = bottom - 1 - round(i * (bottom - 1 - top) / 4)
        canvas.fill(left + 20, y, left + 26, y + 1, (0, 0, 0))
        canvas.text(left + 30, y - 5, label(low + (high - low) * i / 4))


def grid_png(points: list[tuple[float, float]], values: list[float], size: int = 480) -> bytes:
    """A top view of the sensors coloured by value, with its scale on the right."""
    if len(points) != len(values) or not points:
        raise GridError(f"{len(points)} points but {len(values)} values")
    low = min(0.0, min(values))
    high = max(values) if max(values) > low else low + 1.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    dx, dy = _spacing(xs), _spacing(ys)
    cell = min(d for d in (dx, dy, 1.0) if d > 0) if (dx or dy) else 1.0
    span = max(max(xs) - min(xs), max(ys) - min(ys)) + cell
    scale = (size - 20) / span
    width = round((max(xs) - min(xs) + cell) * scale) + 20
    height = round((max(ys) - min(ys) + cell) * scale) + 20
    canvas = Canvas(width + 110, max(height, 160))
    half = max(1.0, cell * scale / 2)
    for (x, y), value in zip(points, values, strict=True):
        cx = 10 + (x - min(xs) + cell / 2) * scale
        cy = canvas.height - 10 - (y - min(ys) + cell / 2) * scale  # y up
        rgb = colour((value - low) / (high - low))
        canvas.fill(round(cx - half), round(cy - half), round(cx + half), round(cy + half), rgb)
    _legend(canvas, width + 10, low, high)
    return canvas.png()
