"""One job's run inside a procwrap: its steps, log, progress, limits and final record."""

from __future__ import annotations

import contextlib
import os
import resource
import shlex
import signal
import subprocess
import time
from pathlib import Path

from rayserver.common.states import JobState
from rayserver.jobs.jobdb import JobDB
from rayserver.jobs.procwrap import progress as prog
from rayserver.jobs.procwrap.confine import ConfinementError, open_confined
from rayserver.jobs.procwrap.exits import EXIT_CANCELLED, EXIT_DONE, EXIT_FAILED, EXIT_INTERRUPTED
from rayserver.jobs.procwrap.outputs import OutputTracker
from rayserver.jobs.procwrap.procs import base_env, fmt_status, spawn
from rayserver.jobs.procwrap.rtcount import RtraceCount
from rayserver.jobs.procwrap.shprogress import ShProgress, new_marker
from rayserver.jobs.procwrap.streams import StepStreams, StreamError, is_stream
from rayserver.jobs.procwrap.watch import StepWatch
from rayserver.jobs.rows import JobRow, StepSpec
from supervisor.util import reap_exited

# The procwrap's exit code for each final state it records itself.
_EXIT_CODES = {
    JobState.DONE: EXIT_DONE,
    JobState.FAILED: EXIT_FAILED,
    JobState.CANCELLED: EXIT_CANCELLED,
    JobState.INTERRUPTED: EXIT_INTERRUPTED,
}

PROGRESS_INTERVAL = 0.5  # at most ~2 progress writes per second
RAD_REPORT = "REPORT=0.05"  # minutes: rpict -t 3
DRY_RUN_TIMEOUT = 60.0
SCRIPT_READ_LIMIT = 1 << 20  # a script's first MB is read to know its commands (progress)


class Job:
    """State of one procwrap run (one instance per process)."""

    def __init__(self, db: JobDB, job_id: int, log_fd: int, grace: float) -> None:
        self.db = db
        self.id = job_id
        self.log_fd = log_fd
        self.grace = grace
        self.row: JobRow | None = None
        self.steps: list[StepSpec] = []
        self.env: dict[str, str] = {}
        self.workdir = ""
        self.term_signal: int | None = None
        self.max_rss_kb = 0
        self.outputs = OutputTracker(".")  # the project's files the steps created or changed
        self.named: list[str] = []  # files the current step named (stdout, rad's outputs)
        self.step_env: dict[str, str] = {}  # the current step's environment
        self._neighbours: tuple[list[int], int] = ([], 0)  # jobs that may run beside the step
        self.job_dir: Path | None = None  # the job's folder (log, stream sockets); see run_job
        self.streams = StepStreams(None, Path("."), self.wake)  # the current step's
        self._last_progress = -1.0
        self._last_progress_at = 0.0
        self._pending_progress: float | None = None
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake_w = wake_w

    def load(self, row: JobRow) -> None:
        """Take the job's steps and environment from its (claimed) row."""
        self.row = row
        self.steps = row.steps
        self.env = dict(base_env())
        self.env.update(row.env or {})
        self.workdir = row.workdir
        # The project folder when the row names it, else the steps' folder (the same but for
        # a rad rif in a subfolder).
        root = getattr(row, "project_dir", None) or row.workdir
        self.outputs = OutputTracker(root)

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
        self.log(f"== job {self.id}: {n} step(s) in {self.workdir} ==\n")
        code, sig, failed_step, state, reason = self.run_steps()
        if self.term_signal is not None:
            state, reason = self.interrupted_state()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.monotonic() - started
        cpu = usage.ru_utime + usage.ru_stime
        rss = max(int(usage.ru_maxrss), self.max_rss_kb)
        self.log(
            f"== {state}: {fmt_status(code, sig)}"
            f"{f' in step {failed_step}/{n}' if failed_step else ''}, wall {wall:.2f} s, "
            f"cpu {cpu:.2f} s, max rss {rss} kB"
            f"{f' ({reason})' if reason and state != JobState.FAILED else ''} ==\n"
        )
        self.db.finish(
            self.id,
            state,
            exit_status=code,
            signal=sig,
            reason=reason,
            wall_time=round(wall, 3),
            cpu_time=round(cpu, 3),
            max_rss_kb=rss,
            progress=100.0 if state == JobState.DONE else None,
            outputs=self.outputs.outputs(),
            from_states=(JobState.RUNNING,),
        )
        return _EXIT_CODES[state]

    def run_steps(self) -> tuple[int | None, int | None, int, JobState, str | None]:
        """The steps in order until one fails: (exit status, signal, failed step, state, reason)."""
        n = len(self.steps)
        code: int | None = 0
        sig: int | None = None
        for idx, step in enumerate(self.steps):
            if self.term_signal is not None:
                break
            where = f"step {idx + 1}/{n} ({step['program']})"
            self.scan_before(idx, step)
            try:
                code, sig = self.run_step(idx, step)
            except ConfinementError as exc:
                self.log(f"rayserver: refused: {exc}\n")
                return None, None, idx + 1, JobState.FAILED, f"{where}: {exc}"
            except StreamError as exc:
                if self.term_signal is None:
                    return exc.code, exc.signal, idx + 1, JobState.FAILED, f"{where}: {exc}"
                code, sig = exc.code, exc.signal
            finally:
                self.scan_after()
            if self.term_signal is None and (code != 0 or sig is not None):
                return code, sig, idx + 1, JobState.FAILED, f"{where} {fmt_status(code, sig)}"
        return code, sig, 0, JobState.DONE, None

    def interrupted_state(self) -> tuple[JobState, str]:
        row = self.db.get(self.id)
        request = row.cancel_request if row is not None else None
        name = signal.Signals(self.term_signal or signal.SIGTERM).name
        if request == "cancel":
            return JobState.CANCELLED, "cancelled by request"
        if request == "shutdown":
            return JobState.INTERRUPTED, "the server shut down while the job ran"
        return JobState.INTERRUPTED, f"the procwrap received {name} (no cancel was requested)"

    def run_step(self, idx: int, step: StepSpec) -> tuple[int | None, int | None]:
        """Run one step to its end; (exit status, None), (None, signal) or (127, None)."""
        n = len(self.steps)
        program = step["program"]
        args = list(step["args"])
        tracker: prog.RadProgress | ShProgress | None = None
        if not os.path.isdir(self.workdir):
            # Moved, deleted or unmounted since the submit: say so, rather than
            # "cannot start <program>" (the chdir's error) or a traceback.
            raise ConfinementError(
                f"the project directory {self.workdir} is missing "
                "(moved, deleted or its volume unmounted?)"
            )
        self.step_env = self.env
        if program == "rad":
            args, tracker = self.prepare_rad(step["path"], args)
        elif "sh" in step or "script" in step:
            args, tracker = self.prepare_sh(step, args)
        self.log(f"== step {idx + 1}/{n}: {_shown(program, args, step)} ==\n")
        self.streams = StepStreams(
            step, self.job_dir or self.db.log_path(self.id).parent, self.wake
        )
        stdin_fd, stdout_fd = self.open_redirects(step)
        # (A stream's pipe must not be read by a counter: it would take the step's bytes.)
        counter = (
            None if self.streams.relays else _rtrace_counter(program, args, stdin_fd, stdout_fd)
        )
        out_r, out_w = os.pipe()
        pid = self.start_step(step, args, (stdin_fd, stdout_fd, out_r, out_w), counter)
        if pid is None:
            return 127, None
        # One write per step: which step runs, and the group to kill should we die.
        self.db.update_progress(
            self.id,
            current_step=idx + 1,
            pgid_children=pid,
            progress=prog.overall_percent(idx, n, 0.0),
        )
        watch = StepWatch(self, pid, out_r, idx, program, tracker, counter)
        code = sig = None
        try:
            code, sig = watch.run()
        finally:
            os.close(out_r)
            if counter is not None:
                counter.close()
            failure = self.streams.finish(lambda: self.term_signal is not None, self.log)
        self.add_outputs(watch.seen_outputs)
        if failure:
            raise StreamError(failure, code, sig)
        return code, sig

    def start_step(
        self,
        step: StepSpec,
        args: list[str],
        fds: tuple[int | None, int | None, int, int],
        counter: RtraceCount | None,
    ) -> int | None:
        """Spawn the step (its group leader's pid) and its stream relays; None: it cannot start."""
        stdin_fd, stdout_fd, out_r, out_w = fds
        try:
            pid = spawn(
                [step["path"], *args],
                cwd=self.workdir,
                env=self.step_env,
                stdin_fd=stdin_fd,
                stdout_fd=stdout_fd if stdout_fd is not None else out_w,
                stderr_fd=out_w,
            )
        except OSError as exc:
            self.log(f"rayserver: cannot start {step['path']}: {exc.strerror or exc}\n")
            _close(out_r, out_w, stdin_fd, stdout_fd)
            if counter is not None:
                counter.close()
            self.streams.abort()
            return None
        _close(out_w, stdin_fd, stdout_fd)
        self.streams.start()
        return pid

    def open_redirects(self, step: StepSpec) -> tuple[int | None, int | None]:
        """The step's stdin and stdout: files opened confined to the project, stream pipes, or None."""
        stdin_fd = stdout_fd = None
        try:
            if is_stream(step.get("stdin")):
                stdin_fd = self.streams.open_input()
            elif step.get("stdin"):
                stdin_fd = open_confined(self.workdir, step["stdin"], write=False)
            if is_stream(step.get("stdout")):
                stdout_fd = self.streams.open_output()
            elif step.get("stdout"):
                stdout_fd = open_confined(self.workdir, step["stdout"], write=True)
        except BaseException:
            _close(stdin_fd, stdout_fd)
            self.streams.abort()
            raise
        return stdin_fd, stdout_fd

    def wake(self) -> None:
        """Wake the step's watch loop (from a relay thread)."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def scan_before(self, idx: int, step: StepSpec) -> None:
        """The project's files before a step (and which jobs may run beside it)."""
        self.named = [step["stdout"]] if isinstance(step.get("stdout"), str) else []
        self.outputs.before()
        if idx == 0 and self.outputs.untracked:
            self.log(f"rayserver: {self.outputs.untracked}\n")
        self._neighbours = self.db.neighbours(self.id, self.workdir)

    def scan_after(self) -> None:
        """The files the step created or changed; those other jobs name as their stdout are not ours."""
        ids, top = self._neighbours
        theirs = self._project_paths(
            [
                os.path.relpath(p, self.workdir)
                for p in self.db.neighbours_files(self.id, self.workdir, ids, top)
            ]
        )
        self.outputs.after(self._project_paths(self.named), exclude=set(theirs) - set(self.named))

    def add_outputs(self, seen_outputs: list[str]) -> None:
        """Files a step said it wrote (rad's echo lines): listed even when scans are off."""
        self.named += [rel for rel in seen_outputs if not rel.startswith("/")]

    def _project_paths(self, names: list[str]) -> list[str]:
        """Names relative to the steps' folder as paths relative to the project; inside only."""
        root = os.path.realpath(self.outputs.root)
        workdir = os.path.realpath(self.workdir)
        out = []
        for name in names:
            path = os.path.normpath(os.path.join(workdir, name))
            rel = os.path.relpath(path, root)
            if rel != ".." and not rel.startswith("../") and rel not in out:
                out.append(rel)
        return out

    def prepare_sh(self, step: StepSpec, args: list[str]) -> tuple[list[str], ShProgress]:
        """A shell step traced (sh -x, a PS4 of its own) so each command moves its progress."""
        marker = new_marker()
        self.step_env = {**self.env, "PS4": marker}
        text = step.get("sh")
        if text is None:
            try:
                fd = open_confined(self.workdir, str(step.get("script")), write=False)
            except ConfinementError:
                text = ""  # the shell will say what is wrong with it
            else:
                with os.fdopen(fd, "rb") as fh:
                    text = fh.read(SCRIPT_READ_LIMIT).decode("utf-8", "replace")
        return ["-x", *args], ShProgress(text, marker)

    def prepare_rad(self, rad: str, args: list[str]) -> tuple[list[str], prog.RadProgress | None]:
        """Dry-run rad to count its renders; add REPORT so rpict reports progress."""
        try:
            dry = subprocess.run(
                [rad, *prog.rad_dry_run_args(args)],
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=DRY_RUN_TIMEOUT,
                check=False,
                process_group=0,
            )
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

    def reap(self, leader: int, status: int | None) -> int | None:
        """Reap every exited child (orphans come to us as subreaper); the leader's status."""
        for pid, st in reap_exited():
            if pid == leader:
                status = st
        return status


