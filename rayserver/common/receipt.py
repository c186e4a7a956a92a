"""Receipts of jobs (``receipt.json`` in a job's folder): what both ends need to know.

The procwrap writes a receipt when a job ends (rayserver/jobs/procwrap/receipt.py);
``rayfront receipt`` prints it and ``rayfront reproduce`` runs it again
(rayserver/client/reproduce.py). Here, shared by both: hashing a file, the
files an octree's header says it was built from, which arguments name input
files, and whether a command's settings give the same bytes every run.

Radiance 6.0a seeds its ``-u+`` (uncorrelated) sampling with the clock
second, so results are byte-identical run to run only with ``-u-`` or
without sampling (``-ab 0`` and no other stochastic program). The -u
default differs by program (rpict ``-u-``, rtrace and rcontrib ``-u+`` in
6.0a): it is read from each binary's ``-defaults``. With -u+ even ``-ab 0``
scatters when a program jitters (rpict's ``-pj``, ``-dj``) or samples rough
specular materials (``-ss``). A picture's header also
holds its capture time (CAPDATE, GMT), which comparisons leave out.
"""

from __future__ import annotations

import os
import shlex

RECEIPT_FILE = "receipt.json"
RECEIPT_VERSION = 1
HEADER_LIMIT = 1 << 16  # an octree's header is a few lines; read at most this much
_CHUNK = 1 << 20

# Programs whose results scatter with -u+ when they sample (ambient, Monte Carlo).
SAMPLING_PROGRAMS = frozenset(
    {"rpict", "rtrace", "rcontrib", "rfluxmtx", "rtpict", "rpiece", "rsensor", "mkpmap"}
)
# Programs that sample even with -ab 0 (their whole job is Monte Carlo sampling).
ALWAYS_SAMPLING = frozenset({"rcontrib", "rfluxmtx", "mkpmap", "rsensor"})
# Options whose value is a file the program writes, never an input.
OUTPUT_OPTIONS = frozenset({"-o", "-ro", "-af", "-afi", "-ape"})
_PICTURE_PROGRAMS = frozenset({"rpict", "rtpict", "rpiece"})
# oconv's options and how many values follow each (-i's value is an input octree).
_OCONV_VALUES = {"-r": 1, "-n": 1, "-b": 4, "-i": 0, "-f": 0, "-w": 0}


def sha256_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, read in 1 MiB chunks."""
    import hashlib  # here: the fork server imports this module and never hashes

    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def header_text(path: str | os.PathLike[str]) -> str:
    """A Radiance file's header (up to its first empty line), as text; '' if it has none."""
    with open(path, "rb") as fh:
        data = fh.read(HEADER_LIMIT)
    if not data.startswith(b"#?RADIANCE"):
        return ""
    end = data.find(b"\n\n")
    return data[: end if end >= 0 else len(data)].decode("utf-8", "replace")


def octree_sources(path: str | os.PathLike[str]) -> list[str]:
    """The files named on the oconv command lines of an octree's header, in order.

    oconv writes its command line into the header (``getinfo`` shows e.g.
    ``oconv sky.rad room.rad``); names are as oconv was given them, relative
    to the folder it ran in. ``-i`` names an octree it started from.
    """
    names: list[str] = []
    for line in header_text(path).splitlines():
        try:
            words = shlex.split(line.strip())
        except ValueError:
            words = line.split()
        if not words or os.path.basename(words[0]) != "oconv":
            continue
        i = 1
        while i < len(words):
            word = words[i]
            if word in _OCONV_VALUES:
                i += 1 + _OCONV_VALUES[word]
                if word == "-i" and i < len(words):
                    names.append(words[i])
                    i += 1
                continue
            if not word.startswith("-") and word not in names:
                names.append(word)
            i += 1
    return names


def named_files(argv: list[str]) -> list[tuple[str, str]]:
    """Words of a command line that may name input files: (name, role), program left out.

    Roles: ``argument`` (a plain word), ``options file`` (``@file``, read by
    Radiance's expandarg), ``ambient`` (the value of ``-af``: read and written).
    Values of options that name outputs (``-o``, ``-ro``, rpict's recover file ``-r``:
    the picture a resumed render continues) are left out; which
    of the rest are files is for the caller to find out (they must exist).
    """
    out: list[tuple[str, str]] = []
    words = argv[1:]
    recovers = bool(argv) and os.path.basename(argv[0]) in _PICTURE_PROGRAMS
    for i, word in enumerate(words):
        before = words[i - 1] if i else ""
        if before in OUTPUT_OPTIONS or (recovers and before == "-r"):
            if before == "-af":
                out.append((word, "ambient"))
            continue
        if word.startswith("@") and len(word) > 1:
            out.append((word[1:], "options file"))
        elif not word.startswith("-") and word:
            out.append((word, "argument"))
    return out


