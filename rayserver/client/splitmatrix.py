"""Contribution matrices split across hosts: rcontrib, and rfluxmtx with sensor rays on stdin.

A matrix row is one record: ``-c N`` rays (default 1) summed into one line of
coefficients. The rays are cut into runs of whole records (whole scanlines
when ``-x`` and ``-y`` give a picture); each part gets its own ``-y`` (its
rows) and writes its ``-o`` files under a folder of its own. The merge puts
the rows together in input order, per output (standard output and every file
an ``-o`` pattern made), with the header the single run writes: its command
line, ``NROWS`` for the whole matrix, the resolution string of a picture.
Without ``-y`` a single run writes no ``NROWS`` and rmtxop cannot read its
result; the merged one gets the row count, which rayfront knows.

Facts from Radiance's source (src/rt/rc2.c, rcmain.c, src/util/rfluxmtx.c):
rcontrib prints ``NROWS=yres*(xres or 1)`` when ``-y`` > 0, ``NCOLS`` when
``-x`` is 0 or a record has more than one value, a resolution string when the
stream has one value per record and both ``-x`` and ``-y`` are > 0 (even with
``-h-``); its header's command line is its arguments without the octree,
each quoted as fputword() does. rfluxmtx with the sender ``-`` (pass-through)
execs rcontrib with ``-fo+``, its options, the last ``-x``/``-y``, ``-c``, the
receiver's ``-m``/``-o`` and ``!oconv -f ...`` as the octree.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rayserver.client.connection import ClientError
from rayserver.client.splitplan import Part, grid_input_format, grid_records, usage_error
from rayserver.common.picture import HEADER_MAGIC, has_header

CONTRIB_PROGRAMS = ("rcontrib", "rfluxmtx")
_RESOLUTION = re.compile(rb"^[-+]Y\s+\d+\s+[-+]X\s+(\d+)\n$")
_PATTERN = re.compile(r"%\d*[sdioxX]")
# rfluxmtx options that take values (its option screening in main()), to find the sender.
_RFLUX_VALUES = {"-f": 1, "-x": 1, "-y": 1, "-c": 1, "-cs": 1, "-cw": 2, "-n": 1, "-s": 1}
_RFLUX_VALUES |= {"-o": 1, "-t": 1, "-e": 1, "-bj": 1, "-av": 3, "-me": 3, "-ma": 3}
# rcontrib options with one word value that could look like one of ours.
_RC_VALUES = {"-e", "-f", "-p", "-b", "-bn", "-m", "-M", "-o", "-x", "-y", "-c", "-n", "-t"}


@dataclass(frozen=True)
class ContribSpec:
    """What a split must keep of an rcontrib/rfluxmtx command line."""

    program: str
    options_end: int  # args[:options_end] are the options
    group: int  # rays per record (-c)
    xres: int
    yres: int  # 0: no -y given
    y_at: tuple[int, ...]  # argument indices of -y values the parts change
    o_at: tuple[int, ...]  # argument indices of -o patterns
    force: bool  # -fo: outputs may be overwritten

    @property
    def per_row(self) -> int:
        """Records in one -y row: a scanline of -x records when -x and -y make a picture."""
        return self.xres if self.xres > 0 and self.yres > 0 else 1

    @property
    def picture(self) -> bool:
        return self.xres > 0 and self.yres > 0


def fputword(word: str) -> str:
    """A word as Radiance's fputword() writes it in a header's command line."""
    quote = ""
    spaced = not word or any(c.isspace() for c in word)
    for i, c in enumerate(word):
        if i and c == '"' and i + 1 < len(word):
            quote = "'"
        elif i and c == "'" and i + 1 < len(word):
            quote = '"'
    if spaced or quote:
        quote = quote or '"'
        return f"{quote}{word}{quote}"
    return word


def _bool_option(word: str, size: int, value: bool) -> bool:
    """Radiance's check_bool: nothing after the option toggles, + 1 set, - 0 clear."""
    tail = word[size : size + 1]
    return (not value) if not tail else tail in "+1yYtT"


