"""How rad reads its variables, so the values can be checked as rad will use them.

The rules follow Radiance's own source (src/util/rad.c and
src/common/loadvars.c, fgetline.c), as facts, not code:

- rad's command line is ``rad [-s -n -t -e -V -w] [-N n] [-o dev] [-v view]
  rfile [VAR=value ...]``: options until the first word not starting with
  '-' (``-N``, ``-o`` and ``-v`` take the next word), then the rif, then
  assignments;
- the rif is read in lines of at most 511 bytes (a longer line goes on as
  the next "line"); a backslash escapes the next character (so a
  backslash-newline continues the line) and ``#`` starts a comment;
- an assignment is a name (up to 31 characters, ending at a space or '='),
  any spaces and '=' signs, then the value, trimmed; runs of spaces outside
  quotes become one; a name matches the first variable it abbreviates with
  at least that variable's short length (``AMB`` is AMBFILE, ``OCT`` OCTREE);
- single-string variables (OCTREE, AMBFILE, PICTURE...) keep their last
  assignment, with one pair of surrounding quotes taken off; list variables
  (scene, render...) join every assignment with spaces; each ``view`` is
  one view.

rad then pastes the values into ``sh -c`` command lines (oconv, mkillum,
rpict, pfilt...), where the shell splits words, removes quotes and expands
``~`` and globs: that part is checked by :mod:`rayserver.server.argcheck`.
"""

from __future__ import annotations

from dataclasses import dataclass

# rad's variables in its own order (the first abbreviation match wins):
# (name, characters needed to abbreviate it, how assignments combine).
VARIABLES: tuple[tuple[str, int, str], ...] = (
    ("AMBFILE", 3, "str"),
    ("DETAIL", 3, "one"),
    ("EXPOSURE", 3, "one"),
    ("EYESEP", 3, "one"),
    ("illum", 3, "cat"),
    ("INDIRECT", 3, "one"),
    ("materials", 3, "cat"),
    ("mkillum", 3, "cat"),
    ("mkpmap", 3, "cat"),
    ("objects", 3, "cat"),
    ("oconv", 3, "cat"),
    ("OCTREE", 3, "str"),
    ("OPTFILE", 3, "str"),
    ("PCMAP", 2, "str"),
    ("PENUMBRAS", 3, "one"),
    ("pfilt", 2, "cat"),
    ("PGMAP", 2, "str"),
    ("PICTURE", 3, "str"),
    ("QUALITY", 3, "one"),
    ("RAWFILE", 3, "str"),
    ("render", 3, "cat"),
    ("REPORT", 3, "one"),
    ("RESOLUTION", 3, "one"),
    ("rpict", 3, "cat"),
    ("rvu", 3, "cat"),
    ("scene", 3, "cat"),
    ("UP", 2, "one"),
    ("VARIABILITY", 3, "one"),
    ("view", 2, "each"),
    ("ZFILE", 2, "str"),
    ("ZONE", 2, "one"),
)

# A value of these not starting with '-' begins with the program rad runs in
# place of its own (rad.c: "if (vval(OCONV)[0] != '-') atos(c_oconv, ...)").
PROGRAM_VARIABLES = frozenset({"oconv", "mkillum", "mkpmap", "rpict", "rvu", "pfilt"})

_NOCHAR = "\x7f"  # loadvars marks an escaping backslash with DEL, setvariable drops it
_LINE_MAX = 511  # fgetline(buf, 512, fp)
_NAME_MAX = 31  # char varname[32]
_OPTIONS_WITH_VALUE = frozenset("Nov")
_SPACE = " \t\n\v\f\r"  # C isspace


@dataclass(frozen=True)
class Assignment:
    """One ``VAR=value`` as rad reads it; ``where`` says where it came from, for messages."""

    name: str  # the variable's full name, or the name as written when rad knows none
    known: bool
    value: str
    where: str


@dataclass(frozen=True)
class RadCommand:
    """rad's arguments split as rad splits them."""

    option_indexes: list[int]
    rif_index: int | None
    assignment_indexes: list[int]


def split_command(args: list[str]) -> RadCommand:
    """Options, the rif and the assignments of rad's arguments (rad's main())."""
    i, options = 0, []
    while i < len(args) and args[i].startswith("-"):
        options.append(i)
        if args[i][1:2] in _OPTIONS_WITH_VALUE and i + 1 < len(args):
            options.append(i + 1)
            i += 1
        i += 1
    if i >= len(args):
        return RadCommand(options, None, [])
    return RadCommand(options, i, list(range(i + 1, len(args))))


