"""Shared ambient files (``-af``): created by one writer alone, checked after each step.

Radiance guards an existing ambient file with fcntl locks, but creates a
missing one with ``fopen(name, "w+")`` before it takes any lock
(src/rt/ambient.c, ``setambient``). Writers that all find the file missing
each truncate it, and one that truncates while another holds the lock in
mid-write leaves a run of zeros or a record cut in two (docs/operations.md,
"Shared ambient files"). So before a step that names a missing ambient file,
the file is created here, complete: a header-only file (header and magic
number, no records) is written to a temporary name and hard-linked into
place, which fails if the name exists. ``link`` is atomic on local disks and
on NFS, so of several jobs on one server, or parts on several servers
sharing the project, exactly one creates the file and the others, and every
Radiance process, find it whole. Radiance accepts such a file: it checks only
the format line, NCOMP, WAVELENGTH_SPLITS and the magic number. Radiance also
reads an existing file in without a lock; ``ambguard`` covers that.

After a step that used an ambient file, the file is checked (header, magic,
whole and valid records, lookamb's count); damage becomes a warning on the
job and a line in its log. The step's outcome is not changed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shlex
import socket
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from rayserver.common import ambfile
from rayserver.jobs.procwrap.ambguard import ReadGuard, shared_lock
from rayserver.jobs.procwrap.confine import (
    ConfinementError,
    open_confined,
    open_parent_confined,
)
from rayserver.jobs.procwrap.progress import RadCommand

# Programs that open -af themselves (rcontrib sets -aa 0 after its options, so never).
PROGRAMS = frozenset({"rpict", "rtrace", "rvu", "rsensor", "mkillum"})
_OPTIONS_FILE_LIMIT = 1 << 16
_SH_KEYWORDS = frozenset({"do", "then", "else", "elif", "!", "time", "{", "}", "exec", "nohup"})
_LOOKAMB_TIMEOUT = 120.0
_LOCK_WAIT = 30.0  # seconds for the shared lock before the check is skipped


class StepLog(Protocol):
    """What the step runner offers this module: its log and the job's warnings."""

    def log(self, text: str) -> None: ...

    def warn(self, text: str) -> None: ...


@dataclass(frozen=True)
class AmbientUse:
    """An ambient file a step's program will open for writing."""

    rel: str  # as the command names it, relative to the project directory
    command: str  # the first command that names it (the new file's header shows it)
    ncomp: int
    rgb: bool  # default spectral sampling: Radiance's RGB wavelength splits apply


def _words(args: Sequence[str], workdir: str) -> list[str]:
    """The arguments with Radiance's ``@file`` option files expanded (one level)."""
    out: list[str] = []
    for a in args:
        if a.startswith("@") and len(a) > 1:
            out.extend(_options_file(workdir, a[1:]))
        else:
            out.append(a)
    return out


def _options_file(workdir: str, rel: str) -> list[str]:
    try:
        fd = open_confined(workdir, rel, write=False)
    except ConfinementError:
        return []  # the program will say what is wrong with it
    with os.fdopen(fd, "rb") as f:
        # bytes.split(): C white space only, as Radiance's expandarg splits
        return [w.decode("utf-8", "surrogateescape") for w in f.read(_OPTIONS_FILE_LIMIT).split()]


def use_of(program: str, args: Sequence[str], workdir: str) -> AmbientUse | None:
    """The ambient file a Radiance command writes to, or None.

    The options are read as Radiance reads them: the last ``-af``, ``-aa``,
    ``-cs`` and ``-cw`` win; with ``-aa 0`` the file is not opened at all.
    """
    if program not in PROGRAMS:
        return None
    words = _words(args, workdir)
    name, accuracy, ncomp, rgb = None, 1.0, ambfile.DEFAULT_NCOMP, True
    for i, w in enumerate(words[:-1]):
        nxt = words[i + 1]
        if w == "-af":
            name = nxt
        elif w == "-aa":
            with contextlib.suppress(ValueError):
                accuracy = float(nxt)
        elif w == "-cs":
            with contextlib.suppress(ValueError):
                ncomp = int(nxt)
            rgb = False
        elif w == "-cw":
            rgb = False
    if not name or accuracy <= 0 or not ambfile.DEFAULT_NCOMP <= ncomp <= ambfile.MAX_NCOMP:
        return None
    return AmbientUse(name, " ".join([program, *args]), ncomp, rgb)