def rfluxmtx_sender(args: Sequence[str]) -> int:
    """Index of rfluxmtx's sender argument (the first word after its options)."""
    i = 0
    while i < len(args) - 2:
        word = args[i]
        if not word.startswith("-") or word == "-":
            return i
        if word in _RFLUX_VALUES:
            i += 1 + _RFLUX_VALUES[word]
        elif word == "-ap":
            i += 2
            while i < len(args) - 2 and args[i].replace(".", "", 1).isdigit():
                i += 1
        elif word[:2] in ("-l", "-d", "-a", "-m") and not word.startswith(("-ld", "-dv")):
            i += 2
        else:
            i += 1
    return i


def parse_contrib(program: str, args: Sequence[str]) -> ContribSpec:
    """The split-relevant options of an rcontrib or rfluxmtx command; refuses what cannot split."""
    end = _options_end(program, args)
    found: dict[str, list[int]] = {"-x": [], "-y": [], "-c": [], "-o": []}
    force = program == "rfluxmtx"  # it passes -fo+ to rcontrib
    i = 0
    while i < end:
        word = args[i]
        if word.startswith("@"):
            raise usage_error(
                f"{program} {word}: options from a file cannot be checked for a split run "
                "(-y, -c and -o decide how it is cut); give them on the command line"
            )
        if word in found:
            if i + 1 >= end:
                raise usage_error(f"{program} {word} needs a value")
            found[word].append(i + 1)
        elif program == "rcontrib" and word.startswith("-fo"):
            force = _bool_option(word, 3, force)
        elif word.startswith("-r") and len(word) <= 3 and _bool_option(word, 2, False):
            raise usage_error(
                f"{program} {word} recovers the output of an earlier run: it cannot be split "
                "across hosts; run it on one host (--host NAME)"
            )
        i += 2 if word in found or (program == "rcontrib" and word in _RC_VALUES) else 1
    numbers = {k: [_whole(program, k, args[j]) for j in found[k]] for k in ("-x", "-y", "-c")}
    group = numbers["-c"][-1] if numbers["-c"] else 1
    if group < 1:
        raise usage_error(
            f"{program} -c {group} adds every ray into one record: a split run cannot sum "
            "records across hosts; give -c N with N >= 1, or run on one host"
        )
    for j in found["-o"]:
        _check_pattern(program, args[j])
    y_at = found["-y"] if program == "rcontrib" else found["-y"][-1:]
    return ContribSpec(
        program=program,
        options_end=end,
        group=group,
        xres=numbers["-x"][-1] if numbers["-x"] else 0,
        yres=numbers["-y"][-1] if numbers["-y"] else 0,
        y_at=tuple(y_at),
        o_at=tuple(found["-o"]),
        force=force,
    )


def _options_end(program: str, args: Sequence[str]) -> int:
    if program == "rfluxmtx":
        end = rfluxmtx_sender(args)
        if end < len(args) - 1 and args[end] == "-":
            return end
        sender = args[end] if end < len(args) else "(none)"
        raise usage_error(
            f"rfluxmtx sender {sender}: a split run cuts sensor rays read from standard input "
            "(sender '-', e.g. rfluxmtx -I+ -y 100 - sky.rad room.rad with --stdin grid.pts); "
            "with a sender surface rfluxmtx makes its own rays: run it on one host (--host NAME)"
        )
    if not args or args[-1].startswith("-"):
        raise usage_error(
            "rcontrib needs the octree as its last argument for a split run, e.g. "
            "rayfront run --hosts all --stdin grid.pts --stdout dc.mtx -- rcontrib -y 100 ... x.oct"
        )
    return len(args) - 1


def _whole(program: str, option: str, text: str) -> int:
    if not text.isdigit():
        raise usage_error(f"{program} {option} {text!r}: expected a whole number")
    return int(text)


