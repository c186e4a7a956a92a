"""How far two results of the same command are apart (``rayfront reproduce``).

* Byte-identical, or identical but for a picture header's capture time
  (``CAPDATE=`` and ``GMT=`` lines: rpict writes the clock time there).
* Pictures (a Radiance header with ``FORMAT=32-bit_rle_rgbe`` or ``_xyze``):
  the pixel values read with ``pvalue -h -H -df`` (Radiance's own decoder),
  compared as the mean relative difference sum|a-b| / sum|a| over every
  channel of every pixel (single pixels of a -u+ render scatter widely; the
  mean is what two direct runs keep close), the largest per-value one
  reported beside it.
* Numeric text (rtrace, rcontrib, rcalc output: numbers only after an
  optional header): the largest relative difference |a-b| / max(|a|, |b|)
  over the values, with values below 1e-9 in both taken as equal.
* Anything else differs or not.
"""

from __future__ import annotations

import array
import subprocess
from dataclasses import dataclass
from pathlib import Path

TIME_LINES = (b"CAPDATE=", b"GMT=")
TINY = 1e-9


@dataclass(frozen=True)
class Difference:
    """How one output compares: kind is identical, picture, numbers or binary."""

    kind: str
    measure: float  # the compared figure (0 for identical; inf where nothing compares)
    note: str


def _split_header(data: bytes) -> tuple[bytes, bytes]:
    if not data.startswith(b"#?RADIANCE"):
        return b"", data
    end = data.find(b"\n\n")
    return (data, b"") if end < 0 else (data[: end + 1], data[end + 2 :])


def without_time(data: bytes) -> bytes:
    """A Radiance file with its header's capture-time lines left out."""
    header, body = _split_header(data)
    lines = [line for line in header.split(b"\n") if not line.startswith(TIME_LINES)]
    return b"\n".join(lines) + b"\n" + body


def is_picture(data: bytes) -> bool:
    header, _ = _split_header(data)
    return b"FORMAT=32-bit_rle_rgbe" in header or b"FORMAT=32-bit_rle_xyze" in header


def compare_files(old: Path, new: Path, pvalue: Path | None) -> Difference:
    """How ``new`` compares to ``old`` (see the module's docstring)."""
    a, b = old.read_bytes(), new.read_bytes()
    if a == b:
        return Difference("identical", 0.0, "byte-identical")
    if without_time(a) == without_time(b):
        return Difference("identical", 0.0, "identical but for the header's capture time")
    if is_picture(a) and is_picture(b):
        return _pictures(old, new, pvalue)
    numbers = _numbers(a), _numbers(b)
    if numbers[0] is not None and numbers[1] is not None:
        return _compare_numbers(numbers[0], numbers[1])
    return Difference("binary", float("inf"), "the bytes differ (neither picture nor numbers)")


def _pixels(path: Path, pvalue: Path) -> array.array[float]:
    out = subprocess.run(
        [str(pvalue), "-h", "-H", "-df", str(path)], capture_output=True, check=True, timeout=300
    ).stdout
    values = array.array("f")
    values.frombytes(out[: len(out) - len(out) % 4])
    return values


def _resolution(data: bytes) -> bytes:
    _, body = _split_header(data)
    return body.split(b"\n", 1)[0]


def _pictures(old: Path, new: Path, pvalue: Path | None) -> Difference:
    if _resolution(old.read_bytes()) != _resolution(new.read_bytes()):
        return Difference("picture", float("inf"), "the pictures' resolutions differ")
    if pvalue is None:
        return Difference("picture", float("inf"), "pixels differ (no pvalue here to say how)")
    a, b = _pixels(old, pvalue), _pixels(new, pvalue)
    if len(a) != len(b) or not a:
        return Difference("picture", float("inf"), "the pictures' pixel counts differ")
    total = sum(abs(x) for x in a) or TINY
    diff = sum(abs(x - y) for x, y in zip(a, b, strict=True))
    largest = max(_rel(x, y) for x, y in zip(a, b, strict=True))
    mean = diff / total
    return Difference(
        "picture",
        mean,
        f"pixel values: mean relative difference {mean:.4f}, largest {largest:.3g} "
        f"({len(a) // 3} pixels)",
    )


def _numbers(data: bytes) -> list[float] | None:
    _, body = _split_header(data)
    try:
        return [float(w) for w in body.decode("ascii").split()]
    except (UnicodeDecodeError, ValueError):
        return None


def _rel(x: float, y: float) -> float:
    scale = max(abs(x), abs(y))
    return 0.0 if scale < TINY else abs(x - y) / scale


def _compare_numbers(a: list[float], b: list[float]) -> Difference:
    if len(a) != len(b):
        return Difference("numbers", float("inf"), f"{len(a)} values before, {len(b)} now")
    largest = max((_rel(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    return Difference(
        "numbers", largest, f"{len(a)} values: largest relative difference {largest:.4g}"
    )
