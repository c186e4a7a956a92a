"""Running one simulation split across several rayservers: ``rayfront run --hosts``.

The client is the coordinator. It checks that every server answers and sees
the project directory as the client does (and, for pictures or a shared
ambient file, that a file lock one server takes is seen by the others),
writes the part inputs into a ``.rayfront-split/<run>`` folder of the project,
and hands parts to servers as they have free cpus. It follows all parts with
one progress bar.

A host that stops answering for ``lost_after`` seconds, or whose part ends
``interrupted``, is given up: its parts are re-run on the hosts left. Every
attempt writes its own output file, so a lost host that is in fact still
running cannot overwrite the attempt that replaced it. A part whose program
fails (a non-zero exit status) fails the whole run at once: Radiance fails the
same way on every host. A part cancelled by someone else, Ctrl-C or SIGTERM
cancel every part. When all parts are done the outputs are merged into the
project directory (see :mod:`rayserver.client.splitplan`).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rayserver.client import splitmatrix, splitplan, splitrad
from rayserver.client.connection import EXIT_ERROR, Client, ClientError
from rayserver.client.context import Context, Project
from rayserver.client.follow import job_exit_code
from rayserver.client.jobrequest import build_job, project_file
from rayserver.client.splitmatrix import ContribSpec, HeaderFix
from rayserver.client.splitplan import Part, PictureView
from rayserver.common.hosts import HostRecord
from rayserver.common.states import FINAL_STATES, JobState

POLL_SECONDS = 0.25
DEFAULT_LOST_AFTER = 15.0
SPLIT_DIR = ".rayfront-split"


class SplitCancelled(Exception):
    """Ctrl-C, SIGTERM or a part cancelled by someone else: every part was cancelled."""


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C or SIGTERM during the block is acted on (KeyboardInterrupt) when it ends.

    For a submit: interrupted mid-request, the server may have queued the part
    while we never learnt its id, so no cancel could reach it and it ran after the
    run had removed its part files. Only the main thread handles signals.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def record(signum: int, frame: object) -> None:
        pending.append(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) not in (signal.SIG_IGN, None):
            previous[sig] = signal.signal(sig, record)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pending:
        raise KeyboardInterrupt


@dataclass
class Host:
    record: HostRecord
    client: Client
    slots: int
    depth: int = 0  # parts handed over beyond slots, queued on the server
    running: int = 0
    lost: str = ""  # why it was given up, "" while in use
    unreachable_since: float | None = None
    busy_until: float = 0.0
    batch: bool = True  # POST /v1/jobs/batch answered (an older server: 404, one by one)

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def free(self) -> bool:
        return (
            not self.lost
            and self.running < self.slots + self.depth
            and time.monotonic() >= self.busy_until
        )


@dataclass
class Attempt:
    part: Part
    host: Host
    number: int
    output: str  # project-relative
    args: tuple[str, ...] = ()  # as submitted (rcontrib -o patterns point into folder)
    folder: str | None = None  # project-relative, for the -o files of this attempt
    job_id: int | None = None
    state: str = "submitting"
    progress: float = 0.0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None


@dataclass
class SplitResult:
    exit_code: int
    summary: dict[str, Any]


class SplitRun:
    """One ``rayfront run --hosts`` invocation."""

    def __init__(
        self,
        ctx: Context,
        project: Project,
        command: list[str],
        *,
        hosts: list[HostRecord],
        explicit_hosts: bool,
        stdin: str | None,
        stdout: str | None,
        parts: int | None = None,
        name: str | None = None,
        priority: int = 0,
        json_mode: bool = False,
        quiet: bool = False,
        lost_after: float = DEFAULT_LOST_AFTER,
        silent: bool = False,
    ) -> None:
        self.ctx = ctx
        self.silent = silent  # no bar, no messages (a shim: the program's output is all)
        self.project = project
        self.program, self.args = command[0], list(command[1:])
        self.explicit_hosts = explicit_hosts
        self.records = hosts
        self.stdin, self.stdout = stdin, stdout
        self.requested_parts = parts
        self.name = name or " ".join(command)
        self.priority = priority
        self.json_mode = json_mode
        self.quiet = quiet
        self.lost_after = lost_after
        self.hosts: list[Host] = []
        self.attempts: list[Attempt] = []
        self.done: dict[int, Attempt] = {}
        self.events: list[str] = []
        self.run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        self.split_dir = f"{SPLIT_DIR}/{self.run_id}"
        self.bar: Any = None
        self.view: PictureView | None = None
        self.output: str | None = None
        self.contrib: ContribSpec | None = None
        self.receiver: splitmatrix.Receiver | None = None  # rfluxmtx's, when it names outputs
        self.matrix_rows = 0  # rows of the whole matrix (rcontrib, rfluxmtx)
        self.merged_files: list[str] = []
        self.rad: splitrad.RadPlan | None = None
        self.prelude_attempts: list[Attempt] = []
        self._input: bytes | None = None
        self.env = _radiance_env(ctx)

    # ------------------------------------------------------------ messages
    def say(self, message: str) -> None:
        self.events.append(message)
        if self.json_mode or self.silent:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    # ------------------------------------------------------------ planning
    def plan(self) -> list[Part]:
        program = self.program
        if program not in splitplan.SPLIT_PROGRAMS:
            raise splitplan.usage_error(
                f"--hosts splits {', '.join(splitplan.SPLIT_PROGRAMS)}; {program} runs on one "
                "host: leave --hosts out (or use --host NAME)"
            )
        slots = sum(h.slots for h in self.hosts)
        if program in splitplan.GRID_PROGRAMS:
            return self._plan_grid(slots)
        if program == "rad":
            return self._plan_rad()
        return self._plan_picture(slots)

    def _plan_grid(self, slots: int) -> list[Part]:
        program = self.program
        if not self.stdin:
            raise splitplan.usage_error(
                f"a split {program} needs its rays: give --stdin FILE (the points of the "
                "sensor grid) or send them on standard input (< grid.pts)"
            )
        if program in splitmatrix.CONTRIB_PROGRAMS:
            self.contrib = splitmatrix.parse_contrib(program, self.args)
            self.receiver = splitmatrix.read_receiver(
                self.contrib, self.args, self.project.local_dir
            )
            splitmatrix.check_outputs(self.contrib, self.args, self.project.local_dir)
        if self.json_mode and not self.stdout and self._writes_stdout():
            raise splitplan.usage_error(
                "--json prints the summary on standard output: give --stdout FILE for the "
                "merged results"
            )
        self.output = self.stdout
        data = self._read_input()
        if self.contrib is None:
            return splitplan.plan_grid(
                program, self.args, data, self.requested_parts or slots, self.stdin
            )
        plan, self.matrix_rows, note = splitmatrix.plan_contrib(
            self.contrib, self.args, data, self.requested_parts or slots, self.stdin
        )
        if note:
            self.say(f"rayfront: {note}")
        return plan

    def _plan_rad(self) -> list[Part]:
        if self.stdin or self.stdout:
            raise splitplan.usage_error(
                "--stdin/--stdout do not apply to rad (it names its own files)"
            )
        if self.requested_parts:
            raise splitplan.usage_error("rad is split into one part per view; leave --parts out")
        self.rad = splitrad.plan_rad(self.args, self.project.local_dir, self.env)
        return self.rad.views

    def _plan_picture(self, slots: int) -> list[Part]:
        if self.stdin:
            raise splitplan.usage_error("rpict takes no --stdin in a split run")
        options, octree, output = splitplan.split_rpict_args(self.args)
        if output and self.stdout:
            raise splitplan.usage_error(
                f"give the picture file once: --stdout {self.stdout} or rpict -o {output}, not both"
            )
        self.output = self.stdout or output
        if not self.output:
            raise splitplan.usage_error(
                "a split picture needs an output file: give --stdout FILE (or rpict -o FILE)"
            )
        if output:
            self.output = project_file(self.project, output, "rpict -o")
        self.view = splitplan.resolve_picture(options, self.project.local_dir, self.env)
        # Four bands per cpu: a band of sky renders much faster than one of
        # lamps or furniture (measured: one band of six took half the time), and
        # handing out bands as cpus come free evens that out.
        return splitplan.plan_picture(options, octree, self.view, self.requested_parts or 4 * slots)

    def _writes_stdout(self) -> bool:
        return self.contrib is None or splitmatrix.writes_stdout(self.contrib, self.args)

    def shared_ambient(self) -> str | None:
        """An ambient file for all parts, when they compute cached indirect light without one.

        Without it every part rebuilds the ambient cache from nothing, which for
        a sensor grid costs most of the run (measured: 2 parts took 1.8x the
        cpu of one). With it Radiance shares the values through the file, under
        the fcntl locks the share check has proven to work.
        """
        if self.program in splitmatrix.CONTRIB_PROGRAMS or "-af" in self.args:
            return None
        bounces = splitplan.option_value(self.args, "-ab")
        if bounces is None or not bounces.isdigit() or int(bounces) == 0:
            return None
        accuracy = splitplan.option_value(self.args, "-aa")
        try:
            cached = float(accuracy) > 0 if accuracy is not None else True
        except ValueError:
            return None
        return f"{self.split_dir}/ambient.amb" if cached else None

    def _read_input(self) -> bytes:
        """The rays: the --stdin file, or rayfront's own standard input (``-``), read once."""
        assert self.stdin is not None
        if self._input is not None:
            return self._input
        if self.stdin == "-":
            self._input = sys.stdin.buffer.read()
            if not self._input:
                raise splitplan.usage_error(
                    f"a split {self.program} got no rays: standard input is empty; give the "
                    "sensor points with --stdin FILE or on standard input (< grid.pts)"
                )
            return self._input
        path = self.project.local_dir / self.stdin
        try:
            self._input = path.read_bytes()
        except OSError as exc:
            raise splitplan.usage_error(
                f"--stdin {self.stdin}: cannot read {path}: {exc.strerror or exc}"
            ) from exc
        return self._input

    # ------------------------------------------------------------ hosts and share
    def connect(self) -> None:
        token = self.ctx.token()
        candidates = [
            Host(rec, Client(self.ctx.target_for(rec), token, timeout=10.0), rec.cpus)
            for rec in self.records
        ]

        def probe(host: Host) -> str:
            try:
                host.client.info(timeout=3.0)
                return ""
            except ClientError as exc:
                return str(exc)

        with ThreadPoolExecutor(max_workers=min(16, len(candidates))) as pool:
            problems = list(pool.map(probe, candidates))
        for host, problem in zip(candidates, problems, strict=True):
            if not problem:
                self.hosts.append(host)
            elif self.explicit_hosts:
                raise ClientError(
                    f"host {host.name} named in --hosts is not answering: "
                    f"{problem}; leave it out or use --hosts all"
                )
            else:
                self.say(f"rayfront: leaving out {host.name}: {problem}")
        if not self.hosts:
            raise ClientError("no rayserver of the hosts file is answering; nothing to run on")

    def check_share(self, need_locks: bool) -> None:
        """Every server sees our probe file; with ``need_locks``, each one's lock is seen by the rest."""
        name = f".rayfront-probe-{secrets.token_hex(16)}"
        nonce = secrets.token_hex(16)
        path = self.project.local_dir / name
        try:
            with open(path, "x") as fh:
                fh.write(nonce + "\n")
            path.chmod(0o664)
        except OSError as exc:
            raise ClientError(
                f"cannot write {path} to check the share: {exc.strerror or exc}"
            ) from exc
        base = {
            "location": self.project.location,
            "project": self.project.path,
            "file": name,
            "nonce": nonce,
        }
        try:

            def read(host: Host) -> str:
                answer = host.client.share_probe({**base, "op": "read"})
                return (
                    ""
                    if answer.get("seen")
                    else (f"{host.name} sees {answer.get('path', '?')}: {answer.get('detail', '')}")
                )

            with ThreadPoolExecutor(max_workers=min(16, len(self.hosts))) as pool:
                unseen = [p for p in pool.map(read, self.hosts) if p]
            if unseen:
                raise ClientError(
                    f"not every server sees this project directory ({self.project.local_dir}) "
                    "as this client does: "
                    + "; ".join(unseen)
                    + ". Check the location paths of those hosts in the hosts file."
                )
            if need_locks and len(self.hosts) > 1:
                for holder in self.hosts:
                    self._check_locks(holder, base)
        finally:
            path.unlink(missing_ok=True)

    def _check_locks(self, holder: Host, base: dict[str, str]) -> None:
        held = holder.client.share_probe({**base, "op": "hold", "hold_seconds": 30})
        if not held.get("held"):
            raise ClientError(
                f"{holder.name} cannot lock a file in the project directory: "
                f"{held.get('detail', 'no reason given')}; refusing to split"
            )
        try:
            for other in self.hosts:
                if other is holder:
                    continue
                seen = other.client.share_probe({**base, "op": "test"})
                if not seen.get("locked"):
                    raise ClientError(
                        f"the share does not lock files between {holder.name} and {other.name}: "
                        f"a lock {holder.name} holds on {base['file']} in the project directory "
                        f"was not seen by {other.name} ({seen.get('detail') or 'no lock seen'}). "
                        "Radiance's shared ambient file and a split picture rely on such locks "
                        "(NFS needs its lock manager running); refusing to split. Run on one host "
                        "instead (--host NAME)."
                    )
        finally:
            with contextlib.suppress(ClientError):
                holder.client.share_probe({**base, "op": "release", "hold_id": held["hold_id"]})

    # ------------------------------------------------------------ parts
    def _write_inputs(self, parts: list[Part]) -> None:
        folder = self.project.local_dir / self.split_dir
        folder.mkdir(parents=True, exist_ok=True)
        # Servers may run as another user of the project's group: let them write here.
        with contextlib.suppress(OSError):
            folder.chmod(0o2775)
            folder.parent.chmod(0o2775)
        if self.program not in splitplan.GRID_PROGRAMS:
            return
        data = self._read_input()
        for part in parts:
            assert part.input_range is not None
            path = folder / f"in-{part.index + 1}"
            path.write_bytes(data[part.input_range[0] : part.input_range[1]])
            path.chmod(0o664)

    def _job_request(self, attempt: Attempt) -> dict[str, Any]:
        part = attempt.part
        if self.rad is not None:
            return build_job(
                self.project, ["rad", *part.args], f"{self.name[:150]} [{part.name}]", self.priority
            )
        stdin = (
            f"{self.split_dir}/in-{part.index + 1}"
            if self.program in splitplan.GRID_PROGRAMS
            else None
        )
        return {
            "location": self.project.location,
            "project": self.project.path,
            "priority": self.priority,
            "name": f"{self.name[:150]} [{part.name}]",
            "steps": [
                {
                    "program": self.program,
                    "args": list(attempt.args or part.args),
                    "stdin": stdin,
                    "stdout": attempt.output,
                }
            ],
        }

    def _pick_host(self, part: Part, tried: set[str]) -> Host | None:
        free = [h for h in self.hosts if h.free]
        fresh = [h for h in free if h.name not in tried]
        pool = fresh or free
        if not pool:
            return None
        return min(pool, key=lambda h: h.running / h.slots)

    def _attempt(self, part: Part, host: Host) -> Attempt:
        """A new attempt of ``part`` on ``host``: its own output file (and -o folder)."""
        number = 1 + sum(1 for a in self.attempts if a.part.index == part.index)
        suffix = ".hdr" if self.view is not None else ""
        attempt = Attempt(
            part, host, number, f"{self.split_dir}/out-{part.index + 1}-{number}{suffix}"
        )
        if self.contrib is not None and (self.contrib.o_at or self.receiver):
            self._output_folder(attempt)
        return attempt

    def _submit_round(self, queue: deque[Part], tried: dict[int, set[str]]) -> None:
        """Hand the queued parts to hosts with free cpus: one batch request per host."""
        planned: dict[str, tuple[Host, list[Attempt]]] = {}
        for _ in range(len(queue)):
            part = queue.popleft()
            host = self._pick_host(part, tried[part.index])
            if host is None:
                queue.append(part)
                continue
            host.running += 1  # counted now, so the next part weighs this one in
            planned.setdefault(host.name, (host, []))[1].append(self._attempt(part, host))
        for host, attempts in planned.values():
            host.running -= len(attempts)
            with signals_deferred():
                left = self._submit_many(host, attempts)
            for attempt in attempts:
                if attempt in left:
                    queue.append(attempt.part)
                else:
                    tried[attempt.part.index].add(host.name)

    def _submit_many(self, host: Host, attempts: list[Attempt]) -> list[Attempt]:
        """Submit ``attempts`` to ``host``; the attempts not queued there (to hand out again).

        One ``POST /v1/jobs/batch`` (all or none); a server without it (404:
        older than the batch endpoint) gets one ``POST /v1/jobs`` per part.
        """
        if len(attempts) > 1 and host.batch:
            try:
                jobs = host.client.submit_batch([self._job_request(a) for a in attempts])
            except ClientError as exc:
                if exc.status != 404:
                    return self._refused(host, attempts, exc)
                host.batch = False  # then the single requests say what a new server refused
            else:
                for attempt, job in zip(attempts, jobs, strict=True):
                    self._queued(attempt, job)
                return []
        for index, attempt in enumerate(attempts):
            try:
                job = host.client.submit(self._job_request(attempt))
            except ClientError as exc:
                return self._refused(host, attempts[index:], exc)
            self._queued(attempt, job)
        return []

    def _refused(self, host: Host, attempts: list[Attempt], exc: ClientError) -> list[Attempt]:
        """A submit to ``host`` failed: busy (try later), refused (fatal) or lost (elsewhere)."""
        if exc.status in (429, 503):
            host.busy_until = time.monotonic() + 2.0
            return attempts
        if exc.status is not None and exc.status < 500:
            names = ", ".join(a.part.name for a in attempts)
            raise ClientError(f"{host.name} refused {names}: {exc}") from exc
        self._lose(host, f"submitting failed: {exc}")
        return attempts

    def _queued(self, attempt: Attempt, job: dict[str, Any]) -> None:
        attempt.job_id = int(job["id"])
        attempt.state = str(job.get("state", JobState.QUEUED))
        attempt.host.running += 1
        self.attempts.append(attempt)

    def _output_folder(self, attempt: Attempt) -> None:
        """The attempt's own folder for the -o (and receiver o=) files; its arguments point there."""
        assert self.contrib is not None
        part, local = attempt.part, self.project.local_dir
        attempt.folder = f"{self.split_dir}/o-{part.index + 1}-{attempt.number}"
        args = splitmatrix.attempt_args(self.contrib, part.args, attempt.folder)
        splitmatrix.make_output_folders(
            self.contrib, part.args, local / attempt.folder, self.receiver
        )
        if self.receiver is not None:
            copy = (
                f"{self.split_dir}/recv-{part.index + 1}-{attempt.number}-"
                + Path(self.receiver.name).name
            )
            (local / copy).write_text(self.receiver.copy_for(attempt.folder))
            args[self.receiver.index] = copy
        attempt.args = tuple(args)

    def _lose(self, host: Host, why: str) -> None:
        if host.lost:
            return
        host.lost = why
        lost = [a for a in self.active() if a.host is host]
        names = ", ".join(a.part.name for a in lost) or "no part"
        left = [h.name for h in self.hosts if not h.lost]
        self.say(
            f"rayfront: giving up {host.name} ({why}); re-running {names}"
            + (f" on {', '.join(left)}" if left and lost else "")
        )
        for a in lost:
            a.state = "lost"
            a.ended = time.monotonic()
        host.running = 0

    def active(self) -> list[Attempt]:
        return [
            a
            for a in self.attempts
            if a.state not in FINAL_STATES and a.state not in ("lost", "superseded")
        ]

    def _poll(self, attempt: Attempt) -> tuple[Attempt, dict[str, Any] | ClientError]:
        assert attempt.job_id is not None
        try:
            return attempt, attempt.host.client.job(attempt.job_id)
        except ClientError as exc:
            return attempt, exc

    def _log_tail(self, attempt: Attempt, lines: int = 8) -> str:
        try:
            text = attempt.host.client.log(int(attempt.job_id or 0)).decode("utf-8", "replace")
        except ClientError:
            return ""
        tail = [line for line in text.splitlines() if line.strip()][-lines:]
        return "\n".join("    " + line for line in tail)

    def dispatch(self, parts: list[Part]) -> None:
        queue: deque[Part] = deque(parts)
        tried: dict[int, set[str]] = {p.index: set() for p in parts}
        if len(parts) > sum(h.slots for h in self.hosts):
            # One part waiting in each server's own queue: its scheduler starts it
            # the moment a cpu comes free, instead of at our next poll.
            for host in self.hosts:
                host.depth = 1
        pool = ThreadPoolExecutor(max_workers=16)
        try:
            while len(self.done) < len(parts):
                self._submit_round(queue, tried)
                live = [h for h in self.hosts if not h.lost]
                if not live:
                    missing = sorted(
                        {p.index for p in queue} | {a.part.index for a in self.active()}
                    )
                    raise ClientError(
                        "the result is incomplete: "
                        + ", ".join(parts[i].name for i in missing)
                        + (" are" if len(missing) > 1 else " is")
                        + " missing; every host was "
                        "given up (" + "; ".join(f"{h.name}: {h.lost}" for h in self.hosts) + ")"
                    )
                self._show()
                time.sleep(POLL_SECONDS)
                for attempt, answer in pool.map(self._poll, self.active()):
                    requeue = self._update(attempt, answer)
                    if requeue:
                        queue.append(attempt.part)
                self._check_hosts(queue)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _check_hosts(self, queue: deque[Part]) -> None:
        """Parts of hosts given up go back in the queue."""
        queued = {p.index for p in queue}
        running = {a.part.index for a in self.active()}
        for attempt in self.attempts:
            index = attempt.part.index
            if (
                attempt.state == "lost"
                and index not in self.done
                and index not in queued
                and index not in running
            ):
                queue.append(attempt.part)
                queued.add(index)

    def _update(self, attempt: Attempt, answer: dict[str, Any] | ClientError) -> bool:
        """Apply one poll answer; True when the part must be run again elsewhere."""
        host = attempt.host
        now = time.monotonic()
        if isinstance(answer, ClientError):
            self._unanswered(attempt, answer, now)
            return False
        host.unreachable_since = None
        attempt.state = str(answer.get("state"))
        progress = answer.get("progress")
        if isinstance(progress, int | float):
            attempt.progress = float(progress)
        if attempt.state not in FINAL_STATES:
            return False
        attempt.ended = now
        host.running = max(0, host.running - 1)
        return self._ended(attempt, answer)

    def _ended(self, attempt: Attempt, answer: dict[str, Any]) -> bool:
        """A part's job reached a final state; True when it must be run again elsewhere."""
        host, part = attempt.host, attempt.part
        if attempt.state == JobState.DONE:
            output = self._expected_output(attempt)
            if output is not None and not output.exists():
                self._lose(
                    host,
                    f"{part.name} finished but {output} is not there "
                    "(does it write to the same share?)",
                )
                return True
            self.done[part.index] = attempt
            return False
        if attempt.state == JobState.CANCELLED:
            self.say(f"rayfront: {part.name} was cancelled on {host.name} (job {attempt.job_id})")
            raise SplitCancelled(f"{part.name} was cancelled on {host.name}")
        status = answer.get("exit_status")
        if attempt.state == JobState.FAILED and isinstance(status, int) and status != 0:
            tail = self._log_tail(attempt)
            raise _PartFailed(
                f"{part.name} failed on {host.name} (job {attempt.job_id}): exit status {status}"
                + (f" ({answer['reason']})" if answer.get("reason") else "")
                + (f"\n{tail}" if tail else ""),
                job_exit_code(answer),
            )
        # Interrupted, or ended by a signal nobody here sent: the host's fault, not the part's.
        reason = answer.get("reason") or (
            f"signal {answer['signal']}" if answer.get("signal") else attempt.state
        )
        self.say(
            f"rayfront: {part.name} ended {attempt.state} on {host.name} ({reason}); "
            "running it again"
        )
        if sum(1 for a in self.attempts if a.part.index == part.index) >= 2 * len(self.hosts):
            raise _PartFailed(
                f"{part.name} ended {attempt.state} on every try; giving up", EXIT_ERROR
            )
        return True

    def _unanswered(self, attempt: Attempt, error: ClientError, now: float) -> None:
        """A poll that got no job: the host is given up at once (404) or after lost_after."""
        host = attempt.host
        if error.status == 404:
            self._lose(host, f"it no longer knows job {attempt.job_id}")
            return
        # Not answering, or refusing (a token changed, a full disk): the
        # same patience for both, then the host is given up.
        if host.unreachable_since is None:
            host.unreachable_since = now
        elif now - host.unreachable_since >= self.lost_after:
            self._lose(host, f"no answer for {now - host.unreachable_since:.0f} s: {error}")

    def _expected_output(self, attempt: Attempt) -> Path | None:
        """The file a part that ended done must have left in the project."""
        if self.rad is None:
            return self.project.local_dir / attempt.output
        if attempt.part in self.rad.views:
            if self.rad.touch_only:
                return None
            return self.project.local_dir / self.rad.pictures[attempt.part.index]
        return self.project.local_dir / self.rad.octree

    def cancel_all(self, why: str) -> list[str]:
        """Cancel every attempt not yet final (lost hosts too, in case they come back)."""
        targets = [
            a for a in self.attempts if a.job_id is not None and (a.state not in FINAL_STATES)
        ]

        def cancel(attempt: Attempt) -> str:
            try:
                attempt.host.client.cancel(int(attempt.job_id or 0))
                attempt.state = JobState.CANCELLED
                return f"{attempt.host.name} job {attempt.job_id}"
            except ClientError as exc:
                if exc.status == 409:  # it ended by itself meanwhile: nothing to stop
                    return ""
                return f"{attempt.host.name} job {attempt.job_id} (not reached: {exc})"

        if not targets:
            return []
        with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
            done = [d for d in pool.map(cancel, targets) if d]
        if done:
            self.say(f"rayfront: {why}; cancelled {len(done)} part job(s): {', '.join(done)}")
        return done

    # ------------------------------------------------------------ progress
    def _start_bar(self, parts: list[Part]) -> None:
        if self.json_mode or self.silent:
            return
        from tqdm import tqdm

        self.bar = tqdm(
            total=100,
            unit="%",
            file=sys.stderr,
            dynamic_ncols=True,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}",
        )
        self._parts = parts

    def _show(self) -> None:
        if self.bar is None:
            return
        total = 0.0
        for part in self._parts:
            if part.index in self.done:
                total += part.weight * 100
            else:
                live = [a.progress for a in self.active() if a.part.index == part.index]
                total += part.weight * (max(live) if live else 0.0)
        self.bar.n = min(100.0, total)
        running = len(self.active())
        hosts = sum(1 for h in self.hosts if not h.lost)
        self.bar.set_description_str(
            f"{len(self.done)}/{len(self._parts)} parts done, {running} running on "
            f"{hosts} host{'s' if hosts != 1 else ''}",
            refresh=False,
        )
        self.bar.refresh()

    # ------------------------------------------------------------ the whole run
    def run(self) -> SplitResult:
        started = time.monotonic()
        self.connect()
        parts = self.plan()
        ambient = self.shared_ambient()
        if ambient:
            parts = [replace(p, args=(*p.args[:-1], "-af", ambient, p.args[-1])) for p in parts]
        need_locks = (
            self.view is not None
            or "-af" in self.args
            or ambient is not None
            or (self.rad is not None and self.rad.ambient)
        )
        self.check_share(need_locks)
        self._announce(parts, need_locks, ambient)
        self._write_inputs(parts)
        self._start_bar(parts)
        code, error, cancelled = self._execute(parts)
        merged = 0
        if not error:
            try:
                merged = self.merge(parts)
            except (ClientError, OSError) as exc:
                code, error = EXIT_ERROR, f"merging the parts failed: {exc}"
        if any(a.state == "lost" for a in self.attempts):
            # A host given up may come back with its part still running: stop it.
            self.cancel_all("the run is over")
        if not error or cancelled:
            self._remove_split_dir()
        summary = self.summary(parts, time.monotonic() - started, merged, error, cancelled)
        return SplitResult(code, summary)

    def _announce(self, parts: list[Part], need_locks: bool, ambient: str | None) -> None:
        kind = "bands" if self.view is not None else "views" if self.rad else "parts"
        self.say(
            f"rayfront: {self.program} split into {len(parts)} {kind} on "
            + ", ".join(
                f"{h.name} ({h.slots} cpu{'s' if h.slots != 1 else ''})" for h in self.hosts
            )
            + (
                " (the share locks files between them)"
                if need_locks and len(self.hosts) > 1
                else ""
            )
            + (f"; the parts share the ambient file {ambient}" if ambient else "")
            + ("; the octree is made first, by one job" if self.rad else "")
        )

    def _execute(self, parts: list[Part]) -> tuple[int, str, bool]:
        """Every part run to its end: (exit code, error, cancelled by someone)."""
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_term)
        try:
            if self.rad is not None:
                self._prelude(self.rad.prelude)
            self.dispatch(parts)
            self._show()
        except KeyboardInterrupt:
            self.cancel_all("interrupted")
            self._remove_split_dir()
            raise
        except SplitCancelled as exc:
            self.cancel_all(str(exc))
            return 130, f"{exc}; every part was cancelled", True
        except _PartFailed as exc:
            self.cancel_all("a part failed")
            return exc.exit_code, str(exc), False
        except ClientError as exc:
            self.cancel_all("the run cannot finish")
            return exc.exit_code, str(exc), False
        finally:
            signal.signal(signal.SIGTERM, previous)
            if self.bar is not None:
                self.bar.close()
                self.bar = None
        return 0, "", False

    def _prelude(self, part: Part) -> None:
        """One job that must end done before the parts start (rad: the octree)."""
        self.dispatch([part])
        self.prelude_attempts = self.attempts
        self.attempts, self.done = [], {}

    def _remove_split_dir(self) -> None:
        shutil.rmtree(self.project.local_dir / self.split_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.project.local_dir / SPLIT_DIR).rmdir()

    def merge(self, parts: list[Part]) -> int:
        if self.rad is not None:  # rad wrote each view's files itself
            self.merged_files = [
                p for p in self.rad.pictures if (self.project.local_dir / p).exists()
            ]
            return 0
        outputs = [self.project.local_dir / self.done[p.index].output for p in parts]
        if self.view is not None:
            assert self.output is not None
            splitplan.merge_picture(
                list(zip(parts, outputs, strict=True)),
                self.view,
                self.project.local_dir / self.output,
                self.project.local_dir,
                self.env,
            )
            return (self.project.local_dir / self.output).stat().st_size
        if self.contrib is not None:
            return self._merge_contrib(parts, outputs)
        if self.output:
            return splitplan.merge_grid(outputs, self.project.local_dir / self.output)
        return splitplan.merge_grid(outputs, None, sys.stdout.buffer)

    def _merge_contrib(self, parts: list[Part], outputs: list[Path]) -> int:
        """Standard output and every -o file, each under the single run's header."""
        spec = self.contrib
        assert spec is not None
        first = self.done[parts[0].index]
        first_args = first.args or first.part.args
        receiver = (
            self.receiver.pairs(str(first.folder), first_args[self.receiver.index])
            if self.receiver is not None
            else ([], [])
        )
        fix = HeaderFix.of(spec, self.args, first_args, self.matrix_rows, receiver)
        if spec.o_at or self.receiver is not None:
            folders = [self.project.local_dir / str(self.done[p.index].folder) for p in parts]
            self.merged_files = splitmatrix.merge_patterns(
                spec, folders, self.project.local_dir, fix
            )
        if self.output:
            return splitmatrix.merge_into(
                outputs, self.project.local_dir / self.output, fix, spec.picture
            )
        if not self._writes_stdout():
            return 0
        return splitmatrix.merge_stream(outputs, sys.stdout.buffer, fix, spec.picture)

    def summary(
        self, parts: list[Part], wall: float, merged: int, error: str, cancelled: bool = False
    ) -> dict[str, Any]:
        rows = []
        for part in parts:
            tries = [a for a in self.attempts if a.part.index == part.index]
            final = self.done.get(part.index)
            rows.append(
                {
                    "index": part.index + 1,
                    "label": part.label,
                    "state": "done" if final else (tries[-1].state if tries else "not started"),
                    "host": final.host.name if final else None,
                    "job": final.job_id if final else None,
                    "seconds": round((final.ended or 0) - final.started, 3) if final else None,
                    "attempts": [
                        {"host": a.host.name, "job": a.job_id, "state": a.state} for a in tries
                    ],
                }
            )
        return {
            "state": "cancelled" if cancelled else "failed" if error else "done",
            "error": error or None,
            "program": self.program,
            "output": self.output,
            "bytes": merged,
            "resolution": ([self.view.width, self.view.height] if self.view else None),
            "hosts": [
                {"host": h.name, "cpus": h.slots, "lost": h.lost or None} for h in self.hosts
            ],
            "parts": rows,
            "files": self.merged_files,
            "prelude": self._prelude_row(),
            "wall_time": round(wall, 3),
            "events": self.events,
            "split_dir": self.split_dir if error and not cancelled else None,
        }

    def _prelude_row(self) -> dict[str, Any] | None:
        """The job that ran before the parts (rad: the octree), if there was one."""
        done = [a for a in self.prelude_attempts if a.state == JobState.DONE]
        if not done:
            return None
        return {
            "label": done[-1].part.label,
            "host": done[-1].host.name,
            "job": done[-1].job_id,
            "seconds": round((done[-1].ended or 0) - done[-1].started, 3),
        }


