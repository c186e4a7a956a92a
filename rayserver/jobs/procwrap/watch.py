"""Watching one running step: its output to the log, progress, memory, cancel, reaping."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from rayserver.jobs.procwrap import limits
from rayserver.jobs.procwrap import progress as prog
from rayserver.jobs.procwrap.procs import group_gone, group_members

if TYPE_CHECKING:
    from rayserver.jobs.procwrap.rtcount import RtraceCount
    from rayserver.jobs.procwrap.shprogress import ShProgress
    from rayserver.jobs.procwrap.streams import StepStreams

SAMPLE_INTERVAL = 0.5  # RSS sampling of the step group
# The first /proc scan and rtrace line count wait this long: a step that ends
# sooner (a tiny rtrace) costs no scan (~0.7 ms of CPU each on a busy
# machine); its peak memory still comes from getrusage.
FIRST_SAMPLE = 0.05
RPICT_POKE_INTERVAL = 3.0  # SIGCONT asks rpict for one report (no -t needed)
LEFTOVER_AFTER = 1.0  # s after the leader's exit before the rest of its group is ended
PIPE_HELD_AFTER = 2.0  # s after the leader's exit before a pipe held elsewhere is let go
LONGEST_LINE = 1 << 16  # output without a line break is parsed (and logged) in pieces of this


class WatchedJob(Protocol):
    """What a step's watch uses of its job (rayserver.jobs.procwrap.job.Job)."""

    grace: float
    wake_r: int  # the signal wakeup pipe's read end
    term_signal: int | None
    max_rss_kb: int

    @property
    def steps(self) -> Sequence[object]: ...

    def log(self, text: str) -> None: ...

    def progress(self, percent: float, *, force: bool = False) -> None: ...

    def flush_progress(self) -> None: ...

    def reap(self, leader: int, status: int | None) -> int | None: ...

    @property
    def streams(self) -> StepStreams: ...


