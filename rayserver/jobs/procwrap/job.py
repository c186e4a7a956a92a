"""One job's run inside a procwrap: its steps, log, progress, limits and final record."""

from __future__ import annotations

import contextlib
import os
import resource
import select
import shlex
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rayserver.common.settings import Settings
from rayserver.common.states import JobState
from rayserver.jobs.jobdb import MAX_RESUMES, JobDB
from rayserver.jobs.procwrap import ambient, jobbox, limits, receipt, resume
from rayserver.jobs.procwrap import progress as prog
from rayserver.jobs.procwrap.confine import ConfinementError, open_confined
from rayserver.jobs.procwrap.exits import (
    EXIT_CANCELLED,
    EXIT_DONE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_RESUMED,
)
from rayserver.jobs.procwrap.outputs import OutputTracker
from rayserver.jobs.procwrap.procs import fmt_status
from rayserver.jobs.procwrap.rtcount import RtraceCount
from rayserver.jobs.procwrap.sandbox import SandboxError
from rayserver.jobs.procwrap.shprogress import ShProgress, new_marker
from rayserver.jobs.procwrap.streams import StepStreams, StreamError, is_stream
from rayserver.jobs.procwrap.watch import StepWatch
from rayserver.jobs.rows import JobRow, StepSpec

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
# The end of a step's messages is kept to tell why it failed: under RLIMIT_AS a
# program that hits max_job_memory only learns that malloc failed, and says so
# (Radiance: "rpict: system - out of memory in render: Cannot allocate memory").
STEP_TAIL_CHARS = 4096
OUT_OF_MEMORY = ("out of memory", "Cannot allocate memory")


