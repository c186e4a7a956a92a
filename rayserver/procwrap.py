"""The procwrap: the controlling process of one simulation job.

It claims its job in the database (exactly once), runs the steps in order in
the project directory, writes the job log, parses progress, and records the
result itself, so no living worker is needed. It runs in a session of its own
(the fork server's child, or ``python -m rayserver.procwrap`` under Slurm) and
is a child subreaper, so grandchildren such as rad -> sh -> rpict stay
reachable and are reaped here.

Each step runs in its own process group; cancelling signals that group
(SIGTERM, SIGKILL after the grace period) so no Radiance process survives.
stdin/stdout files are opened confined to the project directory at the
moment of use: every path component is opened with O_NOFOLLOW relative to a
directory descriptor, so a symlink swapped in after the submit-time check
cannot make a job read or write outside the project.

Exit codes: see the EXIT_* constants; the scheduler uses them when a
procwrap died without recording a final state.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import functools
import os
import resource
import selectors
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rayserver import progress as prog
from rayserver.jobdb import JobDB

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CLAIM_LOST = 3
EXIT_INTERNAL = 4
EXIT_CANCELLED = 5
EXIT_INTERRUPTED = 6

PR_SET_CHILD_SUBREAPER = 36
SAMPLE_INTERVAL = 0.5      # RSS sampling of the step group
# The first /proc scan and rtrace line count wait this long: a step that ends
# sooner (a tiny rtrace) costs no scan (~0.7 ms of CPU each on a busy
# machine); its peak memory still comes from getrusage.
FIRST_SAMPLE = 0.05
PROGRESS_INTERVAL = 0.5    # at most ~2 progress writes per second
RPICT_POKE_INTERVAL = 3.0  # SIGCONT asks rpict for one report (no -t needed)
RAD_REPORT = "REPORT=0.05"  # minutes: rpict -t 3
DRY_RUN_TIMEOUT = 60.0
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


class ConfinementError(Exception):
    """A stdin/stdout path that would leave the project directory (or is no plain file)."""


_subreaper_pid = 0  # the process that set the flag (a fork does not inherit it)


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def set_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux)."""
    global _subreaper_pid
    if _subreaper_pid == os.getpid():
        return True
    try:
        ok = _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if ok:
        _subreaper_pid = os.getpid()
    return ok


@functools.lru_cache(maxsize=4)
def _home_of(db_path: Path) -> Path:
    return Path(db_path).resolve().parent.parent


def procwrap_title(db_path: Path, job_id: int, row: dict[str, Any] | None) -> str:
    """``rfcore -O <home>/procwrap.pyo job=<id> <name or program>`` (home = db's grandparent)."""
    home = _home_of(Path(db_path))
    what = ""
    if row:
        what = row.get("name") or (row["steps"][0]["program"] if row.get("steps") else "")
    return f"rfcore -O {home}/procwrap.pyo job={job_id} {what}".rstrip()


