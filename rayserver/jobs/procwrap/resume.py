"""How a resumed job's interrupted step continues from what it had already computed.

A job queued again after an interruption (setting ``resume_interrupted``,
:meth:`rayserver.jobs.jobdb.JobDB.interrupt`) skips the steps that were done
and runs the one it was in again, so:

- rpict: in its recover mode. The partial picture is set aside (see
  :func:`set_aside`) and rpict runs as ``rpict -r ASIDE <the step's options>
  OCTREE > PICTURE``: it takes the view and the resolution from the header
  of ASIDE, copies its complete scanlines into the new PICTURE and renders
  only the rest (Radiance's rpict.c, ``salvage``), as ``-ro`` would. The
  picture is the step's stdout file or its ``-o`` file. Only a file that holds a
  complete header and resolution line is recovered; anything else, and
  rpict's sequence and persist modes, start over.
- rad: rad's own recovery. Run again, rad finds the ``.unf`` picture of its
  interrupted render (newer than the octree) and would run ``rpict -ro`` on
  it (rad.c), which Radiance 6.0a cannot do in the job's sandbox (see
  :func:`set_aside`). So the commands ``rad -n`` prints up to that view's
  ``pfilt`` and ``rm`` run first, as a shell step, with the ``-ro`` render
  turned into the recover described above, and then rad itself, which
  finds those views done and renders the rest. rad never removes a
  ``.unf`` it recovers from, and a rad without one just runs again.
- rtrace and rcontrib grids: only the rays without a record in the output
  (see :mod:`rayserver.jobs.procwrap.gridresume`).
- anything else: started over.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field

from rayserver.jobs.procwrap import gridresume
from rayserver.jobs.procwrap.confine import (
    ConfinementError,
    open_confined,
    open_parent_confined,
)
from rayserver.jobs.rows import StepSpec

# rpict options after which a recover is not what the user asked for (or not possible).
_NO_RECOVER = ("-r", "-ro", "-S", "-P", "-PP")
_RESOLUTION = re.compile(rb"[-+][XY] +\d+ +[-+][XY] +\d+\n")
HEADER_LIMIT = 1 << 16  # a picture's header and resolution line are read from this much


@dataclass
class StepPlan:
    """How the interrupted step runs again."""

    args: list[str]
    stdout: str | dict[str, bool] | None
    note: str  # for the job's log: how it continues
    restart: bool  # True: from scratch (the job's resume_restart event)
    named: list[str] = field(default_factory=list)  # files the step writes by name
    sh: str | None = None  # the step becomes this shell script (rad's recover, then rad)
    offset: int = 0  # grids: where in stdin the rays not yet answered start
    keep: int | None = None  # grids: the length of stdout to keep and append to


def plan(
    step: StepSpec,
    args: list[str],
    workdir: str,
    dry_run: Callable[[list[str]], str | None] | None = None,
) -> StepPlan:
    """How ``step`` (with ``args`` as it would run) continues in ``workdir``.

    ``dry_run(argv)``: the standard output of ``argv`` run in the job's box
    (None when it failed); rad's plan needs its ``rad -n``.
    """
    program = step["program"]
    if program == "rpict" and "sh" not in step and "script" not in step:
        return _rpict(step, args, workdir)
    if program == "rad" and dry_run is not None:
        return _rad(step, args, workdir, dry_run)
    if program in ("rtrace", "rcontrib") and "sh" not in step and "script" not in step:
        grid = gridresume.plan(step, args, workdir)
        if isinstance(grid, str):
            return restart(step, args, grid)
        note, offset, keep = grid
        resumed = [*args[:-1], "-h-", *args[-1:]]  # no second header in the middle
        return StepPlan(resumed, step.get("stdout"), note, False, offset=offset, keep=keep)
    return restart(step, args, f"{program} cannot continue its output")


def restart(step: StepSpec, args: list[str], why: str) -> StepPlan:
    """The step from scratch, saying why."""
    return StepPlan(args, step.get("stdout"), f"{why}: it starts over", True)


def _rpict(step: StepSpec, args: list[str], workdir: str) -> StepPlan:
    stdout = step.get("stdout")
    if any(a in _NO_RECOVER for a in args):
        return restart(step, args, "rpict with -r, -ro, -S or -P")
    if "-o" in args[:-1]:
        at = args.index("-o")
        picture = args[at + 1]
        recover = [*args[:at], "-o", picture, *args[at + 2 :]]
    elif isinstance(stdout, str):
        picture, recover = stdout, args
    else:
        return restart(step, args, "rpict's picture is not a file of the project")
    if "%" in picture:
        return restart(step, args, f"rpict's picture {picture!r} has a % (a frame template)")
    try:
        partial = set_aside(workdir, picture)
    except (ConfinementError, OSError) as exc:
        return restart(step, args, f"{picture} cannot be set aside to recover it ({exc})")
    if partial is None:
        return restart(step, args, f"{picture} holds no complete header yet")
    size = os.path.getsize(os.path.join(workdir, partial))
    note = (
        f"rpict recovers {picture} ({size} bytes rendered, set aside as {partial}) "
        "with -r and renders the rest"
    )
    return StepPlan(["-r", partial, *recover], stdout, note, False, named=[picture])


def set_aside(workdir: str, picture: str) -> str | None:
    """Move the partial ``picture`` to the name rpict recovers it from; that name.

    ``rpict -ro FILE`` (``-r FILE -o FILE``: rpict renames FILE aside itself)
    fails in the job's sandbox: with an output file (-o), Radiance 6.0a's
    rpict writes its header to a temporary file in /tmp first (duphead.c),
    and the sandbox keeps jobs out of /tmp. So the procwrap renames FILE
    beside itself and runs ``rpict -r ASIDE ... > FILE`` (or ``-r ASIDE -o
    FILE`` for a step that names -o): the same recover, writing where the
    step always wrote (rpict unlinks ASIDE once it has copied its scanlines). An ASIDE left by a
    resume that died before rpict copied it is the more complete one: it is
    used again. None: nothing worth recovering (no complete header and
    resolution line).
    """
    folder, name = os.path.split(picture)
    aside = os.path.join(folder, f".{name}.resume")
    dir_fd, last = open_parent_confined(workdir, picture)
    try:
        if not picture_started(workdir, aside):
            if not picture_started(workdir, picture):
                return None
            os.rename(last, f".{last}.resume", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(last, dir_fd=dir_fd)  # rpict creates it anew (exclusively)
    finally:
        os.close(dir_fd)
    return aside


def picture_started(workdir: str, rel: str) -> bool:
    """True when ``rel`` is a project file with a complete picture header and resolution."""
    try:
        fd = open_confined(workdir, rel, write=False)
    except ConfinementError:
        return False
    with os.fdopen(fd, "rb") as fh:
        head = fh.read(HEADER_LIMIT)
    if not head.startswith(b"#?"):
        return False
    end = head.find(b"\n\n")
    return end >= 0 and _RESOLUTION.match(head, end + 2) is not None


# Commands rad runs after a view's render, to make its picture of the .unf file.
_RAD_AFTER = ("pfilt", "rm", "mv", "pcompos", "pcomb")


def _rad(
    step: StepSpec, args: list[str], workdir: str, dry_run: Callable[[list[str]], str | None]
) -> StepPlan:
    from rayserver.jobs.procwrap.progress import rad_dry_run_args

    text = dry_run([step["path"], *rad_dry_run_args(args)])
    if text is None:
        return restart(step, args, "rad's dry run failed, so rad runs again as it is")
    lines = [line.strip() for line in text.splitlines() if line.startswith("\t")]
    renders = [i for i, line in enumerate(lines) if _is_recover(line)]
    if not renders:
        return StepPlan(args, step.get("stdout"), "rad runs again (no render to recover)", False)
    end = renders[-1] + 1
    end += len(_following(lines, end))
    script, recovered = [], []
    for line in lines[:end]:
        if not _is_recover(line):
            script.append(line)
            continue
        recover, unf = _rad_recover(shlex.split(line), workdir)
        if recover is None:  # nothing worth recovering: rad renders that view afresh
            return restart(step, args, f"rad's {unf} holds no complete header")
        script.append(recover)
        recovered.append(unf)
    text = "\n".join(["set -e", *script, f"exec {shlex.join([step['path'], *args])}", ""])
    note = f"rad's render of {', '.join(recovered)} is recovered (rpict -r), then rad goes on"
    return StepPlan(["-c", text], step.get("stdout"), note, False, named=recovered, sh=text)


def _is_recover(line: str) -> bool:
    words = line.split()
    return words[:1] == ["rpict"] and "-ro" in words[:-1]


def _rad_recover(words: list[str], workdir: str) -> tuple[str | None, str]:
    """rad's ``rpict ... -ro FILE.unf OCTREE`` as the recover that works in the box.

    A ``.unf`` without a complete header is removed, so rad renders it afresh.
    """
    at = words.index("-ro")
    unf = words[at + 1]
    try:
        aside = set_aside(workdir, unf)
        if aside is None:
            dir_fd, last = open_parent_confined(workdir, unf)
            try:
                os.unlink(last, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
    except (ConfinementError, OSError):
        aside = None
    if aside is None:
        return None, unf
    rest = [*words[1:at], *words[at + 2 :]]
    return f"rpict -r {shlex.quote(aside)} {shlex.join(rest)} > {shlex.quote(unf)}", unf


def _following(lines: list[str], start: int) -> list[str]:
    """The commands right after a render that turn its .unf into the picture."""
    out = []
    for line in lines[start:]:
        if line.split(" ", 1)[0] not in _RAD_AFTER:
            break
        out.append(line)
    return out
