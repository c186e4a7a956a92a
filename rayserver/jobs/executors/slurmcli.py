"""Slurm's command-line tools, as the Slurm executor uses them.

- :class:`SlurmCommands`: thin asyncio wrappers over ``sbatch --parsable``,
  ``squeue -t all -o``, ``scontrol show job -o``, ``scancel`` and ``sinfo``,
  plus pure parsers (:func:`parse_scontrol_record`, :func:`parse_exit_code`,
  :func:`final_state`). Only stable text formats are used: ``squeue --json``
  changed shape between Slurm releases and ignores ``-j`` in 22.05.
- :func:`cluster_info`: what ``GET /v1/info`` says about the cluster.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayserver.common.settings import Settings
from rayserver.common.states import JobState

COMMAND_TIMEOUT = 30.0

# Slurm job states (squeue -o %T, scontrol JobState) that are not final yet.
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "RESV_DEL_HOLD",
        "STOPPED",
    }
)

# Final Slurm states -> (our state, reason). Failures of the machinery (node,
# preemption) are "interrupted" like a local job whose server went away;
# failures of the job itself are "failed".
_FROM_SLURM: dict[str, tuple[JobState, str]] = {
    "COMPLETED": (JobState.DONE, ""),
    "FAILED": (JobState.FAILED, "the job's batch script failed in Slurm"),
    "CANCELLED": (JobState.CANCELLED, "cancelled in Slurm"),
    "TIMEOUT": (JobState.FAILED, "Slurm's time limit was reached"),
    "DEADLINE": (JobState.FAILED, "Slurm's deadline was reached"),
    "OUT_OF_MEMORY": (JobState.FAILED, "Slurm: out of memory"),
    "NODE_FAIL": (JobState.INTERRUPTED, "Slurm: the node failed"),
    "BOOT_FAIL": (JobState.INTERRUPTED, "Slurm: the node failed to boot"),
    "PREEMPTED": (JobState.INTERRUPTED, "Slurm preempted the job"),
    "REVOKED": (JobState.INTERRUPTED, "Slurm revoked the job (federation)"),
    "SPECIAL_EXIT": (JobState.FAILED, "Slurm: special exit"),
}


# Keys look like JobId, AllocNode:Sid, CPUs/Task, MCS_label.
_SCONTROL_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_:/]*$")


class SlurmError(Exception):
    """A Slurm command failed or said something we cannot use; the message says which."""


@dataclass(frozen=True)
class SlurmJob:
    """What Slurm says about one job."""

    job_id: str
    state: str  # Slurm's state, e.g. "RUNNING", "COMPLETED", "CANCELLED"
    reason: str = ""
    nodes: str = ""
    exit_status: int | None = None  # from ExitCode=N:S (scontrol only)
    signal: int | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def final(self) -> bool:
        return not self.active


def base_state(state: str) -> str:
    """'CANCELLED by 0' -> 'CANCELLED'; 'COMPLETING+' style suffixes are dropped too."""
    word = state.strip().split(" ", 1)[0]
    return word.rstrip("+*").upper()


def final_state(slurm_state: str) -> tuple[JobState, str]:
    """Map a final Slurm state onto (our state, reason).

    Raises ValueError for a state that is not final (the job is still with Slurm).
    """
    state = base_state(slurm_state)
    if state in ACTIVE_STATES:
        raise ValueError(f"Slurm state {state!r} is not final")
    return _FROM_SLURM.get(state, (JobState.FAILED, f"Slurm ended the job in state {state}"))


def parse_exit_code(text: str) -> tuple[int | None, int | None]:
    """scontrol's ``ExitCode=N:S`` value -> (exit status, signal); 0 signal means none."""
    try:
        status_text, _, signal_text = text.strip().partition(":")
        status = int(status_text)
        sig = int(signal_text) if signal_text else 0
    except ValueError:
        return None, None
    return status, (sig or None)


