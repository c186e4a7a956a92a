"""Progress of a sh step: its trace against the commands of its script, and rpict's reports.

A sh step runs as ``/bin/sh -x`` with ``PS4`` set to a marker of its own, so
before each simple command the shell writes ``<marker><command line>`` to
standard error (Debian's dash has no separate trace descriptor and no
``LINENO`` in ``PS4``; the marker tells its trace from the programs' own
messages). The script's text is cut into its simple commands, each known by
its command word (:func:`script_commands`); each traced command moves a
pointer to the next command of that word, so a linear script reports
"command k of n", and a loop holds its place (progress never goes back).
While an rpict of the script runs, its own ``-t``/SIGCONT reports fill in
the part of its command.

In the job log the marker becomes ``+ `` (how ``sh -x`` looks to a person).
"""

from __future__ import annotations

import re
import shlex

from rayserver.jobs.procwrap import progress as prog

MARK = "+rayserver-"
# Words that start no command of their own (the command follows, or none does).
_KEYWORDS = {
    "!", "{", "}", "if", "then", "elif", "else", "fi", "for", "in", "do", "done",
    "while", "until", "case", "esac", "time",
}  # fmt: skip
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def new_marker() -> str:
    """A PS4 no program prints by chance: ``+rayserver-<8 hex>+ ``."""
    import secrets  # here: it loads OpenSSL, which the fork server (importing us) must not

    return f"{MARK}{secrets.token_hex(4)}+ "


def command_key(words: list[str]) -> str | None:
    """The word a command is known by: its command name, or ``NAME=`` for an assignment."""
    if not words or words[0] in _KEYWORDS:
        return None
    rest = [w for w in words if not _ASSIGNMENT.match(w)]
    if rest:
        return rest[0].rsplit("/", 1)[-1]
    return words[0].split("=", 1)[0] + "="


def _words(piece: str) -> list[str]:
    try:
        return shlex.split(piece, comments=True, posix=True)
    except ValueError:
        return piece.split()


def _pieces(text: str) -> list[str]:
    """The text cut at the shell's command separators outside quotes.

    Separators: ``; & | ( )``, line breaks, backticks and ``$(`` (inside
    double quotes only the last two). ``\\<newline>`` joins lines, ``#``
    starts a comment where a word may start.
    """
    pieces, piece, quote, i = [], "", None, 0
    while i < len(text):
        c = text[i]
        if quote == "'":
            quote = None if c == "'" else quote
            piece += c
        elif c == "\\":
            piece += "" if text[i + 1 : i + 2] == "\n" else text[i : i + 2]
            i += 1
        elif c == "#" and quote is None and (not piece or piece[-1] in " \t"):
            while i + 1 < len(text) and text[i + 1] != "\n":
                i += 1
        elif c == "`" or text.startswith("$(", i) or (quote is None and c in ";&|\n()"):
            pieces.append(piece)
            piece = ""
            i += 1 if text.startswith("$(", i) else 0
        elif c in "'\"" and quote in (None, c):
            quote = None if quote == c else c
            piece += c
        else:
            piece += c
        i += 1
    return [*pieces, piece]


def script_commands(text: str) -> list[str]:
    """The keys of a script's simple commands in their order of appearance.

    A rough cut (see :func:`_pieces`; ``for v in ...`` and the like name no
    command), which is all progress needs.
    """
    keys = []
    for piece in _pieces(text):
        words = _words(piece)
        while words and words[0] in _KEYWORDS:
            if words[0] in ("for", "case"):
                words = []  # "for v in a b": no command in it
                break
            words = words[1:]
        key = command_key(words)
        if key is not None:
            keys.append(key)
    return keys


class ShProgress:
    """Fraction done of one sh step from its output lines."""

    def __init__(self, text: str, marker: str) -> None:
        self.commands = script_commands(text)
        self.marker = marker
        self.pos = 0  # the next command expected
        self.rpict_at: int | None = None  # the command of the rpict now reporting
        self.best = 0.0

    def shown(self, line: str) -> str:
        """The line as the job log shows it: each trace as ``+ command`` on a line of its own.

        The commands of a pipeline start at once and write their traces word by
        word, so one line may hold several, interleaved: each starts a new line.
        """
        head, *traces = line.split(self.marker)
        if not traces:
            return line
        return "\n".join(([head] if head else []) + [f"+ {t}" for t in traces if t.strip()])

    def feed(self, line: str) -> float | None:
        """One line of the step's output; the new fraction (0..1) when it grew."""
        head, *traces = line.split(self.marker)
        value = None
        for trace in traces:
            index = self._find(command_key(_words(trace)))
            if index is not None:
                if self.commands[index] == "rpict":
                    self.rpict_at = index
                value = self._emit(index / len(self.commands)) or value
        rep = prog.parse_rpict_report(head) if not traces else None
        if rep is not None and self.rpict_at is not None:
            value = self._emit((self.rpict_at + rep.percent / 100.0) / len(self.commands))
        return value

    def _find(self, key: str | None) -> int | None:
        if key is None or not self.commands:
            return None
        order = [*range(self.pos, len(self.commands)), *range(0, self.pos)]
        for i in order:
            if self.commands[i] == key:
                self.pos = i + 1
                return i
        return None

    def _emit(self, value: float) -> float | None:
        value = max(0.0, min(1.0, value))
        if value <= self.best:
            return None
        self.best = value
        return value
