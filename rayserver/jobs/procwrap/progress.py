"""Progress parsers: rpict ``-t`` reports, rad's echoed command lines, step counts.

Pure functions and small state machines, no I/O, so they are unit-tested on
captured lines. The formats are those of Radiance 6.0a (see
shared/radiance-facts.md):

- rpict reports on stderr, one line per report::

      rpict: 982530 rays, 26.91% after 0.000u 0.000s 0.001r hours on HOST (PID 22721)

  (C format ``"%lu rays, %s%4.2f%% after %.3fu %.3fs %.3fr hours on %s (PID %d)"``;
  the ``%s`` is empty unless photon-map bias statistics are on).
- rad echoes every command it runs to stdout, tab-indented. Per view it may
  run a small overture rpict to ``/dev/null`` and then the real render, each
  counting from 0 %, so overall progress has to be computed here from the
  plan of a dry run (``rad -n``).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

RPICT_REPORT = re.compile(
    r"^rpict: (?P<rays>\d+) rays, (?P<bias>.*?)(?P<percent>\d+(?:\.\d+)?)% after "
    r"(?P<user>\d+(?:\.\d+)?)u (?P<sys>\d+(?:\.\d+)?)s (?P<real>\d+(?:\.\d+)?)r hours "
    r"on (?P<host>.*) \(PID (?P<pid>\d+)\)\s*$"
)

# rad's command echo: one tab, then the command as /bin/sh will see it.
RAD_ECHO = re.compile(r"^\t(?P<cmd>\S.*)$")


@dataclass(frozen=True)
class RpictReport:
    """One parsed rpict progress report."""

    rays: int
    percent: float
    user_hours: float
    sys_hours: float
    real_hours: float
    host: str
    pid: int


def parse_rpict_report(line: str) -> RpictReport | None:
    """The report in ``line``, or None if it is not an rpict progress report."""
    m = RPICT_REPORT.match(line.rstrip("\r\n"))
    if not m:
        return None
    percent = float(m["percent"])
    if not 0.0 <= percent <= 100.0:
        return None
    return RpictReport(
        int(m["rays"]),
        percent,
        float(m["user"]),
        float(m["sys"]),
        float(m["real"]),
        m["host"],
        int(m["pid"]),
    )


@dataclass(frozen=True)
class RadCommand:
    """One command rad echoed (or would run, in a dry run)."""

    program: str
    argv: tuple[str, ...]
    output: str | None  # the file after '>' if any

    @property
    def is_render(self) -> bool:
        """An rpict whose picture is kept (not the overture to /dev/null)."""
        return self.program == "rpict" and self.output != "/dev/null"

    @property
    def is_overture(self) -> bool:
        return self.program == "rpict" and self.output == "/dev/null"


def parse_rad_command(line: str) -> RadCommand | None:
    """The command of a rad echo line (tab-indented), or None for anything else."""
    m = RAD_ECHO.match(line.rstrip("\r\n"))
    if not m:
        return None
    try:
        words = shlex.split(m["cmd"], posix=True)
    except ValueError:
        words = m["cmd"].split()
    if not words:
        return None
    output = None
    argv: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w == ">" and i + 1 < len(words):
            output = words[i + 1]
            i += 2
            continue
        if w.startswith(">") and len(w) > 1 and not w.startswith(">>"):
            output = w[1:]
        else:
            argv.append(w)
        i += 1
    if not argv:
        return None
    program = argv[0].rsplit("/", 1)[-1]
    return RadCommand(program, tuple(argv), output)


def parse_rad_plan(dry_run_stdout: str) -> list[RadCommand]:
    """The commands of a ``rad -n`` dry run, in order."""
    out = []
    for line in dry_run_stdout.splitlines():
        cmd = parse_rad_command(line)
        if cmd is not None:
            out.append(cmd)
    return out


def rad_variables(dry_run_stdout: str) -> dict[str, str]:
    """The variables ``rad -n -e`` printed (``NAME=value`` lines before the commands)."""
    out: dict[str, str] = {}
    for line in dry_run_stdout.splitlines():
        if line.startswith("\t"):
            continue
        name, sep, value = line.partition("=")
        if sep and name and " " not in name:
            out[name] = value.strip()
    return out


def rad_dry_run_args(args: list[str]) -> list[str]:
    """rad's arguments for a dry run: -n/-N removed (they set the same variable), -n added.

    ``-s`` (silent) is removed too, or the dry run would echo nothing; ``-e``
    is added so the variables (REPORT among them) are listed.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-n", "-s", "-e"):
            i += 1
            continue
        if a == "-N":
            i += 2
            continue
        if a.startswith("-N") and a[2:].isdigit():
            i += 1
            continue
        out.append(a)
        i += 1
    return ["-n", "-e", *out]


