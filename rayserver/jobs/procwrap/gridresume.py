"""A resumed rtrace or rcontrib grid: answer only the rays its output file lacks.

A grid step reads its rays from a project file (stdin) and writes one record
per ray to another (stdout). Where a record is one text line (ascii output,
``-fa``/``-f?a``), or, for rtrace, NCOMP binary numbers (``-f?f``/``-f?d``
with the header that says NCOMP, and only numeric ``-o`` values), the
records already written are counted (after the header, if the file has
one; a partial last record is cut off), that many rays are skipped in the
input (6 numbers each in ascii, 24 or 48 bytes as float or double), and the
program runs again on the rest with ``-h-`` (no second header), its output
appended. Nothing else is taken as safe, and starts over: other binary
output, rtrace's ray trees (``-ot``/``-oT``) and resolutions (``-x``/``-y``),
rcontrib's output files (``-o``), its ``-c`` accumulation and its
``-x``/``-y``, a stdin or stdout that is no file of the project.
"""

from __future__ import annotations

import os
import re

from rayserver.jobs.procwrap.confine import ConfinementError, open_confined
from rayserver.jobs.rows import StepSpec

INPUT_LIMIT = 1 << 30  # an ascii ray file is read whole to find where a ray ends
_RAY_BYTES = {"a": 0, "f": 6 * 4, "d": 6 * 8}  # per input ray; 0: 6 numbers of text
_NUMBER = re.compile(rb"\S+")
_RECORD_BYTES = {"f": 4, "d": 8}  # per number of a binary output record
_FIXED = "odrRxXvVlcLpnNwW"  # rtrace -o values that are numbers (not names: s, m, M)


def formats(program: str, args: list[str]) -> tuple[str, str]:
    """(input format, output format) letters of the step's last ``-f`` option."""
    fin = fout = "a"
    i = 0
    while i < len(args) - 1:
        arg = args[i]
        if program == "rcontrib" and arg in ("-f", "-e", "-p", "-b", "-bn", "-m", "-M", "-o"):
            i += 2  # (rcontrib's -f names a cal file; its format option has letters)
            continue
        if arg.startswith("-f") and 3 <= len(arg) <= 4:
            fin, fout = arg[2], arg[-1]
        i += 1
    return fin, fout


def unsafe(program: str, args: list[str]) -> str | None:
    """Why the step's output records cannot be counted one a ray, or None."""
    fin, fout = formats(program, args)
    if fin not in _RAY_BYTES:
        return f"{program}'s input format {fin!r} is not one of a, f, d"
    if fout != "a" and (program != "rtrace" or fout not in _RECORD_BYTES):
        return f"{program}'s output -f{fin}{fout} has no records of a known size"
    if program == "rtrace":
        for arg in args[:-1]:
            if arg.startswith("-o") and ("t" in arg[2:] or "T" in arg[2:]):
                return f"rtrace {arg} writes several lines a ray"
            if arg.startswith("-o") and fout != "a" and set(arg[2:]) - set(_FIXED):
                return f"rtrace {arg} in binary writes values of no fixed size"
            if arg in ("-x", "-y"):
                return f"rtrace {arg} lays its output out as a picture"
        return None
    for i, arg in enumerate(args[:-1]):
        if arg == "-o":
            return "rcontrib writes to its own files (-o)"
        if arg in ("-x", "-y"):
            return f"rcontrib {arg} lays its output out as a picture"
        if arg == "-c" and args[i + 1] != "1":
            return "rcontrib accumulates several rays a record (-c)"
    return None


def done_records(workdir: str, output: str, fout: str = "a") -> tuple[int, int] | None:
    """(complete records in ``output``, the length they end at); None: their size unknown.

    Binary records (rtrace -ff, -fd) are NCOMP numbers of 4 or 8 bytes, as the
    output's own header says; without a header nothing tells their size.
    """
    fd = open_confined(workdir, output, write=False)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read()
    start = 0
    if data.startswith(b"#?"):
        end = data.find(b"\n\n")
        if end < 0:
            return 0, 0  # not even the header: start over
        start = end + 2
    if fout != "a":
        ncomp = re.search(rb"^NCOMP=(\d+)$", data[:start], re.MULTILINE)
        if not start or ncomp is None or int(ncomp.group(1)) < 1:
            return None
        size = int(ncomp.group(1)) * _RECORD_BYTES[fout]
        records = (len(data) - start) // size
        return records, start + records * size
    last = data.rfind(b"\n", start)
    if last < 0:
        return 0, start
    return data.count(b"\n", start, last + 1), last + 1


def input_offset(workdir: str, stdin: str, fin: str, records: int) -> int | None:
    """The byte offset of ray number ``records`` (0-based) in the input; None: not there."""
    if records == 0:
        return 0
    size = os.path.getsize(os.path.join(workdir, stdin))
    per_ray = _RAY_BYTES[fin]
    if per_ray:
        offset = records * per_ray
        return offset if offset <= size else None
    if size > INPUT_LIMIT:
        return None
    fd = open_confined(workdir, stdin, write=False)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read()
    wanted = records * 6
    for n, match in enumerate(_NUMBER.finditer(data), 1):
        if n == wanted:
            return match.end()
    return None


def plan(step: StepSpec, args: list[str], workdir: str) -> tuple[str, int, int] | str:
    """(note, input offset, output length to keep) for the resumed grid, or why not."""
    program, stdin, stdout = step["program"], step.get("stdin"), step.get("stdout")
    if not isinstance(stdin, str) or not isinstance(stdout, str):
        return f"{program}'s rays or records are not files of the project"
    why = unsafe(program, args)
    if why:
        return why
    fin, fout = formats(program, args)
    try:
        done = done_records(workdir, stdout, fout)
        if done is None:
            return f"{stdout} has no header giving its records' size (NCOMP)"
        records, keep = done
        offset = input_offset(workdir, stdin, fin, records)
    except (ConfinementError, OSError) as exc:
        return f"{program}'s files cannot be read back ({exc})"
    if offset is None:
        return f"{stdout} holds {records} records, more than {stdin} has rays"
    note = (
        f"{program} goes on after the {records} records already in {stdout}: "
        f"its rays from byte {offset} of {stdin} on, output appended (-h-)"
    )
    return note, offset, keep