def _check_pattern(program: str, pattern: str) -> None:
    """An -o pattern must name files in the project, in a folder that exists, without !command."""
    if pattern.startswith("!"):
        raise usage_error(
            f"{program} -o {pattern}: output to a command cannot be merged from several hosts; "
            "write files (-o name_%s.mtx) or run on one host"
        )
    folder = os.path.dirname(pattern)
    if os.path.isabs(pattern) or ".." in Path(pattern).parts:
        raise usage_error(
            f"{program} -o {pattern}: name the output files relative to the project directory"
        )
    if "%" in folder:
        raise usage_error(
            f"{program} -o {pattern}: a split run needs the folder fixed (no % in {folder!r}); "
            "put %s and %d in the file name"
        )


def check_outputs(spec: ContribSpec, args: Sequence[str], project_dir: Path) -> None:
    """Refuse before anything runs what the single run would refuse about its -o files."""
    for j in spec.o_at:
        pattern = args[j]
        folder = os.path.dirname(pattern)
        if folder and not (project_dir / folder).is_dir():
            raise usage_error(
                f"{spec.program} -o {pattern}: the folder {folder} does not exist in the project "
                "(rcontrib does not create it); make it first"
            )
        if spec.force:
            continue
        wildcard = glob.escape(_PATTERN.sub("\0", pattern).replace("%%", "%")).replace("\0", "*")
        existing = sorted(glob.glob(wildcard, root_dir=project_dir))
        if existing:
            raise usage_error(
                f"{spec.program} -o {pattern}: {', '.join(existing[:3])}"
                + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
                + " exist already; rcontrib does not overwrite its outputs: remove them, "
                "or give -fo to overwrite"
            )


def plan_contrib(
    spec: ContribSpec, args: Sequence[str], data: bytes, parts: int, source: str
) -> tuple[list[Part], int, str | None]:
    """Runs of whole rows (records, or scanlines of a picture), each with its own -y.

    Returns the parts, the number of records of the whole matrix and a note
    when -y reads fewer rays than the file holds (as the single run does).
    """
    offsets = grid_records(data, grid_input_format(args[: spec.options_end]), source)
    rays = len(offsets) - 1
    if rays % spec.group:
        raise usage_error(
            f"--stdin {source}: {rays} rays is not a multiple of {spec.program} -c {spec.group}"
        )
    records, note = rays // spec.group, None
    if spec.yres:
        needed = spec.yres * (spec.xres or 1)
        size = f"-x {spec.xres} -y {spec.yres}" if spec.xres else f"-y {spec.yres}"
        if records < needed:
            raise usage_error(
                f"{spec.program} {size} needs {needed} records ({needed * spec.group} rays with "
                f"-c {spec.group}) but --stdin {source} has {rays} rays; a single run would stop "
                "with 'unexpected EOF on input'"
            )
        if records > needed:
            note = (
                f"{spec.program} {size} reads the first {needed * spec.group} of the {rays} rays "
                f"in {source}, as a single run does"
            )
            records = needed
    rows = records // spec.per_row
    count = max(1, min(parts, rows))
    plan = []
    for k in range(count):
        first, last = rows * k // count, rows * (k + 1) // count
        per_ray = spec.per_row * spec.group
        part_args = list(args)
        for j in spec.y_at:
            part_args[j] = str(last - first)
        plan.append(
            Part(
                index=k,
                count=count,
                label=f"rays {first * per_ray + 1}-{last * per_ray} of {rays}",
                weight=(last - first) / rows,
                args=tuple(part_args),
                input_range=(offsets[first * per_ray], offsets[last * per_ray]),
            )
        )
    return plan, records, note


def attempt_args(spec: ContribSpec, part_args: Sequence[str], folder: str) -> list[str]:
    """A part's arguments for one attempt: its -o files go into the attempt's own folder."""
    args = list(part_args)
    for j in spec.o_at:
        args[j] = f"{folder}/{args[j]}"
    return args