def parse_scontrol_record(line: str) -> dict[str, str]:
    """One ``scontrol show ... -o`` line -> {Key: value}.

    Values may contain spaces (``Reason=Not responding [slurm@...]``,
    ``Command=/path with space``): a word without ``=`` belongs to the
    previous value, which is the only rule scontrol's output follows.
    """
    record: dict[str, str] = {}
    last: str | None = None
    for word in line.strip().split(" "):
        key, eq, value = word.partition("=")
        if eq and _SCONTROL_KEY.match(key):
            record[key] = value
            last = key
        elif last is not None:
            record[last] += " " + word
    return record


def job_from_scontrol(line: str) -> SlurmJob:
    rec = parse_scontrol_record(line)
    if "JobId" not in rec:
        raise SlurmError(f"scontrol show job gave no JobId in {line[:200]!r}")
    status, sig = parse_exit_code(rec.get("ExitCode", ""))
    nodes = rec.get("NodeList", "")
    return SlurmJob(
        job_id=rec["JobId"],
        state=base_state(rec.get("JobState", "UNKNOWN")),
        reason=rec.get("Reason", "") if rec.get("Reason") != "None" else "",
        nodes="" if nodes == "(null)" else nodes,
        exit_status=status,
        signal=sig,
    )


class SlurmCommands:
    """Runs Slurm's command-line tools (asyncio subprocesses, argument lists, no shell)."""

    def __init__(self, bin_dir: str = "", timeout: float = COMMAND_TIMEOUT) -> None:
        self.bin_dir = bin_dir
        self.timeout = timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> SlurmCommands:
        return cls(settings.slurm_bin)

    def path(self, name: str) -> str:
        """Absolute path of a Slurm command: slurm_bin if set, else PATH."""
        if self.bin_dir:
            candidate = Path(self.bin_dir).expanduser() / name
            if not (candidate.is_file() and os.access(candidate, os.X_OK)):
                raise SlurmError(
                    f"{name} not found in slurm_bin {self.bin_dir!r}: expected the directory "
                    "holding sbatch, squeue, scontrol, scancel and sinfo"
                )
            return str(candidate)
        found = shutil.which(name)
        if not found:
            raise SlurmError(
                f"{name} not found on PATH: install Slurm's client commands or set slurm_bin "
                "in rayserver.toml"
            )
        return found

    async def run(
        self, name: str, args: Sequence[str], stdin: bytes | None = None, check: bool = True
    ) -> tuple[int, str, str]:
        """Run one Slurm command; returns (exit code, stdout, stderr)."""
        argv = [self.path(name), *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise SlurmError(f"cannot run {name}: {exc.strerror or exc}") from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), self.timeout)
        except TimeoutError as exc:
            proc.kill()
            await proc.wait()
            raise SlurmError(
                f"{name} did not answer within {self.timeout:.0f} s (is slurmctld up?)"
            ) from exc
        code = proc.returncode if proc.returncode is not None else -1
        stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        if check and code != 0:
            raise SlurmError(
                f"{shlex.join([name, *args])} failed (exit {code}): "
                f"{stderr.strip() or stdout.strip() or 'no message'}"
            )
        return code, stdout, stderr

    async def sbatch(self, script: str, options: Sequence[str]) -> str:
        """Submit a batch script (given on stdin); returns the Slurm job id."""
        _, out, _ = await self.run("sbatch", ["--parsable", *options], stdin=script.encode())
        # --parsable prints "jobid" or "jobid;cluster".
        job_id = out.strip().splitlines()[-1].split(";", 1)[0] if out.strip() else ""
        if not job_id.isdigit():
            raise SlurmError(f"sbatch gave no job id (got {out.strip()[:200]!r})")
        return job_id

    async def squeue(self, job_ids: Iterable[str]) -> dict[str, SlurmJob]:
        """State of the given jobs, finished ones included while Slurm remembers them.

        A job Slurm has forgotten (older than MinJobAge, or never existed) is
        simply missing from the answer.
        """
        ids = sorted({str(j) for j in job_ids}, key=lambda s: (len(s), s))
        if not ids:
            return {}
        code, out, err = await self.run(
            "squeue",
            ["-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r|%N"],
            check=False,
        )
        if code != 0:
            # Every id unknown: squeue fails instead of printing nothing.
            if "Invalid job id" in err:
                return {}
            raise SlurmError(f"squeue failed (exit {code}): {err.strip() or 'no message'}")
        jobs: dict[str, SlurmJob] = {}
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) != 4:
                continue
            job_id, state, reason, nodes = parts
            jobs[job_id] = SlurmJob(
                job_id, base_state(state), "" if reason == "None" else reason, nodes
            )
        return jobs

    async def show_job(self, job_id: str) -> SlurmJob | None:
        """``scontrol show job -o ID`` (with exit code and signal), None if Slurm forgot it."""
        code, out, err = await self.run("scontrol", ["show", "job", "-o", str(job_id)], check=False)
        if code != 0:
            if "Invalid job id" in err:
                return None
            raise SlurmError(
                f"scontrol show job {job_id} failed (exit {code}): {err.strip() or 'no message'}"
            )
        lines = [ln for ln in out.splitlines() if ln.startswith("JobId=")]
        if not lines:
            return None
        return job_from_scontrol(lines[0])

    async def scancel(self, job_id: str, signal: str | None = None) -> None:
        """Cancel a job (or only signal it); a job already gone is not an error."""
        args = [f"--signal={signal}", "--full"] if signal else []
        code, out, err = await self.run("scancel", [*args, str(job_id)], check=False)
        if code != 0 and "Invalid job id" not in err and "already completing" not in err:
            raise SlurmError(
                f"scancel {job_id} failed (exit {code}): "
                f"{err.strip() or out.strip() or 'no message'}"
            )

    async def partition_nodes(self, partition: str = "") -> list[dict[str, Any]]:
        """One dict per node of the partition: name, state, cpus, free cpus."""
        args = ["-h", "-N", "-o", "%N|%T|%C|%P"]
        if partition:
            args += ["-p", partition]
        _, out, _ = await self.run("sinfo", args)
        nodes: dict[str, dict[str, Any]] = {}
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) != 4:
                continue
            name, state, cpus, part = parts
            # %C is allocated/idle/other/total.
            try:
                alloc, idle, _other, total = (int(x) for x in cpus.split("/"))
            except ValueError:
                alloc = idle = total = 0
            node = nodes.setdefault(
                name,
                {
                    "name": name,
                    "state": state.rstrip("*~#!%$@^-"),
                    "cpus": total,
                    "free_cpus": idle if state.rstrip("*~#!%$@^-") in ("idle", "mixed") else 0,
                    "allocated_cpus": alloc,
                    "partitions": [],
                },
            )
            node["partitions"].append(part.rstrip("*"))
        return list(nodes.values())