def has_report_variable(args: list[str], variables: dict[str, str]) -> bool:
    """True when the user set REPORT on rad's command line or in the rif.

    rad accepts variable names abbreviated to their first three letters.
    """
    for a in args:
        name, sep, _ = a.partition("=")
        if sep and len(name) >= 3 and "REPORT".startswith(name.upper()):
            return True
    return "REPORT" in {k.upper() for k in variables}


@dataclass
class RadProgress:
    """Overall progress of one rad run from its echo lines and rpict reports.

    ``renders`` is the number of kept rpict renders of the dry run. Each
    echoed real render starts a new slot; the rpict reports inside it move
    the fraction. Overture reports are ignored (they count from 0 % again).
    """

    renders: int
    done_renders: int = 0
    current: float = 0.0
    in_render: bool = False
    in_overture: bool = False
    commands_seen: int = 0
    _last: float = field(default=0.0, repr=False)

    def feed(self, line: str) -> float | None:
        """Feed one output line; returns the new fraction (0..1) when it changed."""
        cmd = parse_rad_command(line)
        if cmd is not None:
            self.commands_seen += 1
            if self.in_render:
                self.done_renders += 1
                self.current = 0.0
            self.in_render = cmd.is_render
            self.in_overture = cmd.is_overture
            return self._emit()
        rep = parse_rpict_report(line)
        if rep is not None and self.in_render:
            self.current = rep.percent / 100.0
            return self._emit()
        return None

    def fraction(self) -> float:
        if self.renders <= 0:
            return 0.0
        done = min(self.done_renders, self.renders) + (self.current if self.in_render else 0.0)
        return max(0.0, min(1.0, done / self.renders))

    def _emit(self) -> float | None:
        value = self.fraction()
        if value == self._last:
            return None
        self._last = value
        return value


def overall_percent(step_index: int, step_count: int, fraction: float) -> float:
    """Job progress 0-100 from the 0-based step in progress and its own fraction.

    Never reports 100 before the job has really finished: the procwrap
    writes 100 itself at success.
    """
    if step_count <= 0:
        return 0.0
    fraction = max(0.0, min(1.0, fraction))
    value = 100.0 * (step_index + fraction) / step_count
    return round(min(value, 99.9), 2)


def has_option(args: list[str], option: str) -> bool:
    """True when the Radiance option (e.g. '-t') is among ``args``."""
    return any(a == option for a in args)


class LineCounter:
    """Counts data lines of a growing text output, skipping a Radiance header.

    Used for rtrace with a stdin file: output records against input records.
    """

    def __init__(self, header: bool) -> None:
        self.in_header = header
        self.lines = 0
        self._tail = b""

    def feed(self, chunk: bytes) -> int:
        data = self._tail + chunk
        if self.in_header:
            end = data.find(b"\n\n")
            if end < 0:
                self._tail = data[-1:] if data else b""
                return self.lines
            self.in_header = False
            data = data[end + 2 :]
        self._tail = b""
        self.lines += data.count(b"\n")
        return self.lines


def count_lines(data: bytes) -> int:
    """Input records of an ASCII rtrace input (non-empty lines)."""
    return sum(1 for line in data.splitlines() if line.strip())
