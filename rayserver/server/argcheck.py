"""Submit-time checks of the files a step's arguments make Radiance touch: the second line of defence.

The first line is the kernel: every step runs confined to the project (see
docs/security.md). These checks refuse, with a 403 that says what was wrong
and what is expected, a job that would try to leave the project anyway, so
it fails at once with a clear message instead of deep inside a sandbox:

- a path-like argument (one naming an existing file, or containing '/') must
  resolve inside the project directory, symlinks followed; absolute paths,
  '..' and a leading '~' (Radiance's getpath expands it to a home folder)
  are refused, also in ``VAR=path`` and ``@file`` forms;
- a word starting with '!' is refused (Radiance runs such a "file" through sh);
- programs that expand their option words (rpict, rtrace, rcontrib,
  rfluxmtx, mkillum, mkpmap...: Radiance's expandarg) read ``@file`` as more
  options and ``$NAME`` as an environment variable's words: an options file
  must exist in the project when the job is submitted, and its words are
  checked the same way, recursively (at most 8 files deep, 4096 words in all);
  ``$NAME`` is refused;
- rad's arguments and every value rad takes from the rif or its
  ``VAR=value`` arguments are checked as the shell that rad hands them to
  will read them: no shell syntax, quotes removed, '~' refused, globs
  expanded here and every match confined, ``@file`` read; a program
  variable (``oconv=``, ``rpict=``...) may only carry options.

Files are read as they are at submit; one changed afterwards is the
kernel's business.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from rayserver.common.paths import is_inside
from rayserver.server import radvars
from rayserver.server.specerror import JobSpecError

# Radiance programs that call expandarg() on their option words (Radiance 6 source).
EXPANDARG_PROGRAMS = frozenset(
    {
        "evalglare",
        "findglare",
        "mkillum",
        "mkpmap",
        "ranimove",
        "rcontrib",
        "rfluxmtx",
        "rpict",
        "rpiece",
        "rsensor",
        "rtrace",
        "rvu",
    }
)
MAX_OPTION_DEPTH = 8
MAX_OPTION_WORDS = 4096  # expandarg's MAXARGEXP
MAX_OPTIONS_FILE_BYTES = 256 * 1024
MAX_RIF_BYTES = 1024 * 1024
MAX_GLOB_MATCHES = 1000

_DOTDOT = re.compile(r"(^|/)\.\.(/|$)")
# rad runs its commands through sh with its options and variable values pasted
# in: these would let a value run any command, redirect anywhere, or expand
# into other words (braces: bash, which is /bin/sh on some systems).
_SHELL_SYNTAX = re.compile(r"[;&|$`<>(){}\n\r\\]")
_GLOB = re.compile(r"[*?\[]")
_C_SPACE = re.compile(r"[ \t\n\v\f\r]+")
_ENV_WORD = re.compile(r"\$[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class Where:
    """Where a word came from: the request field, and the words of a message prefix."""

    field: str
    label: str
    base: Path  # the folder the program runs in
    root: Path  # the project directory
    # rad's words may name files of the project above the rif's folder
    # (the rad shortcut runs rad there): '..' is accepted while it stays inside.
    dotdot: bool = False

    def within(self, label: str) -> Where:
        return Where(self.field, f"{self.label} ({label})", self.base, self.root, self.dotdot)

    def refuse(self, message: str) -> JobSpecError:
        return JobSpecError(403, f"{self.label}: {message}", self.field)

    def confine(self, rel: str) -> Path:
        return confine(rel, self.base, self.root, self.label, self.field, dotdot=self.dotdot)


@dataclass
class _Budget:
    """What reading options files may cost one step."""

    words: int = 0
    files: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- paths


def confine(
    rel: str, base: Path, root: Path, what: str, field: str | None = None, *, dotdot: bool = False
) -> Path:
    """``rel`` resolved against ``base``; refused unless it stays inside ``root``.

    ``what`` starts the message; ``field`` (default ``what``) is the request field.
    ``dotdot`` lets '..' through when the path still ends inside ``root``.
    """
    field = what if field is None else field
    if "\x00" in rel:
        raise JobSpecError(422, f"{what}: NUL character in path", field)
    pure = PurePosixPath(rel)
    if pure.is_absolute():
        raise JobSpecError(
            403,
            f"{what}: absolute path {rel!r} refused; name files relative to the project directory",
            field,
        )
    if ".." in pure.parts and not dotdot:
        raise JobSpecError(
            403,
            f"{what}: '..' in {rel!r} refused; files must stay inside the project directory",
            field,
        )
    # realpath follows every symlink that exists, dangling ones included, so a
    # link pointing out of the project is caught even before its target exists.
    resolved = Path(os.path.realpath(base / rel))
    if not is_inside(resolved, root):
        raise JobSpecError(
            403,
            f"{what}: {rel!r} leads outside the project directory (a symlink to "
            f"{resolved}); refused",
            field,
        )
    return resolved


def _path_candidates(arg: str) -> list[str]:
    """The parts of an argument that can name files: itself, @file, VAR=path."""
    cands = [arg]
    if arg.startswith("@") and len(arg) > 1:
        cands.append(arg[1:])
    if "=" in arg:
        cands.extend(part for part in arg.split("=")[1:] if part)
    return cands


def check_word(word: str, where: Where, shown: str | None = None) -> None:
    """One word a program gets: nothing starting with '!', '~' or '/', no '..', confined.

    With ``where.dotdot`` (rad's words) '..' is accepted while the path stays inside.
    """
    shown = word if shown is None else shown
    for cand in _path_candidates(word):
        if cand.startswith("!"):
            raise where.refuse(
                f"{shown!r} refused; Radiance runs a name starting with '!' as a shell "
                "command; name a file in the project directory instead"
            )
        if cand.startswith("~"):
            raise where.refuse(
                f"{shown!r} refused; Radiance (and the shell) read a leading '~' as a home "
                "folder; name files relative to the project directory"
            )
        if cand.startswith("/"):
            raise where.refuse(
                f"absolute path {cand!r} in {shown!r} refused; name files relative to the "
                "project directory"
            )
        if _DOTDOT.search(cand):
            if not where.dotdot:
                raise where.refuse(
                    f"'..' in {shown!r} refused; files must stay inside the project directory"
                )
            if not is_inside(Path(os.path.normpath(where.base / cand)), where.root):
                raise where.refuse(
                    f"'..' in {shown!r} leads out of the project directory ({cand!r}); "
                    "refused: expected files inside it"
                )
        if "/" in cand or os.path.lexists(where.base / cand):
            where.confine(cand)


# ---------------------------------------------------------------- a step


def check_step(program: str, args: list[str], base: Path, root: Path, fields: list[str]) -> None:
    """Every argument of one step, as ``program`` will read it (fields name them in messages)."""
    budget = _Budget()
    for arg, name in zip(args, fields, strict=True):
        where = Where(name, name, base, root, dotdot=program == "rad")
        if program == "rad":
            check_shell_value(arg, where, budget)
        else:
            check_word(arg, where)
            if program in EXPANDARG_PROGRAMS:
                _check_expansion(arg, program, where, budget, 0)
    if program == "rad":
        _check_rad(args, base, root, fields, budget)


def _check_expansion(word: str, program: str, where: Where, budget: _Budget, depth: int) -> None:
    """``@file`` and ``$NAME`` as expandarg() expands them in ``program``'s option words."""
    if _ENV_WORD.fullmatch(word):
        raise where.refuse(
            f"{word!r} refused; {program} replaces it with the words of the environment "
            f"variable {word[1:]}, which is the server's; write the value itself"
        )
    if word.startswith("@") and len(word) > 1:
        _check_options_file(word[1:], program, where, budget, depth + 1)


def _check_options_file(name: str, program: str, where: Where, budget: _Budget, depth: int) -> None:
    if depth > MAX_OPTION_DEPTH:
        raise where.refuse(
            f"options files nest more than {MAX_OPTION_DEPTH} deep ({' -> '.join(budget.files)}"
            f" -> {name}); expected options files that do not include themselves"
        )
    data = _read_small(name, where, MAX_OPTIONS_FILE_BYTES, f"@{name}: the options file")
    if data is None:
        raise where.refuse(
            f"@{name}: the options file {name!r} does not exist; {program} would read more "
            "options from it, and options files are checked when the job is submitted, so "
            "it must exist in the project then"
        )
    budget.files.append(name)
    # expandarg splits on C's white space only: no quotes, no comments.
    text = data.decode("utf-8", "surrogateescape")
    words = [w for w in _C_SPACE.split(text) if w]
    budget.words += len(words)
    if budget.words > MAX_OPTION_WORDS:
        raise where.refuse(
            f"options files give more than {MAX_OPTION_WORDS} words in all (the most "
            f"Radiance expands); expected fewer options"
        )
    for number, word in enumerate(words, 1):
        inner = where.within(f"options file {name!r}, word {number}")
        check_word(word, inner)
        _check_expansion(word, program, inner, budget, depth)
    budget.files.pop()


def _read_small(name: str, where: Where, limit: int, what: str) -> bytes | None:
    """The file's bytes (confined), None when it does not exist; refused beyond ``limit``."""
    path = where.confine(name)
    try:
        # O_NONBLOCK: a FIFO planted under the name must not hang the check.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise where.refuse(
            f"{what} {name!r} cannot be read ({exc.strerror}); expected a readable file"
        ) from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise where.refuse(f"{what} {name!r} is not a regular file; expected a file")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise where.refuse(
            f"{what} {name!r} is larger than {limit // 1024} KiB, too large to check; "
            "expected a smaller file"
        )
    return data