def _shown(program: str, args: list[str], step: StepSpec) -> str:
    """The step's command line as the log shows it, redirections included."""
    if "sh" in step:
        shown = f"sh -c {shlex.quote(step['sh'])}"
    elif "script" in step:
        shown = " ".join(["sh", *map(shlex.quote, args[1:])])  # (args[0] is -x)
    else:
        shown = " ".join([program, *args])
    for key, sign in (("stdin", "<"), ("stdout", ">")):
        redirect = step.get(key)
        if is_stream(redirect):
            shown += f" {sign} (streamed {'from' if key == 'stdin' else 'to'} the client)"
        elif redirect:
            shown += f" {sign} {redirect}"
    return shown


def _rtrace_counter(
    program: str, args: list[str], stdin_fd: int | None, stdout_fd: int | None
) -> RtraceCount | None:
    """A line counter of an rtrace's input and output files (text output only), or None."""
    if (
        program != "rtrace"
        or stdin_fd is None
        or stdout_fd is None
        or any(a.startswith("-f") and a not in ("-fa", "-faa") for a in args)
    ):
        return None
    in_fd: int | None = None
    counter: RtraceCount | None = None
    with contextlib.suppress(OSError):
        in_fd = os.open(f"/proc/self/fd/{stdin_fd}", os.O_RDONLY | os.O_CLOEXEC)
        count_fd = os.open(f"/proc/self/fd/{stdout_fd}", os.O_RDONLY | os.O_CLOEXEC)
        counter = RtraceCount(in_fd, count_fd, header="-h-" not in args and "-h" not in args)
    if counter is None and in_fd is not None:
        os.close(in_fd)
    return counter


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)
