"""PPM (P6, 8 bit, as Radiance's ``ra_ppm`` writes it) or raw RGB rows to PNG in pure Python.

Only zlib and struct: the demo and previews need no imaging library.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


class PPMError(ValueError):
    """Bytes that are not an 8-bit binary PPM (P6)."""


def _read_ppm(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, RGB rows) of a binary P6 PPM with maxval 255."""
    fields: list[bytes] = []
    pos = 0
    # The header is four whitespace-separated fields, with '#' comments allowed between them.
    while len(fields) < 4:
        while pos < len(data) and data[pos : pos + 1].isspace():
            pos += 1
        if pos >= len(data):
            raise PPMError("PPM header ends early; expected 'P6 <width> <height> <maxval>'")
        if data[pos : pos + 1] == b"#":
            end = data.find(b"\n", pos)
            pos = len(data) if end < 0 else end + 1
            continue
        start = pos
        while pos < len(data) and not data[pos : pos + 1].isspace():
            pos += 1
        fields.append(data[start:pos])
    pos += 1  # exactly one whitespace byte separates the header from the pixels
    if fields[0] != b"P6":
        raise PPMError(f"not a binary PPM: magic {fields[0]!r}, expected b'P6'")
    try:
        width, height, maxval = (int(f) for f in fields[1:])
    except ValueError as exc:
        raise PPMError(f"PPM header fields are not numbers: {fields[1:]!r}") from exc
    if maxval != 255:
        raise PPMError(f"PPM maxval {maxval} is not supported; expected 255 (8 bit)")
    if width <= 0 or height <= 0:
        raise PPMError(f"PPM size {width}x{height} is empty")
    pixels = data[pos : pos + width * height * 3]
    if len(pixels) != width * height * 3:
        raise PPMError(
            f"PPM pixel data is {len(pixels)} bytes, expected {width * height * 3} "
            f"for {width}x{height}"
        )
    return width, height, pixels


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def ppm_to_png(data: bytes) -> bytes:
    """PNG bytes (RGB, 8 bit) of a P6 PPM."""
    return rgb_to_png(*_read_ppm(data))


def rgb_to_png(width: int, height: int, pixels: bytes) -> bytes:
    """PNG bytes of ``height`` rows of ``width`` 8-bit RGB pixels, top row first."""
    if width <= 0 or height <= 0 or len(pixels) != width * height * 3:
        raise PPMError(f"{len(pixels)} bytes are not {width}x{height} RGB pixels")
    stride = width * 3
    # Filter type 0 (none) on every row: simple and good enough for a preview.
    raw = b"".join(b"\x00" + pixels[y * stride : (y + 1) * stride] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )


def convert_file(ppm: Path, png: Path) -> None:
    """Write ``png`` from the PPM file ``ppm``."""
    png.write_bytes(ppm_to_png(ppm.read_bytes()))