# rad variables whose words are input files (OCTREE, PICTURE, AMBFILE, OPTFILE are its outputs).
RIF_INPUTS = ("materials", "scene", "objects", "illum")


def rif_files(variables: dict[str, str]) -> list[str]:
    """The input files a rif names (``rad -n -e`` lists its variables), in order."""
    names: list[str] = []
    for key in RIF_INPUTS:
        for word in variables.get(key, "").split():
            if word not in names:
                names.append(word)
    return names


def _last_bool(argv: list[str], option: str, default: bool) -> bool:
    """A Radiance boolean option's value after the whole command line (``-u``, ``-u+``, ``-u-``)."""
    value = default
    for word in argv:
        if word == option:
            value = not value  # a bare boolean option toggles
        elif word == option + "+":
            value = True
        elif word == option + "-":
            value = False
    return value


# What decides whether a -u+ run samples, and Radiance 6.0a's defaults where a binary's
# own -defaults listing does not say (rpict lists -u-, rtrace and rcontrib -u+).
SAMPLING_OPTIONS = ("-u", "-ab", "-dj", "-ss", "-pj")
FALLBACK_DEFAULTS = {"-u": "+", "-ab": "0", "-dj": "0", "-ss": "1", "-pj": "0.67"}


def option_defaults(defaults_text: str) -> dict[str, str]:
    """The sampling options' defaults from a program's ``-defaults`` listing.

    ``-u+`` / ``-u-`` give ``{"-u": "+"}`` or ``"-"``; ``-ab 0`` gives ``{"-ab": "0"}``.
    """
    out: dict[str, str] = {}
    for line in defaults_text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] in ("-u+", "-u-"):
            out["-u"] = words[0][-1]
        elif words[0] in SAMPLING_OPTIONS and len(words) > 1:
            out[words[0]] = words[1]
    return out


def _last_number(argv: list[str], option: str, default: str) -> float:
    value = default
    for i, word in enumerate(argv[:-1]):
        if word == option:
            value = argv[i + 1]
    try:
        return float(value)
    except ValueError:
        return 1.0  # not a number: count it as sampling


def sampling_reasons(argv: list[str], defaults: dict[str, str] | None = None) -> list[str]:
    """Why one command's output may differ run to run (-u+ clock seeding); [] if it cannot.

    ``defaults``: the program's own (:func:`option_defaults` of its binary); what is
    missing there is taken from :data:`FALLBACK_DEFAULTS`. With -u+, a program samples
    when it bounces (-ab), jitters (-dj, rpict's -pj) or samples rough specular
    materials (-ss: whether the scene has any, the command line cannot tell).
    """
    if not argv or os.path.basename(argv[0]) not in SAMPLING_PROGRAMS:
        return []
    program = os.path.basename(argv[0])
    known = {**FALLBACK_DEFAULTS, **(defaults or {})}
    if not _last_bool(argv, "-u", known["-u"] == "+"):
        return []
    if not any(w in ("-u", "-u+") for w in argv):
        program = f"{program} (its default -u+)"
    if os.path.basename(argv[0]) in ALWAYS_SAMPLING:
        return [f"{program} samples with -u+"]
    checks = [("-ab", "ambient bounces"), ("-dj", "direct jitter"), ("-ss", "specular sampling")]
    if os.path.basename(argv[0]) in _PICTURE_PROGRAMS:
        checks.append(("-pj", "pixel jitter"))
    out = []
    for option, what in checks:
        value = _last_number(argv, option, known[option])
        if value != 0:
            out.append(f"{program} {option} {value:g} ({what}) with -u+")
    return out


_SH_KEYWORDS = frozenset(
    {"do", "then", "else", "elif", "if", "while", "until", "time", "!", "{", "("}
)
_OUT_REDIRECTS = (">", ">>", ">|", "2>", "2>>", "&>", "1>", "1>>")


def shell_words(text: str) -> list[list[str]]:
    """A shell text's simple commands as word lists (split at ; | & newlines), best effort.

    Redirections are taken out: the file after ``<`` stays as a word (an input),
    those after ``>``, ``>>``, ``2>`` ... go (outputs, never inputs).
    """
    commands: list[list[str]] = []
    for line in text.replace(";", "\n").replace("|", "\n").replace("&&", "\n").splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            words = line.split()
        kept: list[str] = []
        skip = False
        for word in words:
            if skip:
                skip = False
            elif word in _OUT_REDIRECTS:
                skip = True
            elif word == "<":
                continue
            elif word.startswith(_OUT_REDIRECTS):
                continue  # >file, 2>file
            else:
                kept.append(word[1:] if word.startswith("<") else word)
        while kept and kept[0] in _SH_KEYWORDS:
            kept.pop(0)  # "do rpict ...": the command is rpict
        if kept:
            commands.append(kept)
    return commands