def uses_of_step(
    program: str, args: Sequence[str], workdir: str, rad_plan: Iterable[RadCommand] = ()
) -> list[AmbientUse]:
    """The ambient files of a step: its own -af, those of the commands rad will run, or
    those of the commands of a shell step (``sh -c TEXT``)."""
    if program == "rad":
        commands = [(c.program, list(c.argv[1:])) for c in rad_plan]
    elif program == "sh":
        commands = shell_commands(_shell_text(args, workdir))
    else:
        commands = [(program, list(args))]
    found: dict[str, AmbientUse] = {}
    for name, cmd_args in commands:
        use = use_of(name, cmd_args, workdir)
        # (a name the shell would build is not the name we see)
        if use is not None and not (program == "sh" and any(c in use.rel for c in "$`*?[~")):
            found.setdefault(use.rel, use)
    return list(found.values())


def _shell_text(args: Sequence[str], workdir: str) -> str:
    """The commands of ``sh [-x] -c TEXT`` or ``sh [-x] SCRIPT`` (a project file)."""
    words = [a for a in args if a != "-x"]
    if words[:1] == ["-c"]:
        return words[1] if len(words) > 1 else ""
    if not words:
        return ""
    try:
        fd = open_confined(workdir, words[0], write=False)
    except ConfinementError:
        return ""
    with os.fdopen(fd, "rb") as f:
        return f.read(_OPTIONS_FILE_LIMIT).decode("utf-8", "replace")


def shell_commands(text: str) -> list[tuple[str, list[str]]]:
    """(program, arguments) of the simple commands of a shell text, as far as words tell.

    Line ends and operators (``; | & && || ( )``, redirections) end a command; leading
    keywords (``do``, ``then``, ...) and ``VAR=value`` words are skipped. No
    expansion: a name the shell builds (``$``, backquotes, globs) is left out,
    and the step then runs as it would without rayserver's help.
    """
    out: list[tuple[str, list[str]]] = []
    for line in text.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        try:
            tokens = list(lex)
        except ValueError:  # a quote left open (or spanning lines): not read
            continue
        words: list[str] = []
        for tok in [*tokens, ";"]:
            if tok and set(tok) <= set(";&|()<>"):
                while words and (
                    words[0] in _SH_KEYWORDS or ("=" in words[0] and not words[0].startswith("-"))
                ):
                    words.pop(0)
                if words:
                    out.append((words[0].rsplit("/", 1)[-1], words[1:]))
                words = []
            else:
                words.append(tok)
    return out