def open_confined(workdir: str, rel: str, *, write: bool) -> int:
    """Open ``rel`` inside ``workdir`` without following any symlink; returns an fd.

    Raises ConfinementError with a message naming the path and the reason.
    Writing truncates like the shell's ``>``, but refuses a file with other
    hard links (one could point outside the project) and anything that is
    not a regular file.
    """
    if not rel or rel.startswith("/") or "\x00" in rel:
        raise ConfinementError(f"{rel!r}: expected a relative path inside the project")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ConfinementError(f"{rel!r}: '..' or an empty path leaves the project directory")
    dir_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for comp in parts[:-1]:
            try:
                nxt = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ConfinementError(
                        f"{rel!r}: folder {comp!r} is a symbolic link or not a folder; "
                        "refusing to follow it out of the project"
                    ) from exc
                raise ConfinementError(f"{rel!r}: cannot open folder {comp!r}: "
                                       f"{exc.strerror}") from exc
            os.close(dir_fd)
            dir_fd = nxt
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        flags |= (os.O_WRONLY | os.O_CREAT) if write else os.O_RDONLY
        try:
            fd = os.open(parts[-1], flags, 0o666, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfinementError(
                    f"{rel!r} is a symbolic link; refusing to follow it out of the project"
                ) from exc
            if exc.errno == errno.ENXIO:
                raise ConfinementError(f"{rel!r} is a FIFO or socket, not a file") from exc
            raise ConfinementError(f"{rel!r}: cannot open: {exc.strerror}") from exc
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfinementError(f"{rel!r} is not a regular file")
        if write and st.st_nlink > 1:
            raise ConfinementError(
                f"{rel!r} has {st.st_nlink} hard links; refusing to overwrite a file that may "
                "also live outside the project"
            )
        os.set_blocking(fd, True)
        if write:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _proc_stat(pid: str) -> tuple[int, str, int] | None:
    """(pgrp, state, rss pages) of one /proc entry, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()
    try:
        return int(fields[2]), fields[0].decode(), int(fields[21])
    except (IndexError, ValueError):
        return None


def group_members(pgid: int) -> list[tuple[int, int]]:
    """Live (non-zombie) processes of process group ``pgid`` as (pid, rss kB)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        info = _proc_stat(name)
        if info and info[0] == pgid and info[1] != "Z":
            out.append((int(name), info[2] * _PAGE_KB))
    return out


def group_gone(pgid: int) -> bool:
    """True when process group ``pgid`` has no live member (zombies do not count).

    ``killpg(pgid, 0)`` answers the common case (nothing left at all) with
    one system call; only when something answers is /proc scanned, to tell
    live members from zombies not yet reaped.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # a member that changed identity: it exists
    return not group_members(pgid)


class _RtraceCount:
    """Progress of rtrace with stdin and stdout files: output records against input ones.

    Both files are reopened through /proc at the start (own offsets), but
    read only when the first sample is due, so a tiny job never reads them.
    """

    def __init__(self, in_fd: int, out_fd: int, header: bool) -> None:
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.counter = prog.LineCounter(header=header)
        self.in_lines: int | None = None

    def fraction(self) -> float | None:
        if self.in_lines is None:
            chunks = []
            with contextlib.suppress(OSError):
                while chunk := os.read(self.in_fd, 1 << 20):
                    chunks.append(chunk)
            self.in_lines = prog.count_lines(b"".join(chunks))
        if not self.in_lines:
            return None
        with contextlib.suppress(OSError):
            while chunk := os.read(self.out_fd, 1 << 20):
                self.counter.feed(chunk)
        return self.counter.lines / self.in_lines

    def close(self) -> None:
        for fd in (self.in_fd, self.out_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


# Python ignores these; a Radiance program must get them back (rad's pipelines need SIGPIPE).
_DEFAULT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ", "SIGXFZ")
                         if hasattr(signal, name))


def spawn(argv: list[str], *, cwd: str, env: dict[str, str], stdin_fd: int | None,
          stdout_fd: int, stderr_fd: int) -> int:
    """Start ``argv`` as the leader of a new process group; returns its pid.

    What ``subprocess.Popen(..., process_group=0, close_fds=True)`` does,
    through ``posix_spawn`` (vfork and exec in C), ~0.2 ms less of Python
    per step. ``close_fds``: every descriptor above 2 is made close-on-exec
    first (Python opens its own so; this catches any inherited one).
    stdin is /dev/null when ``stdin_fd`` is None. This process moves to
    ``cwd`` (all its own paths are absolute). OSError when it cannot start.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # (the listing's own descriptor is gone)
                if os.get_inheritable(fd):
                    os.set_inheritable(fd, False)
    os.chdir(cwd)
    actions: list[tuple[Any, ...]] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0) if stdin_fd is None
        else (os.POSIX_SPAWN_DUP2, stdin_fd, 0),
        (os.POSIX_SPAWN_DUP2, stdout_fd, 1),
        (os.POSIX_SPAWN_DUP2, stderr_fd, 2),
    ]
    return os.posix_spawn(argv[0], argv, env, file_actions=actions, setpgroup=0,
                          setsigdef=_DEFAULT_SIGNALS)