class _PartFailed(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code or EXIT_ERROR


def _radiance_env(ctx: Context) -> dict[str, str]:
    from rayserver.common import radiance

    try:
        return radiance.simulation_env(ctx.settings)
    except FileNotFoundError as exc:
        raise ClientError(f"a split run plans and merges with Radiance here: {exc}") from exc


def summary_lines(summary: dict[str, Any], project_dir: Path) -> list[str]:
    """A person's account of a split run."""
    if summary["error"]:
        lines = [f"split {summary['program']} failed: {summary['error']}"]
        if summary.get("split_dir"):
            lines.append(f"  part files kept in {project_dir / summary['split_dir']}")
        return lines
    what = (
        f"{summary['resolution'][0]}x{summary['resolution'][1]} picture"
        if summary.get("resolution")
        else f"{summary['bytes']} bytes"
    )
    where = project_dir / summary["output"] if summary["output"] else "standard output"
    files = summary.get("files") or []
    if summary["program"] == "rad":
        where, what = f"{len(files)} pictures", ", ".join(files) or "all up to date"
    elif files and not summary["output"] and not summary["bytes"]:
        where, what = f"{len(files)} -o files", ", ".join(files[:3]) + (" ..." if files[3:] else "")
    elif files:
        what += f"; and {len(files)} -o files: " + ", ".join(files[:3]) + (" ..." * bool(files[3:]))
    lines = [
        f"{'rendered' if summary['program'] == 'rad' else 'merged'} {len(summary['parts'])} "
        f"parts into {where} ({what}) in "
        f"{summary['wall_time']:.1f} s"
    ]
    if summary.get("prelude"):
        first = summary["prelude"]
        lines.append(
            f"  first, {first['label']}: {first['host']} job {first['job']}, {first['seconds']:.1f} s"
        )
    for row in summary["parts"]:
        retried = f", {len(row['attempts'])} tries" if len(row["attempts"]) > 1 else ""
        lines.append(
            f"  part {row['index']} {row['label']}: {row['host']} job {row['job']}, "
            f"{row['seconds']:.1f} s{retried}"
        )
    return lines