# ---------------------------------------------------------------- rad and sh


def check_shell_value(value: str, where: Where, budget: _Budget) -> None:
    """A string rad pastes into an sh command line, checked word by word as sh splits it."""
    if bad := _SHELL_SYNTAX.search(value):
        raise where.refuse(
            f"{bad.group()!r} in {value!r} refused; rad passes its arguments and variables "
            "to a shell, so shell syntax (; & | $ ` < > ( ) {{ }} \\ line breaks) is not "
            "accepted"
        )
    try:
        words = shlex.split(value, comments=False, posix=True)
    except ValueError:
        raise where.refuse(
            f"unbalanced quote in {value!r}; expected quotes in pairs (the shell rad "
            "runs would read the rest of the command as quoted)"
        ) from None
    for word in words:
        check_word(word, where, value)
        if _GLOB.search(word):
            _check_glob(word, where)
        if word.startswith("@") and len(word) > 1:
            _check_options_file(word[1:], "rpict", where, budget, 1)


def _check_glob(pattern: str, where: Where) -> None:
    """Expand ``pattern`` as sh would (dot entries included) and confine every match."""
    prefixes = [""]
    for part in pattern.split("/"):
        if not _GLOB.search(part):
            prefixes = [p + part + "/" for p in prefixes]
            continue
        if fnmatch.fnmatchcase("..", part):
            raise where.refuse(
                f"the pattern {part!r} in {pattern!r} matches '..' (the folder above); "
                "expected files inside the project directory"
            )
        found = []
        for prefix in prefixes:
            try:
                entries = os.listdir(where.base / prefix) if prefix else os.listdir(where.base)
            except OSError:
                continue
            found += [prefix + e + "/" for e in entries if fnmatch.fnmatchcase(e, part)]
        if len(found) > MAX_GLOB_MATCHES:
            raise where.refuse(
                f"the pattern {pattern!r} matches more than {MAX_GLOB_MATCHES} files; "
                "expected a narrower pattern"
            )
        prefixes = found
    for match in prefixes:
        where.confine(match.rstrip("/"))