_INFO_CACHE: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}


async def cluster_info(settings: Settings) -> dict[str, Any]:
    """What GET /v1/info says about Slurm: partition, nodes, free cpus (or the error).

    Cached for ``slurm_poll_interval``: /v1/info is unauthenticated, and
    requests must never turn into a stream of sinfo calls on the controller.
    """
    key = (settings.slurm_bin, settings.slurm_partition)
    cached = _INFO_CACHE.get(key)
    if cached and time.monotonic() - cached[0] < max(0.5, settings.slurm_poll_interval):
        return dict(cached[1])
    info = await _cluster_info(settings)
    _INFO_CACHE[key] = (time.monotonic(), info)
    return dict(info)


async def _cluster_info(settings: Settings) -> dict[str, Any]:
    info: dict[str, Any] = {"partition": settings.slurm_partition or None}
    try:
        nodes = await SlurmCommands(settings.slurm_bin, timeout=10).partition_nodes(
            settings.slurm_partition
        )
    except SlurmError as exc:
        info.update(available=False, error=str(exc), nodes=[], cpus=0, free_cpus=0)
        return info
    if settings.slurm_partition and not nodes:
        info.update(
            available=False,
            nodes=[],
            cpus=0,
            free_cpus=0,
            error=f"Slurm partition {settings.slurm_partition!r} has no nodes "
            "(check slurm_partition in rayserver.toml)",
        )
        return info
    info.update(
        available=True,
        nodes=nodes,
        cpus=sum(n["cpus"] for n in nodes),
        free_cpus=sum(n["free_cpus"] for n in nodes),
    )
    return info