def _fmt_status(code: int | None, sig: int | None) -> str:
    if sig is not None:
        try:
            return f"killed by signal {sig} ({signal.Signals(sig).name})"
        except ValueError:
            return f"killed by signal {sig}"
    if code is None:
        return "not started"
    return f"exit status {code}"


@functools.lru_cache(maxsize=1)
def _base_env() -> dict[str, str]:
    # A copy decodes every variable: done once (in a spare, before its job).
    return dict(os.environ)


class _Job:
    """State of one procwrap run (one instance per process)."""

    def __init__(self, db: JobDB, job_id: int, log_fd: int, grace: float) -> None:
        self.db = db
        self.id = job_id
        self.log_fd = log_fd
        self.grace = grace
        self.row: dict[str, Any] = {}
        self.steps: list[dict[str, Any]] = []
        self.env: dict[str, str] = {}
        self.workdir = ""
        self.term_signal: int | None = None
        self.max_rss_kb = 0
        self.outputs: list[str] = []
        self._last_progress = -1.0
        self._last_progress_at = 0.0
        self._pending_progress: float | None = None
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake_w = wake_w

    def load(self, row: dict[str, Any]) -> None:
        """Take the job's steps and environment from its (claimed) row."""
        self.row = row
        self.steps = row["steps"]
        self.env = dict(_base_env())
        self.env.update(row["env"] or {})
        self.workdir = row["workdir"]

    # --- signals ----------------------------------------------------------

    def install_signals(self) -> None:
        def on_term(signum: int, _frame: object) -> None:
            # Only record it; the main loop acts (no work in a handler).
            if self.term_signal is None:
                self.term_signal = signum

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_term)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    # --- log and progress -------------------------------------------------

    def log(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        while data:
            n = os.write(self.log_fd, data)
            data = data[n:]

    def progress(self, percent: float, *, force: bool = False) -> None:
        now = time.monotonic()
        if percent == self._last_progress:
            return
        if not force and now - self._last_progress_at < PROGRESS_INTERVAL:
            self._pending_progress = percent
            return
        self.db.update_progress(self.id, progress=percent)
        self._last_progress = percent
        self._last_progress_at = now
        self._pending_progress = None

    def flush_progress(self) -> None:
        if self._pending_progress is not None:
            self.progress(self._pending_progress)

    # --- the run ----------------------------------------------------------

    def run(self) -> int:
        started = time.monotonic()
        n = len(self.steps)
        code: int | None = 0
        sig: int | None = None
        failed_step = 0
        state = "done"
        reason: str | None = None
        self.log(f"== job {self.id}: {n} step(s) in {self.workdir} ==\n")
        for idx, step in enumerate(self.steps):
            if self.term_signal is not None:
                break
            try:
                code, sig = self.run_step(idx, step)
            except ConfinementError as exc:
                self.log(f"rayserver: refused: {exc}\n")
                code, sig, failed_step = None, None, idx + 1
                state, reason = "failed", f"step {idx + 1}/{n} ({step['program']}): {exc}"
                break
            if self.term_signal is None and (code != 0 or sig is not None):
                failed_step = idx + 1
                state = "failed"
                reason = (f"step {idx + 1}/{n} ({step['program']}) "
                          f"{_fmt_status(code, sig)}")
                break
        if self.term_signal is not None:
            state, reason = self.interrupted_state()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.monotonic() - started
        cpu = usage.ru_utime + usage.ru_stime
        rss = max(int(usage.ru_maxrss), self.max_rss_kb)
        self.log(f"== {state}: {_fmt_status(code, sig)}"
                 f"{f' in step {failed_step}/{n}' if failed_step else ''}, wall {wall:.2f} s, "
                 f"cpu {cpu:.2f} s, max rss {rss} kB"
                 f"{f' ({reason})' if reason and state != 'failed' else ''} ==\n")
        self.db.finish(
            self.id, state, exit_status=code, signal=sig, reason=reason, wall_time=round(wall, 3),
            cpu_time=round(cpu, 3), max_rss_kb=rss,
            progress=100.0 if state == "done" else None, outputs=self.outputs,
            from_states=("running",),
        )
        return {"done": EXIT_DONE, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}.get(
            state, EXIT_INTERRUPTED)

    def interrupted_state(self) -> tuple[str, str]:
        row = self.db.get(self.id) or {}
        request = row.get("cancel_request")
        name = signal.Signals(self.term_signal or signal.SIGTERM).name
        if request == "cancel":
            return "cancelled", "cancelled by request"
        if request == "shutdown":
            return "interrupted", "the server shut down while the job ran"
        return "interrupted", f"the procwrap received {name} (no cancel was requested)"

    def run_step(self, idx: int, step: dict[str, Any]) -> tuple[int | None, int | None]:
        n = len(self.steps)
        program = step["program"]
        args = list(step["args"])
        tracker: Any = None
        seen_outputs: list[str] = []
        if not os.path.isdir(self.workdir):
            # Moved, deleted or unmounted since the submit: say so, rather than
            # "cannot start <program>" (the chdir's error) or a traceback.
            raise ConfinementError(f"the project directory {self.workdir} is missing "
                                   "(moved, deleted or its volume unmounted?)")
        if program == "rad":
            args, tracker = self.prepare_rad(step["path"], args)
        shown = " ".join([program, *args])
        if step.get("stdin"):
            shown += f" < {step['stdin']}"
        if step.get("stdout"):
            shown += f" > {step['stdout']}"
        self.log(f"== step {idx + 1}/{n}: {shown} ==\n")
        stdin_fd = open_confined(self.workdir, step["stdin"], write=False) \
            if step.get("stdin") else None
        try:
            stdout_fd = open_confined(self.workdir, step["stdout"], write=True) \
                if step.get("stdout") else None
        except BaseException:
            if stdin_fd is not None:
                os.close(stdin_fd)
            raise
        counter: _RtraceCount | None = None
        if program == "rtrace" and stdin_fd is not None and stdout_fd is not None \
                and not any(a.startswith("-f") and a not in ("-fa", "-faa") for a in args):
            in_fd: int | None = None
            with contextlib.suppress(OSError):
                in_fd = os.open(f"/proc/self/fd/{stdin_fd}", os.O_RDONLY | os.O_CLOEXEC)
                count_fd = os.open(f"/proc/self/fd/{stdout_fd}", os.O_RDONLY | os.O_CLOEXEC)
                counter = _RtraceCount(in_fd, count_fd,
                                       header="-h-" not in args and "-h" not in args)
            if counter is None and in_fd is not None:
                os.close(in_fd)
        out_r, out_w = os.pipe()
        try:
            pid = spawn([step["path"], *args], cwd=self.workdir, env=self.env,
                        stdin_fd=stdin_fd,
                        stdout_fd=stdout_fd if stdout_fd is not None else out_w, stderr_fd=out_w)
        except OSError as exc:
            self.log(f"rayserver: cannot start {step['path']}: {exc.strerror or exc}\n")
            for fd in (out_r, out_w, stdin_fd, stdout_fd):
                if fd is not None:
                    os.close(fd)
            if counter is not None:
                counter.close()
            return 127, None
        for fd in (out_w, stdin_fd, stdout_fd):
            if fd is not None:
                os.close(fd)
        pgid = pid
        # One write per step: which step runs, and the group to kill should we die.
        self.db.update_progress(self.id, current_step=idx + 1, pgid_children=pgid,
                                progress=prog.overall_percent(idx, n, 0.0))
        try:
            code, sig = self.supervise(pid, out_r, idx, program, tracker, counter,
                                       seen_outputs)
        finally:
            os.close(out_r)
            if counter is not None:
                counter.close()
        for rel in seen_outputs:
            if not rel.startswith("/") and ".." not in rel.split("/") \
                    and rel not in self.outputs \
                    and os.path.isfile(os.path.join(self.workdir, rel)):
                self.outputs.append(rel)
        return code, sig

    def prepare_rad(self, rad: str, args: list[str]
                    ) -> tuple[list[str], prog.RadProgress | None]:
        """Dry-run rad to count its renders; add REPORT so rpict reports progress."""
        try:
            dry = subprocess.run([rad, *prog.rad_dry_run_args(args)], cwd=self.workdir,
                                 env=self.env, stdin=subprocess.DEVNULL, capture_output=True,
                                 timeout=DRY_RUN_TIMEOUT, check=False, process_group=0)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.log(f"rayserver: rad dry run failed ({exc}); progress by steps only\n")
            return args, None
        text = dry.stdout.decode("utf-8", "replace")
        variables = prog.rad_variables(text)
        if not prog.has_report_variable(args, variables):
            args = [*args, RAD_REPORT]
        if dry.returncode != 0:
            return args, None
        plan = prog.parse_rad_plan(text)
        renders = sum(1 for c in plan if c.is_render)
        self.log(f"rayserver: rad will run {len(plan)} command(s), {renders} render(s)\n")
        return args, prog.RadProgress(renders=renders) if renders else None

    def supervise(self, pid: int, out_r: int, idx: int,
                  program: str, tracker: prog.RadProgress | None,
                  counter: _RtraceCount | None,
                  seen_outputs: list[str]) -> tuple[int | None, int | None]:
        """Copy output to the log, parse progress, sample memory, handle cancel; reap.

        ``pid`` leads the step's process group (pgid == pid).
        """
        pgid = pid
        n = len(self.steps)
        sel = selectors.DefaultSelector()
        sel.register(out_r, selectors.EVENT_READ)
        sel.register(self.wake_r, selectors.EVENT_READ)
        status: int | None = None
        eof = False
        partial = b""
        term_at: float | None = None
        killed = False
        leader_gone_at: float | None = None
        next_sample = time.monotonic() + FIRST_SAMPLE
        next_poke = time.monotonic() + 1.0
        try:
            while True:
                for key, _ in sel.select(0.25):
                    if key.fd == self.wake_r:
                        with contextlib.suppress(BlockingIOError):
                            while os.read(self.wake_r, 512):
                                pass
                        continue
                    data = os.read(out_r, 65536)
                    if not data:
                        eof = True
                        sel.unregister(out_r)
                        continue
                    self.log(data.decode("utf-8", "replace"))
                    lines = (partial + data).split(b"\n")
                    partial = lines.pop()
                    for raw in lines:
                        frac = self.parse_line(raw.decode("utf-8", "replace"), program,
                                               tracker, seen_outputs)
                        if frac is not None:
                            self.progress(prog.overall_percent(idx, n, frac))
                status = self.reap(pid, status)
                now = time.monotonic()
                if self.term_signal is not None and term_at is None:
                    term_at = now
                    self.log(f"\nrayserver: {signal.Signals(self.term_signal).name} received; "
                             f"stopping step {idx + 1} (process group {pgid})\n")
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pgid, signal.SIGTERM)
                if term_at is not None and not killed and now - term_at >= self.grace:
                    killed = True
                    self.log(f"rayserver: still running after {self.grace:g} s; SIGKILL\n")
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pgid, signal.SIGKILL)
                if now >= next_sample and status is None:
                    next_sample = now + SAMPLE_INTERVAL
                    members = group_members(pgid)
                    self.max_rss_kb = max(self.max_rss_kb, sum(kb for _, kb in members))
                    frac = counter.fraction() if counter is not None else None
                    if frac is not None:
                        self.progress(prog.overall_percent(idx, n, frac))
                if program == "rpict" and status is None and now >= next_poke:
                    # SIGCONT makes rpict print one progress report, without -t.
                    next_poke = now + RPICT_POKE_INTERVAL
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
                self.flush_progress()
                if status is not None:
                    if leader_gone_at is None:
                        leader_gone_at = now
                    gone = group_gone(pgid)
                    if gone and eof:
                        break
                    if not gone and now - leader_gone_at > 1.0 and term_at is None:
                        # The step's leader is gone but part of its group lives on
                        # (a background process): end it, nothing may outlive a step.
                        self.log(f"rayserver: ending {len(group_members(pgid))} leftover "
                                 f"process(es) of step {idx + 1}\n")
                        term_at = now
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(pgid, signal.SIGTERM)
                    if gone and not eof and now - leader_gone_at > 2.0:
                        # Someone outside the group holds the pipe; stop reading.
                        break
        finally:
            sel.close()
        if partial:
            self.parse_line(partial.decode("utf-8", "replace"), program, tracker, seen_outputs)
        assert status is not None
        if os.WIFSIGNALED(status):
            return None, os.WTERMSIG(status)
        return os.WEXITSTATUS(status), None

    def parse_line(self, line: str, program: str, tracker: prog.RadProgress | None,
                   seen_outputs: list[str]) -> float | None:
        if program == "rad":
            cmd = prog.parse_rad_command(line)
            if cmd is not None and cmd.output and cmd.output != "/dev/null":
                seen_outputs.append(cmd.output)
            return tracker.feed(line) if tracker is not None else None
        if program == "rpict":
            rep = prog.parse_rpict_report(line)
            if rep is not None:
                return rep.percent / 100.0
        return None

    def reap(self, leader: int, status: int | None) -> int | None:
        """Reap every exited child (orphans come to us as subreaper); the leader's status."""
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return status
            if pid == 0:
                return status
            if pid == leader:
                status = st