def _check_rad(args: list[str], base: Path, root: Path, fields: list[str], budget: _Budget) -> None:
    """The values rad will use, from its rif and its ``VAR=value`` arguments."""
    command = radvars.split_command(args)
    if command.rif_index is None:
        return  # rad stops with its usage message: nothing runs
    rif = args[command.rif_index]
    rif_where = Where(fields[command.rif_index], fields[command.rif_index], base, root, True)
    data = _read_small(rif, rif_where, MAX_RIF_BYTES, "the rad input file")
    if data is None:
        raise JobSpecError(
            422,
            f"{rif_where.label}: {rif!r} is not a file in the project directory; rad reads its "
            "variables from it, and they are checked when the job is submitted",
            rif_where.field,
        )
    found = radvars.rif_assignments(data, rif)
    for i in command.assignment_indexes:
        got = radvars.parse_assignment(args[i], fields[i])
        if got is not None:
            found.append(got)
    for value in radvars.final_values(found):
        where = _value_where(value, rif_where, [fields[i] for i in command.assignment_indexes])
        if value.name in radvars.PROGRAM_VARIABLES and not value.value.startswith("-"):
            raise where.refuse(
                f"{value.value!r} would make rad run {value.value.split()[0]!r} in place of "
                f"{value.name}; expected only {value.name}'s options (starting with '-')"
            )
        check_shell_value(value.value, where, budget)


def _value_where(value: radvars.Assignment, rif: Where, fields: list[str]) -> Where:
    """Messages name the argument a value came from, else the rif and its line."""
    given = [f for f in fields if f in value.where.split(", ")]
    if given:
        return Where(given[-1], f"{given[-1]} ({value.name}=)", rif.base, rif.root, True)
    label = f"{rif.label} ({value.where}: {value.name}=)"
    return Where(rif.field, label, rif.base, rif.root, True)