def match_variable(name: str) -> str | None:
    """The variable ``name`` abbreviates (rad's matchvar), or None."""
    for full, nick, _kind in VARIABLES:
        if len(name) >= nick and full.startswith(name):
            return full
    return None


def parse_assignment(text: str, where: str) -> Assignment | None:
    """One assignment as setvariable reads it; None when it assigns nothing (rad ignores it)."""
    rest = text.lstrip(_SPACE)
    n = 0
    while n < min(len(rest), _NAME_MAX) and rest[n] not in _SPACE + "=" and rest[n] != "\0":
        n += 1
    name, rest = rest[:n], rest[n:]
    if not name:
        return None
    rest = rest.lstrip(_SPACE + "=").split("\0", 1)[0].rstrip(_SPACE)
    if not rest:
        return None
    full = match_variable(name)
    return Assignment(full or name, full is not None, _squeeze(rest), where)


def _squeeze(raw: str) -> str:
    """setvariable's copy of a value: DEL marks dropped, spaces squeezed outside quotes."""
    out = [raw[0]]  # the first character is copied as it is, even a DEL
    quote = ""
    i = 1
    while i < len(raw):
        c = raw[i]
        if c == _NOCHAR:
            i += 1
            continue
        if quote:
            if c == quote:
                quote = ""
        else:
            if out[-1] in _SPACE:
                while i < len(raw) and (raw[i] in _SPACE or raw[i] == _NOCHAR):
                    i += 1
                if i >= len(raw):
                    break
                c = raw[i]
            if c in "\"'":
                quote = c
        out.append(c)
        i += 1
    return "".join(out).rstrip(_SPACE)


def rif_lines(data: bytes) -> list[str]:
    """The rif's lines as loadvars hands them to setvariable (escapes marked, comments cut)."""
    text = data.decode("latin-1")  # bytes as they are: rad reads chars, not UTF-8
    lines: list[str] = []
    i = 0
    while i < len(text):
        buf: list[str] = []
        while len(buf) < _LINE_MAX and i < len(text):
            c = text[i]
            i += 1
            if c == "\r":
                # An old Mac line end; CR LF counts as one.
                if i < len(text) and text[i] == "\n":
                    i += 1
                c = "\n"
            if c == "\n" and (not buf or buf[-1] != "\\"):
                break
            buf.append(c)
        lines.append(_escape_and_cut("".join(buf).split("\0", 1)[0]))
    return lines


def _escape_and_cut(line: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(line):
        c = line[i]
        if c == "\\":
            out.append(_NOCHAR)
            if i + 1 < len(line):
                out.append(line[i + 1])
            i += 2
            continue
        if c == "#":
            break
        out.append(c)
        i += 1
    return "".join(out)


def rif_assignments(data: bytes, rif: str) -> list[Assignment]:
    """The assignments of a rif's bytes, each value as the file name bytes rad will use.

    rad works on bytes: the lines are cut and parsed byte by byte (latin-1
    keeps one character per byte), then names and values are turned into
    the strings Python's file functions map back to exactly those bytes.
    """
    found = []
    for number, line in enumerate(rif_lines(data), 1):
        got = parse_assignment(line, f"{rif!r} line {number}")
        if got is not None:
            found.append(Assignment(_as_fs(got.name), got.known, _as_fs(got.value), got.where))
    return found


def _as_fs(text: str) -> str:
    return text.encode("latin-1").decode("utf-8", "surrogateescape")


def final_values(assignments: list[Assignment]) -> list[Assignment]:
    """The values rad uses: the last of single variables (quotes off), lists joined, each view."""
    kinds = {name: kind for name, _nick, kind in VARIABLES}
    out: list[Assignment] = []
    by_name: dict[str, list[Assignment]] = {}
    for a in assignments:
        by_name.setdefault(a.name, []).append(a)
    for name, items in by_name.items():
        kind = kinds.get(name, "each")  # an unknown name: rad stops, but check every value
        if kind == "each":
            out.extend(items)
        elif kind == "cat":
            where = ", ".join(a.where for a in items)
            out.append(Assignment(name, True, " ".join(a.value for a in items), where))
        else:
            last = items[-1]
            value = _unquote(last.value) if kind == "str" else last.value
            out.append(Assignment(name, True, value, last.where))
    return out


def _unquote(value: str) -> str:
    """strvalue: one pair of surrounding quotes is taken off."""
    if len(value) >= 2 and value[0] in "\"'" and value[-1] == value[0]:
        return value[1:-1]
    return value
