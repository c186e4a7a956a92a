"""Radiance ambient files (``-af``): an integrity check and a valid empty file.

Layout (Radiance's src/rt/ambio.c and ambient.c): a text header that starts
with ``#?RADIANCE`` and ends with an empty line, with ``FORMAT=Radiance_ambval``
and usually ``NCOMP=`` (colour components, 3 for RGB); then the 2-byte magic
number 561; then fixed records of 64 + NCOMP bytes each. A record holds
Radiance's portable numbers (a 4-byte big-endian mantissa and a signed
exponent byte per float); Radiance rejects a record whose weight, radii or
directions are out of range (``ambvalOK``), and so does this check, so a
stretch of zeros or a record that starts in the middle of another is found
even when the file's length happens to be a multiple of the record size.

``lookamb`` is no check by itself (it exits 0 and stops silently at the first
bad record); its count of records is compared as a second opinion.
"""

from __future__ import annotations

import math
import os
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

MAGIC = b"\x02\x31"  # 561, as Radiance's putint(AMBMAGIC, 2) writes it
FORMAT = "Radiance_ambval"
DEFAULT_NCOMP = 3
MAX_NCOMP = 24  # Radiance's MAXCSAMP
RGB_SPLITS = "780 588 480 380"  # what Radiance writes for its default -cw 380 780, -cs 3
_FHUGE = 1e10
_FTINY = 1e-3  # the larger of Radiance's two FTINY values: lenient
_ONE = 1.0 + 1e-6  # a weight of 1 decodes to 1 within rounding
_BIG_EXP = 34
_CHUNK = 8192  # records read and checked at a time
_MAX_HEADER = 1 << 16
# lvl, weight, pos[3], ndir, udir, rad[2], gpos[2], gdir[2], corral: 63 bytes;
# the colour (NCOMP mantissas and one exponent byte) follows.
_FIXED = struct.Struct(">B ib ibibib ii ibib ibib ibib I")


@dataclass(frozen=True)
class AmbientCheck:
    """What the check found; ``problem`` is None for an intact file."""

    records: int  # whole, valid records before any damage
    ncomp: int
    data_offset: int  # byte offset of the first record
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def record_size(self) -> int:
        return 64 + self.ncomp


def _flt(mant: int, exp: int) -> float:
    """A float as Radiance's getflt() decodes it."""
    if mant == 0:
        return 0.0
    return (mant + 0.5 - (mant < 0)) / 0x7FFFFFFF * 2.0**exp


def _first_bad(body: bytes, ncomp: int) -> int | None:
    """Index of the first record Radiance's ``ambvalOK`` would reject, or None.

    About 5 us a record: the checks are inlined, and big positions are found
    from the exponent byte alone (2**34 > 1e10, Radiance's FHUGE).
    """
    rec = struct.Struct(_FIXED.format + f"{ncomp + 1}x")
    ld = math.ldexp
    for i, f in enumerate(rec.iter_unpack(body)):
        w = ld(f[1], f[2] - 31)
        r0 = ld(f[11], f[12] - 31)
        r1 = ld(f[13], f[14] - 31)
        if (
            not 0.0 < w <= _ONE
            or not f[9]
            or not f[10]
            or not 0.0 < r0 < _FHUGE
            or not 0.0 < r1 < _FHUGE
            or r0 > r1 + _FTINY
            or max(f[4], f[6], f[8], f[16], f[18], f[20], f[22]) > _BIG_EXP
        ):
            return i
    return None


def _why(rec: bytes) -> str:
    """In words, why a record that _first_bad() rejected is bad."""
    f = _FIXED.unpack_from(rec)
    weight = _flt(f[1], f[2])
    rad = (_flt(f[11], f[12]), _flt(f[13], f[14]))
    if not any(rec):
        return "all zero bytes"
    if not 0.0 < weight <= _ONE:
        return f"weight {weight:g} outside (0, 1]"
    if f[9] == 0 or f[10] == 0:
        return "zero direction code"
    if not (0.0 < rad[0] < _FHUGE and 0.0 < rad[1] < _FHUGE) or rad[0] > rad[1] + _FTINY:
        return f"radii {rad[0]:g}, {rad[1]:g} out of order or range"
    return "a position or gradient beyond 1e10"


def _parse_header(data: bytes) -> tuple[int, int] | str:
    """(offset of the first record, NCOMP), or what is wrong with the header."""
    if data[:11] != b"#?RADIANCE\n":
        what = "is empty" if not data else f"starts with {data[:16]!r}"
        return f"no Radiance header: the file {what}, expected '#?RADIANCE'"
    end = data.find(b"\n\n", 0, _MAX_HEADER)
    if end < 0:
        return "the header never ends (no empty line after it)"
    fmt, ncomp = None, DEFAULT_NCOMP
    for line in data[:end].decode("latin-1").split("\n"):
        if line.startswith("FORMAT="):
            fmt = line[len("FORMAT=") :].strip()
        elif line.startswith("NCOMP="):
            try:
                ncomp = int(line[len("NCOMP=") :])
            except ValueError:
                return f"bad header line {line!r}"
            if not DEFAULT_NCOMP <= ncomp <= MAX_NCOMP:
                return f"NCOMP={ncomp} in the header; expected {DEFAULT_NCOMP} to {MAX_NCOMP}"
    if fmt != FORMAT:
        return f"header format is {fmt!r}, expected {FORMAT!r}"
    magic_at = end + 2
    if data[magic_at : magic_at + 2] != MAGIC:
        got = data[magic_at : magic_at + 2]
        return f"bad magic number {got!r} at byte {magic_at}, expected {MAGIC!r}"
    return magic_at + 2, ncomp