def preload(db_path: Path) -> None:
    """Work every procwrap would repeat, done once in the fork server before it forks:
    the libc handle (a dlopen), the installation's real path, the environment copy."""
    with contextlib.suppress(OSError, AttributeError):
        _libc()
    _home_of(Path(db_path).absolute())
    _base_env()


def run_spare(intake: socket.socket, db_path: Path, title: str, *, grace: float,
              on_final: Callable[[int], None] | None = None) -> int:
    """A procwrap started before its job: get ready, wait for the job id, run it.

    Everything that does not depend on the job is done while waiting: the
    database connection (and its schema), the subreaper flag, the title
    ``<title> spare`` (no ``job=``: nothing adopts a spare). The fork server
    sends the job id as one packet on ``intake``; EOF (the fork server is
    gone) ends the spare with nothing done.
    """
    with contextlib.suppress(ImportError):
        import setproctitle

        setproctitle.setproctitle(f"{title} spare")
    set_subreaper()
    db = JobDB(Path(db_path), check=False, prepared=True)
    with contextlib.suppress(sqlite3.Error):
        _warm_statements(db)
    raw = intake.recv(64)
    intake.close()
    if not raw.isdigit():
        return 0  # EOF: the fork server (or the worker) went away before a job came
    job_id = int(raw)
    with contextlib.suppress(ImportError):
        import setproctitle

        # Final title (with the job's name) is set by run_job; this one
        # already lets an adopting worker recognise us.
        setproctitle.setproctitle(f"{title} job={job_id}")
    return run_job(db_path, job_id, grace=grace, on_final=on_final, db=db)


