"""Radiance file headers: how they start and where they end (pictures, rtrace output).

A Radiance header starts with ``#?RADIANCE`` and ends at the first empty
line; a picture's resolution string follows it.
"""

from __future__ import annotations

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