class Job:
    """State of one job's run in a procwrap (one per job; a warm procwrap runs several in turn)."""

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
        self.max_rss_kb = 0  # the step groups' sampled RSS sum (watch)
        # This job's own children only (a warm procwrap runs jobs one after
        # another): cpu from the difference of RUSAGE_CHILDREN since now, peak
        # memory from each child's own rusage as it is reaped (wait4).
        self.usage_at_start = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.child_rss_kb = 0
        self.outputs = OutputTracker(".")  # the project's files the steps created or changed
        self.named: list[str] = []  # files the current step named (stdout, rad's outputs)
        self.resume_named: list[str] = []  # files a resumed step writes by name (rpict -ro)
        self.resuming = False  # the first step to run was interrupted in an earlier run
        self.resume_io: tuple[int, int] | None = None  # a grid's (stdin offset, stdout kept)
        self.step_env: dict[str, str] = {}  # the current step's environment
        self._neighbours: tuple[list[int], int] = ([], 0)  # jobs that may run beside the step
        self.job_dir: Path | None = None  # the job's folder (log, stream sockets); see run_job
        self.streams = StepStreams(None, Path("."), self.wake)  # the current step's
        self.warnings: list[str] = []
        self.receipt = receipt.Receipt()  # receipt.json, written when the job ends
        self.rad_plan: list[prog.RadCommand] = []
        self._last_progress = -1.0
        self._last_progress_at = 0.0
        self._pending_progress: float | None = None
        self.settings = Settings()
        self.logcap = limits.CappedLog(log_fd, 0)
        self.box: jobbox.JobBox | None = None
        self.box_error = ""
        self.limit_reason: str | None = None  # a limit ended the job (it is cancelled)
        self.step_tail = ""  # the last STEP_TAIL_CHARS of the log since the step began
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake_w = wake_w
        self.on_change: Callable[[int], None] | None = None  # tells the worker (see run_job)

    def load(
        self,
        row: JobRow,
        settings: Settings | None = None,
        home: Path | None = None,
        job_dir: Path | None = None,
    ) -> None:
        """Take the job's steps from its (claimed) row and build its box.

        ``home``: the installation (its settings were read as ``settings``);
        ``job_dir``: the job's own folder (its log, its private TMPDIR). A
        box that cannot be built is recorded in ``box_error``: :meth:`run`
        then fails the job without running anything.
        """
        self.row = row
        self.steps = row.steps
        self.workdir = row.workdir
        # The project folder when the row names it, else the steps' folder (the same but for
        # a rad rif in a subfolder).
        root = getattr(row, "project_dir", None) or row.workdir
        self.outputs = OutputTracker(root)
        self.settings = settings or Settings()
        self.logcap = limits.CappedLog(self.log_fd, self.settings.max_log_bytes, self.on_capped)
        job_dir = Path(job_dir) if job_dir else self.db.log_path(self.id).parent
        try:
            self.box = jobbox.build(row, self.settings, Path(home or job_dir), job_dir)
        except SandboxError as exc:
            self.box_error = str(exc)
            return
        self.env = self.box.env

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
        """Append to the job log (within max_log_bytes: see limits.CappedLog)."""
        self.logcap.write(text.encode("utf-8", "replace"))
        self.step_tail = (self.step_tail + text)[-STEP_TAIL_CHARS:]

    def event(self, name: str) -> None:
        """Record a sandbox or limit event of the job (GET /metrics counts them)."""
        with contextlib.suppress(Exception):  # a count must never fail the job
            self.db.add_event(self.id, name)

    def on_capped(self) -> None:
        self.event("log_capped")

    def over_limit(self, reason: str) -> None:
        """A limit was exceeded: end every process of the job; it is recorded cancelled."""
        if self.limit_reason is None:
            self.limit_reason = reason
            self.event("processes_limit")
            self.log(f"\nrayserver: {reason}; cancelling the job\n")
            if self.term_signal is None:
                self.term_signal = signal.SIGTERM
        limits.kill_descendants(os.getpid())

    def warn(self, text: str) -> None:
        """A warning on the job (its record's warnings) and in its log; the job goes on."""
        self.log(f"rayserver: warning: {text}\n")
        self.warnings.append(text)

    def progress(self, percent: float, *, force: bool = False) -> None:
        now = time.monotonic()
        if percent == self._last_progress:
            return
        if not force and now - self._last_progress_at < PROGRESS_INTERVAL:
            self._pending_progress = percent
            return
        self.db.update_progress(self.id, progress=percent)
        self.changed()
        self._last_progress = percent
        self._last_progress_at = now
        self._pending_progress = None

    def changed(self) -> None:
        """The row changed (and is committed): the worker's memory reads it again."""
        if self.on_change is not None:
            self.on_change(self.id)

    def flush_progress(self) -> None:
        if self._pending_progress is not None:
            self.progress(self._pending_progress)

    # --- the run ----------------------------------------------------------

    def run(self) -> int:
        started = time.monotonic()
        n = len(self.steps)
        self.log(f"== job {self.id}: {n} step(s) in {self.workdir}{self.box_note()} ==\n")
        if self.box_error:
            self.log(f"rayserver: refused: {self.box_error}\n")
            self.event("sandbox_denied")
            code, sig, failed_step = None, None, 1
            state, reason = JobState.FAILED, f"the job's sandbox cannot be set up: {self.box_error}"
        else:
            code, sig, failed_step, state, reason = self.run_steps()
        if self.term_signal is not None:
            state, reason = self.interrupted_state()
        wall = time.monotonic() - started
        cpu, rss = self.usage()
        self.logcap.finish()  # (the closing line below always goes in)
        if self.box is not None:
            self.box.close()
        self.log(
            f"== {state}: {fmt_status(code, sig)}"
            f"{f' in step {failed_step}/{n}' if failed_step else ''}, wall {wall:.2f} s, "
            f"cpu {cpu:.2f} s, max rss {rss} kB"
            f"{f' ({reason})' if reason and state != JobState.FAILED else ''} ==\n"
        )
        receipt.write_safely(self, state, reason)
        return self.record(
            state,
            reason,
            exit_status=code,
            signal=sig,
            wall_time=round(wall, 3),
            cpu_time=round(cpu, 3),
            max_rss_kb=rss,
            progress=100.0 if state == JobState.DONE else None,
            outputs=self.outputs.outputs(),
            warnings=self.warnings,
        )

    def record(self, state: JobState, reason: str | None, **final: Any) -> int:
        """The job's final record, once; the procwrap's exit code.

        A job that ends interrupted is queued again instead when the setting
        resume_interrupted allows (:meth:`JobDB.interrupt`): EXIT_RESUMED.
        """
        running = (JobState.RUNNING,)
        if state != JobState.INTERRUPTED:
            self.db.finish(self.id, state, reason=reason, from_states=running, **final)
            return _EXIT_CODES[state]
        resume = self.settings.resume_interrupted and self.row is not None and self.row.resumable
        got = self.db.interrupt(
            self.id, reason or "interrupted", resume=resume, from_states=running, **final
        )
        if got == JobState.QUEUED:
            self.log("rayserver: queued again, to resume where it stopped (resume_interrupted)\n")
            return EXIT_RESUMED
        return EXIT_INTERRUPTED

    def usage(self) -> tuple[float, int]:
        """(cpu seconds, peak RSS in kB) of this job's processes, none of an earlier job's."""
        now, then = resource.getrusage(resource.RUSAGE_CHILDREN), self.usage_at_start
        cpu = (now.ru_utime - then.ru_utime) + (now.ru_stime - then.ru_stime)
        return max(0.0, cpu), max(self.child_rss_kb, self.max_rss_kb)

    def close(self) -> None:
        """After the job: its signal wakeup pipe goes (the handlers were reset first)."""
        for fd in (self.wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def run_steps(self) -> tuple[int | None, int | None, int, JobState, str | None]:
        """The steps in order until one fails: (exit status, signal, failed step, state, reason)."""
        n = len(self.steps)
        code: int | None = 0
        sig: int | None = None
        first = self.resume_from()
        for idx, step in enumerate(self.steps):
            if self.term_signal is not None:
                break
            if idx < first:
                continue
            if idx == first and self.resuming:
                step = self.resumed(idx, step)
            where = f"step {idx + 1}/{n} ({step['program']})"
            self.scan_before(idx, step)
            self.step_tail = ""
            try:
                code, sig = self.run_step(idx, step)
            except (ConfinementError, SandboxError) as exc:
                self.log(f"rayserver: refused: {exc}\n")
                if isinstance(exc, SandboxError):
                    self.event("sandbox_denied")
                return None, None, idx + 1, JobState.FAILED, f"{where}: {exc}"
            except StreamError as exc:
                if self.term_signal is None:
                    return exc.code, exc.signal, idx + 1, JobState.FAILED, f"{where}: {exc}"
                code, sig = exc.code, exc.signal
            finally:
                self.scan_after()
            if self.term_signal is None and (code != 0 or sig is not None):
                why = f"{where} {fmt_status(code, sig)}{self.limit_hint(sig)}"
                return code, sig, idx + 1, JobState.FAILED, why
        return code, sig, 0, JobState.DONE, None

    def resume_from(self) -> int:
        """The index of the step a resumed job continues with (0: a job run afresh)."""
        row = self.row
        self.resuming = bool(row is not None and row.resumes and row.resume_step)
        if row is None or not self.resuming or not row.resume_step:
            return 0
        first = min(max(1, row.resume_step), len(self.steps)) - 1
        self.log(
            f"rayserver: resumed ({row.resumes} of at most {MAX_RESUMES}) after: "
            f"{(row.reason or '').removeprefix('resuming: ')}; "
            f"{_done_steps(first)}continuing with step {first + 1}\n"
        )
        return first

    def resumed(self, idx: int, step: StepSpec) -> StepSpec:
        """The interrupted step as it runs again: continuing its output where it can."""
        how = resume.plan(step, list(step["args"]), self.workdir, self.dry_run)
        self.log(f"rayserver: step {idx + 1}: {how.note}\n")
        if how.restart:
            self.event("resume_restart")
        self.resume_named = how.named
        self.resume_io = (how.offset, how.keep) if how.keep is not None else None
        if how.sh is not None:  # rad's recover, then rad: a shell step
            return {**step, "program": "sh", "path": "/bin/sh", "args": how.args, "sh": how.sh}
        return {**step, "args": how.args, "stdout": how.stdout}

    def dry_run(self, argv: list[str]) -> str | None:
        """``argv``'s standard output, run in the job's box (None when it failed)."""
        try:
            returncode, out = self.capture(argv, DRY_RUN_TIMEOUT)
        except (OSError, SandboxError, TimeoutError) as exc:
            self.log(f"rayserver: {argv[0]} failed: {exc}\n")
            return None
        return out.decode("utf-8", "replace") if returncode == 0 else None

    def box_note(self) -> str:
        if self.box is None:
            return ""
        mech = self.box.box.mechanism
        return f", sandbox {mech}" if mech != "none" else ', UNCONFINED (sandbox = "off")'

    def limit_hint(self, sig: int | None) -> str:
        """Why a step died, when a limit of ours did it (and the event, for /metrics)."""
        if sig == signal.SIGXFSZ:
            self.event("file_size_limit")
            return (
                f": it tried to write a file larger than max_output_bytes "
                f"({self.settings.max_output_bytes} bytes)"
            )
        if self.box is not None and limits.memory_events_oom(self.box.cgroup):
            self.event("memory_limit")
            return f": killed for memory (max_job_memory = {self.settings.max_job_memory} bytes)"
        if self.box is not None and not self.box.cgroup and self.settings.max_job_memory:
            if any(words in self.step_tail for words in OUT_OF_MEMORY):
                self.event("memory_limit")
                return (
                    f": it ran out of memory (max_job_memory = "
                    f"{self.settings.max_job_memory} bytes, RLIMIT_AS)"
                )
        return ""

    def interrupted_state(self) -> tuple[JobState, str]:
        if self.limit_reason is not None:
            return JobState.CANCELLED, self.limit_reason
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
        ambients = ambient.StepAmbients.before(self, self.workdir, program, args, self.rad_plan)
        stdin_fd, stdout_fd = self.open_redirects(step)
        # (A stream's pipe must not be read by a counter: it would take the step's bytes.)
        counter = (
            None if self.streams.relays else _rtrace_counter(program, args, stdin_fd, stdout_fd)
        )
        out_r, out_w = os.pipe()
        pid = self.start_step(step, args, (stdin_fd, stdout_fd, out_r, out_w), counter)
        if pid is None:
            ambients.release()
            return 127, None
        ambients.started(pid, program)
        # One write per step: which step runs, and the group to kill should we die.
        self.db.update_progress(
            self.id,
            current_step=idx + 1,
            pgid_children=pid,
            progress=prog.overall_percent(idx, n, 0.0),
        )
        self.changed()
        watch = StepWatch(self, pid, out_r, idx, program, tracker, counter)
        code = sig = None
        try:
            code, sig = watch.run()
        finally:
            ambients.release()
            os.close(out_r)
            if counter is not None:
                counter.close()
            self.sweep(idx)
            failure = self.streams.finish(lambda: self.term_signal is not None, self.log)
            self.receipt.step_ended(code, sig)
        self.add_outputs(watch.seen_outputs)
        if self.term_signal is None:
            ambients.check(step["path"], self.env)
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
        assert self.box is not None
        self.receipt.step_starting(self, step, args)  # its inputs hashed before it starts
        try:
            pid = self.box.box.spawn(
                [step["path"], *args],
                cwd=self.workdir,
                env=self.step_env,
                stdin_fd=stdin_fd,
                stdout_fd=stdout_fd if stdout_fd is not None else out_w,
                stderr_fd=out_w,
            )
        except (OSError, SandboxError) as exc:
            _close(out_r, out_w, stdin_fd, stdout_fd)
            if counter is not None:
                counter.close()
            self.streams.abort()
            if isinstance(exc, SandboxError) and not str(exc).startswith("exec "):
                raise  # the box failed: the job fails with the reason
            self.log(f"rayserver: cannot start {step['path']}: {exc}\n")
            self.receipt.step_ended(127, None)
            return None
        _close(out_w, stdin_fd, stdout_fd)
        self.streams.start()
        return pid

    def sweep(self, idx: int) -> None:
        """Nothing outlives a step: a process that left its group (setsid) is ended too."""
        left = limits.kill_descendants(os.getpid())
        if left:
            self.log(f"rayserver: ended {left} process(es) of step {idx + 1} left running\n")
        self.reap(0, None)

    def open_redirects(self, step: StepSpec) -> tuple[int | None, int | None]:
        """The step's stdin and stdout: files opened confined to the project, stream pipes, or None."""
        stdin_fd = stdout_fd = None
        resume_io, self.resume_io = self.resume_io, None
        try:
            if is_stream(step.get("stdin")):
                stdin_fd = self.streams.open_input()
            elif step.get("stdin"):
                stdin_fd = open_confined(self.workdir, step["stdin"], write=False)
            if is_stream(step.get("stdout")):
                stdout_fd = self.streams.open_output()
            elif step.get("stdout"):
                append = resume_io is not None
                stdout_fd = open_confined(self.workdir, step["stdout"], write=True, append=append)
            if resume_io is not None and stdin_fd is not None and stdout_fd is not None:
                # A resumed grid: the rays not answered yet, after the records it keeps.
                os.lseek(stdin_fd, resume_io[0], os.SEEK_SET)
                os.ftruncate(stdout_fd, resume_io[1])
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
        self.receipt.next_step = idx
        self.named = [step["stdout"]] if isinstance(step.get("stdout"), str) else []
        self.named += self.resume_named
        self.resume_named = []
        # The neighbours first, then the scan: a job that ends between the two
        # was one of them (its stdout is left to it); asked after the scan, a job
        # that ended in between was neither listed nor newer, and the rest of
        # its output, written after the scan, was taken for ours.
        self._neighbours = self.db.neighbours(self.id, self.workdir)
        self.outputs.before()
        if idx == 0 and self.outputs.untracked:
            self.log(f"rayserver: {self.outputs.untracked}\n")

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
        self.rad_plan = []
        try:
            returncode, out = self.capture([rad, *prog.rad_dry_run_args(args)], DRY_RUN_TIMEOUT)
        except (OSError, SandboxError, TimeoutError) as exc:
            self.log(f"rayserver: rad dry run failed ({exc}); progress by steps only\n")
            return args, None
        text = out.decode("utf-8", "replace")
        variables = self.receipt.rad_variables = prog.rad_variables(text)
        if not prog.has_report_variable(args, variables):
            args = [*args, RAD_REPORT]
        if returncode != 0:
            return args, None
        plan = prog.parse_rad_plan(text)
        self.rad_plan = plan
        renders = sum(1 for c in plan if c.is_render)
        self.log(f"rayserver: rad will run {len(plan)} command(s), {renders} render(s)\n")
        return args, prog.RadProgress(renders=renders) if renders else None

    def capture(self, argv: list[str], timeout: float) -> tuple[int, bytes]:
        """Run ``argv`` in the box, stdout captured (stderr dropped); (exit status, output)."""
        assert self.box is not None
        out_r, out_w = os.pipe()
        null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            pid = self.box.box.spawn(
                argv, cwd=self.workdir, env=self.env, stdin_fd=None, stdout_fd=out_w, stderr_fd=null
            )
        finally:
            _close(out_w, null)
        chunks, deadline = [], time.monotonic() + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                if select.select([out_r], [], [], left)[0]:
                    data = os.read(out_r, 65536)
                    if not data:
                        break
                    chunks.append(data)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                raise TimeoutError(f"no end after {timeout:g} s")
        finally:
            os.close(out_r)
            _, status, usage = os.wait4(pid, 0)
            self.child_rss_kb = max(self.child_rss_kb, int(usage.ru_maxrss))
        return os.waitstatus_to_exitcode(status), b"".join(chunks)

    def reap(self, leader: int, status: int | None) -> int | None:
        """Reap every exited child (orphans come to us as subreaper); the leader's status.

        Each child's own peak memory comes with it (wait4): the job's is the
        largest, whatever this procwrap ran before.
        """
        while True:
            try:
                pid, st, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return status
            if pid == 0:
                return status
            self.child_rss_kb = max(self.child_rss_kb, int(usage.ru_maxrss))
            if pid == leader:
                status = st


def _done_steps(first: int) -> str:
    """What a resumed job's log says of the steps it skips."""
    if first == 0:
        return ""
    return "step 1 was done; " if first == 1 else f"steps 1-{first} were done; "


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