def make_output_folders(
    spec: ContribSpec, args: Sequence[str], folder: Path, receiver: Receiver | None = None
) -> None:
    """The attempt folder with the folders of its -o patterns (rcontrib creates none)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [args[j] for j in spec.o_at] + list(receiver.outputs if receiver else ())
    for name in names:
        (folder / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir():
            path.chmod(0o2775)  # servers may run as another user of the project's group


@dataclass(frozen=True)
class HeaderFix:
    """How the first part's header becomes the whole matrix's."""

    pairs: tuple[tuple[str, str], ...]  # command-line words of the part -> of the single run
    octree_pairs: tuple[tuple[str, str], ...]  # rfluxmtx's "oconv -f ..." line, likewise
    nrows: int  # NROWS of the whole matrix
    add_nrows: bool  # no -y given: the single run has no NROWS, the merge adds it
    xres: int
    yres: int  # for the resolution string of a picture

    @classmethod
    def of(
        cls,
        spec: ContribSpec,
        args: Sequence[str],
        first: Sequence[str],
        records: int,
        receiver: tuple[list[tuple[str, str]], list[tuple[str, str]]] = ([], []),
    ) -> HeaderFix:
        """``first``: the first part's arguments as its attempt ran them.

        ``receiver``: the pairs of the first attempt's receiver copy (Receiver.pairs);
        its -o words come after the command line's in rcontrib's arguments.
        """
        pairs = []
        for j in sorted((*spec.y_at, *spec.o_at)):
            option = "-y" if j in spec.y_at else "-o"
            pairs.append((f" {option} {fputword(first[j])}", f" {option} {fputword(args[j])}"))
        return cls(
            tuple(pairs + receiver[0]),
            tuple(receiver[1]),
            records,
            not spec.yres,
            spec.xres,
            spec.yres,
        )

    def header(self, data: bytes) -> bytes:
        out: list[bytes] = []
        pending = self.add_nrows
        for line in data.split(b"\n"):
            if line.startswith(b"rcontrib "):
                line = _replace_in_order(line.decode("latin-1"), self.pairs).encode("latin-1")
            elif line.startswith(b"oconv ") and self.octree_pairs:
                line = _replace_in_order(line.decode("latin-1"), self.octree_pairs).encode(
                    "latin-1"
                )
            elif line.startswith(b"NROWS="):
                line = b"NROWS=%d" % self.nrows
            elif pending and line.startswith(
                (b"NCOLS=", b"BigEndian=", b"LittleEndian=", b"FORMAT=")
            ):
                out.append(b"NROWS=%d" % self.nrows)
                pending = False
            out.append(line)
        return b"\n".join(out)

    def resolution(self) -> bytes:
        return b"-Y %8d +X %8d\n" % (self.yres, self.xres)


def _replace_in_order(line: str, pairs: Sequence[tuple[str, str]]) -> str:
    """Each (old, new) replaced once, each after the previous one, as the words stand in order."""
    pos = 0
    for old, new in pairs:
        at = line.find(old, pos)
        if at < 0:
            continue
        line = line[:at] + new + line[at + len(old) :]
        pos = at + len(new)
    return line


def _take_header(fh: BinaryIO, picture: bool) -> tuple[bytes, bytes]:
    """(header with its empty line, resolution string) read off the start of a part's output."""
    header = b""
    if has_header(fh.peek(len(HEADER_MAGIC))):  # type: ignore[attr-defined]
        while True:
            line = fh.readline()
            header += line
            if line in (b"\n", b""):
                break
    resolution = b""
    if picture:
        ahead = fh.peek(64)[:64]  # type: ignore[attr-defined]
        end = ahead.find(b"\n")
        if end > 0 and _RESOLUTION.match(ahead[: end + 1]):
            resolution = fh.readline()
    return header, resolution


def merge_stream(sources: Sequence[Path], out: BinaryIO, fix: HeaderFix, picture: bool) -> int:
    """The parts of one output, in order, under the whole matrix's header; bytes written."""
    written = 0
    for n, path in enumerate(sources):
        with open(path, "rb") as fh:
            header, resolution = _take_header(fh, picture)
            if n == 0:
                head = (fix.header(header) if header else b"") + (
                    fix.resolution() if resolution else b""
                )
                out.write(head)
                written += len(head)
            while chunk := fh.read(1 << 20):
                out.write(chunk)
                written += len(chunk)
    out.flush()
    return written