def _warm_statements(db: JobDB) -> None:
    """Run each statement a job needs once, on job id 0 (ids start at 1: no row changes).

    Opens the connection, reads the schema and leaves the statements
    compiled in the connection's cache, so the claim and the writes of the
    first step cost a real job ~0.5 ms less. The writes change nothing, so
    they commit without writing to the database.
    """
    db.get(0)
    db.claim_row(0, 0)
    db.update_progress(0, current_step=1, pgid_children=1, progress=0.0)
    db.finish(0, "done", exit_status=0, signal=None, reason=None, wall_time=0.0,
              cpu_time=0.0, max_rss_kb=0, progress=100.0, outputs=[], from_states=("running",))


def run_job(db_path: Path, job_id: int, *, log_dir: Path | None = None, grace: float = 5.0,
            claim_queued: bool = False, on_final: Callable[[int], None] | None = None,
            db: JobDB | None = None) -> int:
    """Claim job ``job_id``, run its steps, record the result; returns the exit code.

    ``on_final(job_id)`` is called once the final state is committed (the
    fork server uses it to tell the worker at once, before this process
    has even exited); it must not raise. ``db``: an already open JobDB of
    ``db_path`` (a spare's).
    """
    db_path = Path(db_path).absolute()  # steps run with their project as our cwd
    if db is None:
        db = JobDB(db_path, check=False, prepared=True)
    log_path = (Path(log_dir) / "log") if log_dir else db.log_path(job_id)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    job = _Job(db, job_id, log_fd, grace)
    # Handlers before the claim: a SIGTERM from here on is recorded, not fatal.
    job.install_signals()
    states = ("queued", "starting") if claim_queued else ("starting",)
    try:
        row = db.claim_row(job_id, os.getpid(), from_states=states)
    except BaseException:
        os.close(log_fd)
        raise
    if row is None:
        os.close(log_fd)
        if db.get(job_id) is None:
            print(f"procwrap: job {job_id} is not in {db_path}", file=sys.stderr)
        return EXIT_CLAIM_LOST
    try:
        with contextlib.suppress(ImportError):
            import setproctitle

            setproctitle.setproctitle(procwrap_title(db_path, job_id, row))
        set_subreaper()
        job.load(row)
        if row.get("cancel_request") == "cancel":
            job.term_signal = signal.SIGTERM
        code = job.run()
    except Exception as exc:  # noqa: BLE001 - record any failure instead of dying silently
        with contextlib.suppress(Exception):
            job.log("rayserver: internal error in the procwrap:\n" + traceback.format_exc())
        with contextlib.suppress(Exception):
            db.finish(job_id, "failed", reason=f"internal error in the procwrap: {exc}",
                      from_states=("running",))
        code = EXIT_INTERNAL
    finally:
        os.close(log_fd)
    if on_final is not None:
        on_final(job_id)
    return code