def create_missing(workdir: str, use: AmbientUse) -> bool:
    """Create the file valid and empty unless it exists; True if this call created it.

    Raises ConfinementError for a name outside the project, OSError otherwise.
    """
    content = ambfile.empty_file(use.command, ncomp=use.ncomp, rgb=use.rgb)
    dir_fd, name = open_parent_confined(workdir, use.rel)
    try:
        try:
            os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            return False
        except FileNotFoundError:
            pass
        tmp = f".{name}.{socket.gethostname()}.{os.getpid()}.rayserver-new"
        try:
            _write_new(dir_fd, tmp, content)
        except OSError as exc:
            if exc.errno not in (errno.ENAMETOOLONG, errno.EEXIST):
                raise
            return _create_locked(dir_fd, name, content)
        try:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                raise
            return _create_locked(dir_fd, name, content)  # a file system without hard links
        finally:
            os.unlink(tmp, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def _write_new(dir_fd: int, name: str, content: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o666, dir_fd=dir_fd)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        os.unlink(name, dir_fd=dir_fd)
        raise
    os.close(fd)


def _create_locked(dir_fd: int, name: str, content: bytes) -> bool:
    """Exclusive create, written under Radiance's own whole-file fcntl lock.

    A Radiance process that opens the still empty file first waits for the
    lock and, finding no header, retries after two seconds (ambient.c).
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o666, dir_fd=dir_fd)
    except FileExistsError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    return True


class StepAmbients:
    """The ambient files of one step, from before its start to the check after its end.

    The step runner's hook: ``before()`` creates missing files and takes the
    read guard (ambguard), ``started(pid)`` and ``release()`` bracket the
    program, ``check()`` looks at the files afterwards.
    """

    def __init__(self, job: StepLog, workdir: str, uses: list[AmbientUse]) -> None:
        self.job, self.workdir, self.uses = job, workdir, uses
        self.guard = ReadGuard(job, workdir, [u.rel for u in uses])

    @classmethod
    def before(
        cls,
        job: StepLog,
        workdir: str,
        program: str,
        args: Sequence[str],
        rad_plan: Iterable[RadCommand] = (),
    ) -> StepAmbients:
        uses = uses_of_step(program, args, workdir, rad_plan)
        prepare(job, workdir, uses)
        return cls(job, workdir, uses)

    def started(self, pid: int, program: str) -> None:
        # rad's and a shell's programs run as grandchildren: look at the whole group.
        self.guard.started(pid, whole_group=program in ("rad", "sh"))

    def release(self) -> None:
        self.guard.release()

    def check(self, program_path: str, env: dict[str, str]) -> None:
        if self.uses:
            check(self.job, self.workdir, self.uses, lookamb_beside(program_path), env)


def prepare(job: StepLog, workdir: str, uses: Iterable[AmbientUse]) -> None:
    """Before the step: create each missing ambient file, alone (see the module's text)."""
    for use in uses:
        try:
            created = create_missing(workdir, use)
        except (ConfinementError, OSError) as exc:
            # Not fatal: the program opens (or refuses) the name itself, as without rayserver.
            job.log(f"rayserver: ambient file {use.rel} not created beforehand: {exc}\n")
            continue
        if created:
            job.log(
                f"rayserver: created the ambient file {use.rel} (header only), so that "
                "concurrent writers do not create it at once\n"
            )


def check(
    job: StepLog, workdir: str, uses: Iterable[AmbientUse], lookamb: str, env: dict[str, str]
) -> None:
    """After the step: warn about each of its ambient files that is damaged."""
    for use in uses:
        try:
            problem = damage(workdir, use.rel, lookamb, env)
        except OSError as exc:
            job.log(f"rayserver: the ambient file {use.rel} was not checked: {exc}\n")
            continue
        if problem:
            job.warn(
                f"the ambient file {use.rel} is damaged: {problem}; Radiance will drop the "
                "records from there on when it next opens the file"
            )


def lookamb_beside(program_path: str) -> str:
    """lookamb in the folder of the step's Radiance program."""
    return os.path.join(os.path.dirname(program_path), "lookamb")


def damage(workdir: str, rel: str, lookamb: str, env: dict[str, str]) -> str | None:
    """What is wrong with an ambient file in the project, or None (also when it is absent).

    OSError (TimeoutError) when it could not be checked.

    Other jobs may still be writing to it: the check holds a shared fcntl lock,
    as Radiance's readers do, so no writer appends between the byte-level check
    and lookamb's count.
    """
    try:
        fd = open_confined(workdir, rel, write=False)
    except ConfinementError:
        return None  # absent (or outside the project): nothing of ours to check
    try:
        if not shared_lock(fd, _LOCK_WAIT):
            raise TimeoutError(f"another process held its lock for {_LOCK_WAIT:g} s")
        result = ambfile.check_fd(fd)
        if not result.ok:
            return result.problem
        if not os.path.exists(lookamb):
            return None
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            counted = ambfile.lookamb_count(fd, lookamb, env, timeout=_LOOKAMB_TIMEOUT)
        except (OSError, subprocess.SubprocessError):
            return None  # lookamb is the second opinion only
        if counted != result.records:
            return f"lookamb reads {counted} of its {result.records} records"
        return None
    finally:
        os.close(fd)  # releases the lock