def merge_into(sources: Sequence[Path], target: Path, fix: HeaderFix, picture: bool) -> int:
    """merge_stream into ``target``, atomically (a failed merge leaves no half file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            written = merge_stream(sources, out, fix, picture)
            mask = os.umask(0)
            os.umask(mask)
            os.fchmod(out.fileno(), 0o666 & ~mask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return written


def pattern_files(folders: Sequence[Path]) -> list[str]:
    """The files the -o patterns made, the same in every part's folder (relative paths)."""
    names = [
        sorted(str(p.relative_to(f)) for p in f.rglob("*") if p.is_file()) if f.is_dir() else []
        for f in folders
    ]
    for k, listing in enumerate(names[1:], start=2):
        if listing != names[0]:
            odd = sorted(set(listing) ^ set(names[0]))
            raise ClientError(
                f"part {k} wrote other -o files than part 1 ({', '.join(odd[:3])}); "
                "the parts should have made the same outputs"
            )
    return names[0]


def merge_patterns(
    spec: ContribSpec, folders: Sequence[Path], project_dir: Path, fix: HeaderFix
) -> list[str]:
    """Every -o file, merged from the parts' folders into the project; their relative names."""
    names = pattern_files(folders)
    if not spec.force:
        there = [n for n in names if (project_dir / n).exists()]
        if there:
            raise ClientError(
                f"{', '.join(there[:3])} appeared while the parts ran; rcontrib does not "
                "overwrite its outputs without -fo, nor does this merge"
            )
    for name in names:
        merge_into([f / name for f in folders], project_dir / name, fix, spec.picture)
    return names


@dataclass(frozen=True)
class Receiver:
    """rfluxmtx's receiver file when it names output files (``o=`` in ``#@rfluxmtx`` lines)."""

    index: int  # its argument index
    name: str
    text: str
    outputs: tuple[str, ...]  # the o= values, in order

    def copy_for(self, folder: str) -> str:
        """The receiver with every o= file moved into ``folder``."""

        def move(match: re.Match[str]) -> str:
            quote = match.group(2)[0] if match.group(2)[0] in "'\"" else ""
            value = match.group(2).strip("'\"")
            return f"{match.group(1)}o={quote}{folder}/{value}{quote}"

        return "".join(
            line[:10] + _O_PARAM.sub(move, line[10:]) if line.startswith("#@rfluxmtx") else line
            for line in self.text.splitlines(keepends=True)
        )

    def pairs(self, folder: str, copy: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(rcontrib command-line pairs, octree line pairs) for the header of one attempt."""
        words = [(f" -o {fputword(f'{folder}/{o}')}", f" -o {fputword(o)}") for o in self.outputs]
        return words, [(f" {copy}", f" {self.name}")]


_O_PARAM = re.compile(r"""(^|\s)o=("[^"]*"|'[^']*'|\S+)""")


def read_receiver(spec: ContribSpec, args: Sequence[str], project_dir: Path) -> Receiver | None:
    """rfluxmtx's receiver, when it names output files; their folders must exist."""
    if spec.program != "rfluxmtx" or spec.options_end + 1 >= len(args):
        return None
    index = spec.options_end + 1
    try:
        text = (project_dir / args[index]).read_text(errors="replace")
    except OSError:
        return None  # rfluxmtx itself says what is wrong with it, the same on every host
    outputs = [
        match.group(2).strip("'\"")
        for line in text.splitlines()
        if line.startswith("#@rfluxmtx")
        for match in _O_PARAM.finditer(line[10:])
    ]
    for output in outputs:
        _check_pattern("rfluxmtx receiver o=", output)
        folder = os.path.dirname(output)
        if folder and not (project_dir / folder).is_dir():
            raise usage_error(
                f"rfluxmtx receiver {args[index]}: o={output}: the folder {folder} does not exist "
                "in the project (rcontrib does not create it); make it first"
            )
    return Receiver(index, args[index], text, tuple(outputs)) if outputs else None


def writes_stdout(spec: ContribSpec, args: Sequence[str]) -> bool:
    """Whether some modifier's values go to standard output (given before the first -o)."""
    if not spec.o_at:
        return True
    if spec.program == "rfluxmtx":
        return False  # its receivers' -m come after every option
    return any(word in ("-m", "-M") for word in args[: spec.o_at[0]])