def main(argv: list[str] | None = None) -> int:
    """``python -m rayserver.procwrap --db DB --job ID [--grace S] [--claim-queued]``."""
    parser = argparse.ArgumentParser(prog="python -m rayserver.procwrap",
                                     description="Run one rayserver job and record its result.")
    parser.add_argument("--db", required=True, type=Path, help="the job database file")
    parser.add_argument("--job", required=True, type=int, help="the job id")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds between SIGTERM and SIGKILL on cancel (default 5)")
    parser.add_argument("--claim-queued", action="store_true",
                        help="claim a queued job (Slurm/CLI), not only a starting one")
    parser.add_argument("--log-dir", type=Path, default=None)
    ns = parser.parse_args(argv)
    if not ns.db.is_file():
        print(f"procwrap: no job database at {ns.db}", file=sys.stderr)
        return EXIT_USAGE
    if ns.grace < 0:
        print(f"procwrap: --grace must be >= 0 seconds, got {ns.grace}", file=sys.stderr)
        return EXIT_USAGE
    # Our own session, like a fork-server child (fails harmlessly if we lead one).
    with contextlib.suppress(PermissionError):
        os.setsid()
    code = run_job(ns.db, ns.job, log_dir=ns.log_dir, grace=ns.grace,
                   claim_queued=ns.claim_queued)
    if code == EXIT_CLAIM_LOST:
        print(f"procwrap: job {ns.job} was not ours to run (already claimed, finished or "
              f"unknown)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