def check_bytes(data: bytes) -> AmbientCheck:
    """Check an ambient file's bytes: header, magic, every record whole and valid."""
    return _check(lambda off, n: data[off : off + n], len(data))


def check_file(path: str | os.PathLike[str]) -> AmbientCheck:
    """check_bytes() of a file's contents (OSError if it cannot be read)."""
    with open(path, "rb") as f:
        return check_fd(f.fileno())


def check_fd(fd: int) -> AmbientCheck:
    """check_bytes() of an open file, read in pieces with pread (the offset is not moved).

    Neither mapped nor duplicated: closing a duplicate would drop the
    caller's fcntl locks on the file.
    """
    return _check(lambda off, n: os.pread(fd, n, off), os.fstat(fd).st_size)


def _check(read_at: Callable[[int, int], bytes], length: int) -> AmbientCheck:
    parsed = _parse_header(read_at(0, min(length, _MAX_HEADER + 4)))
    if isinstance(parsed, str):
        return AmbientCheck(0, DEFAULT_NCOMP, 0, parsed)
    start, ncomp = parsed
    size = 64 + ncomp
    body = length - start
    whole = body // size
    for first in range(0, whole, _CHUNK):
        count = min(_CHUNK, whole - first)
        chunk = read_at(start + first * size, count * size)
        if len(chunk) != count * size:
            return AmbientCheck(first, ncomp, start, "the file shrank while it was checked")
        bad = _first_bad(chunk, ncomp)
        if bad is not None:
            off = start + (first + bad) * size
            why = _why(chunk[bad * size : (bad + 1) * size])
            return AmbientCheck(
                first + bad,
                ncomp,
                start,
                f"record {first + bad} of {whole} at byte {off} is damaged ({why})",
            )
    if body % size:
        off = start + whole * size
        return AmbientCheck(
            whole,
            ncomp,
            start,
            f"{body} bytes of records is not a multiple of the record size {size}: "
            f"{body % size} stray bytes after record {whole - 1} (at byte {off})",
        )
    return AmbientCheck(whole, ncomp, start)


def lookamb_count(
    path: str | os.PathLike[str] | int,
    lookamb: str | os.PathLike[str],
    env: dict[str, str],
    timeout: float = 120.0,
) -> int:
    """How many records ``lookamb -h -d`` prints (it stops silently at a bad one).

    ``path`` may be an open descriptor (read from its start, as lookamb's stdin).
    """
    with subprocess.Popen(
        [str(lookamb), "-h", "-d", *([] if isinstance(path, int) else [str(path)])],
        stdin=path if isinstance(path, int) else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    ) as proc:
        assert proc.stdout is not None
        lines = 0
        deadline = time.monotonic() + timeout
        while chunk := proc.stdout.read(1 << 16):
            lines += chunk.count(b"\n")
            if time.monotonic() > deadline:
                proc.kill()
                raise subprocess.TimeoutExpired(proc.args, timeout)
        if proc.wait() != 0:
            raise OSError(f"lookamb exited with status {proc.returncode} on {path}")
    return lines


def empty_file(command: str, *, ncomp: int = DEFAULT_NCOMP, rgb: bool = True) -> bytes:
    """A valid ambient file without records, as Radiance would start one.

    Radiance opens an existing file for update and checks only the format
    line, NCOMP and WAVELENGTH_SPLITS (``amb_headline``) and the magic
    number; the first line after ``#?RADIANCE`` is the creating command, as
    ``getinfo`` shows it. ``rgb`` adds Radiance's default wavelength splits.
    """
    if not DEFAULT_NCOMP <= ncomp <= MAX_NCOMP:
        raise ValueError(f"ncomp {ncomp}: expected {DEFAULT_NCOMP} to {MAX_NCOMP}")
    command = " ".join(command.split())  # one line, whatever the arguments held
    now = time.time()
    lines = [
        "#?RADIANCE",
        command,
        "rayserver: created empty before its first writer (no two writers create it at once)",
        time.strftime("CAPDATE= %Y:%m:%d %H:%M:%S", time.localtime(now)),
        time.strftime("GMT= %Y:%m:%d %H:%M:%S", time.gmtime(now)),
    ]
    if rgb:
        lines.append(f"WAVELENGTH_SPLITS= {RGB_SPLITS}")
    lines += [f"NCOMP={ncomp}", f"FORMAT={FORMAT}", "", ""]
    return "\n".join(lines).encode() + MAGIC