class StepWatch:
    """One step from its spawn to its reaped exit.

    ``pid`` leads the step's process group (pgid == pid); ``out_r`` is the
    read end of its stderr (and stdout, unless redirected to a file).
    """

    def __init__(
        self,
        job: WatchedJob,
        pid: int,
        out_r: int,
        idx: int,
        program: str,
        tracker: prog.RadProgress | ShProgress | None,
        counter: RtraceCount | None,
    ) -> None:
        self.job = job
        self.pid = self.pgid = pid
        self.out_r = out_r
        self.idx = idx
        self.n = len(job.steps)
        self.program = program
        self.tracker = tracker
        self.counter = counter
        self.seen_outputs: list[str] = []  # files rad said it writes
        self.status: int | None = None  # the leader's raw wait status
        self.eof = False
        self.partial = b""
        self.term_at: float | None = None
        self.killed = False
        self.leader_gone_at: float | None = None
        now = time.monotonic()
        self.next_sample = now + FIRST_SAMPLE
        self.next_poke = now + 1.0

    def run(self) -> tuple[int | None, int | None]:
        """Copy output to the log, parse progress, sample memory, handle cancel; reap.

        Returns (exit status, None) or (None, signal) of the leader.
        """
        sel = selectors.DefaultSelector()
        sel.register(self.out_r, selectors.EVENT_READ)
        sel.register(self.job.wake_r, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in sel.select(0.25):
                    if key.fd == self.job.wake_r:
                        _drain(self.job.wake_r)
                    else:
                        self.read_output(sel)
                self.status = self.job.reap(self.pid, self.status)
                now = time.monotonic()
                self.stop_if_asked(now)
                if self.status is None:
                    self.sample(now)
                self.job.flush_progress()
                if self.status is not None and self.finished(now):
                    break
        finally:
            sel.close()
        if self.partial:
            line = self.partial.decode("utf-8", "replace")
            if self.program == "sh" and self.tracker is not None:
                self.job.log(self.tracker.shown(line))  # (held back for its line break)
            self.parse_line(line)
        assert self.status is not None
        if os.WIFSIGNALED(self.status):
            return None, os.WTERMSIG(self.status)
        return os.WEXITSTATUS(self.status), None

    def read_output(self, sel: selectors.BaseSelector) -> None:
        """One read of the step's output: into the log, its whole lines to the parsers."""
        data = os.read(self.out_r, 65536)
        if not data:
            self.eof = True
            sel.unregister(self.out_r)
            return
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > LONGEST_LINE:  # (binary output, a progress bar with \r)
            lines.append(self.partial)
            self.partial = b""
        if self.program == "sh" and self.tracker is not None:
            # Whole lines only: the shell's trace lines are shown as "+ command".
            self.job.log(
                "".join(self.tracker.shown(r.decode("utf-8", "replace")) + "\n" for r in lines)
            )
        else:
            self.job.log(data.decode("utf-8", "replace"))
        for raw in lines:
            frac = self.parse_line(raw.decode("utf-8", "replace"))
            if frac is not None:
                self.job.progress(prog.overall_percent(self.idx, self.n, frac))

    def stop_if_asked(self, now: float) -> None:
        """SIGTERM the group once the procwrap was signalled, SIGKILL after the grace; a failed stream: SIGKILL."""
        term_signal = self.job.term_signal
        if term_signal is not None and self.term_at is None:
            self.term_at = now
            self.job.log(
                f"\nrayserver: {signal.Signals(term_signal).name} received; "
                f"stopping step {self.idx + 1} (process group {self.pgid})\n"
            )
            self.signal_group(signal.SIGTERM)
        failed = self.job.streams.new_failure()
        if failed is not None:
            # SIGKILL at once: with its input cut short, the step must never see an end of it.
            self.job.log(f"\nrayserver: {failed.failure}; killing step {self.idx + 1}\n")
            self.term_at = self.term_at or now
            self.killed = True
            self.signal_group(signal.SIGKILL)
        grace = self.job.grace
        if self.term_at is not None and not self.killed and now - self.term_at >= grace:
            self.killed = True
            self.job.log(f"rayserver: still running after {grace:g} s; SIGKILL\n")
            self.signal_group(signal.SIGKILL)

    def sample(self, now: float) -> None:
        """Memory and process count of the job, rtrace's line count, now and then; poke rpict.

        Every process below the procwrap counts (one that left the step's
        group too): more than max_job_processes cancels the job.
        """
        if now >= self.next_sample:
            self.next_sample = now + SAMPLE_INTERVAL
            members = limits.descendants(os.getpid())
            self.job.max_rss_kb = max(self.job.max_rss_kb, sum(kb for _, kb in members))
            most = self.job.settings.max_job_processes
            if most and len(members) > most:
                self.job.over_limit(
                    f"the job had {len(members)} processes alive, more than "
                    f"max_job_processes = {most}"
                )
            frac = self.counter.fraction() if self.counter is not None else None
            if frac is not None:
                self.job.progress(prog.overall_percent(self.idx, self.n, frac))
        if self.program in ("rpict", "sh") and now >= self.next_poke:
            # SIGCONT makes rpict print one progress report, without -t.
            self.next_poke = now + RPICT_POKE_INTERVAL
            for pid in [self.pid] if self.program == "rpict" else rpicts_of(self.pgid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGCONT)

    def finished(self, now: float) -> bool:
        """After the leader's exit: True once its group is gone and its output read."""
        if self.leader_gone_at is None:
            self.leader_gone_at = now
        gone = group_gone(self.pgid)
        if gone and self.eof:
            return True
        since = now - self.leader_gone_at
        if not gone and since > LEFTOVER_AFTER and self.term_at is None:
            # The step's leader is gone but part of its group lives on
            # (a background process): end it, nothing may outlive a step.
            self.job.log(
                f"rayserver: ending {len(group_members(self.pgid))} leftover "
                f"process(es) of step {self.idx + 1}\n"
            )
            self.term_at = now
            self.signal_group(signal.SIGTERM)
        # Someone outside the group holds the pipe; stop reading.
        return gone and not self.eof and since > PIPE_HELD_AFTER

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)

    def parse_line(self, line: str) -> float | None:
        """The step's fraction done from one line of its output, if it tells one."""
        if self.program == "rad":
            cmd = prog.parse_rad_command(line)
            if cmd is not None and cmd.output and cmd.output != "/dev/null":
                self.seen_outputs.append(cmd.output)
            return self.tracker.feed(line) if self.tracker is not None else None
        if self.program == "rpict":
            rep = prog.parse_rpict_report(line)
            if rep is not None:
                return rep.percent / 100.0
        if self.program == "sh" and self.tracker is not None:
            return self.tracker.feed(line)
        return None


def rpicts_of(pgid: int) -> list[int]:
    """The rpict processes of a step's group (a script's): each may be asked for a report."""
    found = []
    for pid, _ in group_members(pgid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/comm", "rb") as fh:
                if fh.read().strip() == b"rpict":
                    found.append(pid)
    return found


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass
