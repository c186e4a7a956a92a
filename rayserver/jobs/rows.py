"""A job's row, decoded once where it leaves the job database (:class:`JobRow`).

Columns that hold JSON text in the table (steps, env, outputs, after_ids,
events, warnings) are Python objects here, and the state is a
:class:`~rayserver.common.states.JobState`.
:meth:`JobRow.to_api` is the job object of docs/api-contract.md (given what
only the database knows: which ``after`` jobs are not done yet).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from dataclasses import dataclass
from typing import Any, TypedDict

from rayserver.common.states import JobState
from rayserver.common.tokens import SHARED_USER

# Columns that hold JSON text in the table, and their empty value.
JSON_COLUMNS = {
    "steps": list,
    "env": dict,
    "outputs": list,
    "after_ids": list,
    "events": list,
    "warnings": list,
}


class _StepKind(TypedDict, total=False):
    """A shell step (program "sh", path /bin/sh) keeps what it was submitted as."""

    sh: str  # the command line (args are ["-c", it])
    script: str  # the script, relative to the project (args are [it, *its parameters])


class StepSpec(_StepKind):
    """One resolved step as stored: absolute program path, arguments, redirections."""

    program: str
    path: str
    args: list[str]
    stdin: str | dict[str, bool] | None  # a project file, {"stream": True} or None
    stdout: str | dict[str, bool] | None


@dataclass(frozen=True, slots=True)
class JobRow:
    """One row of the ``jobs`` table (see jobdb's schema for what each column means)."""

    id: int
    name: str | None
    priority: int
    client: str
    location: str
    project: str
    workdir: str
    steps: list[StepSpec]
    env: dict[str, str]
    state: JobState
    submitted_at: float
    started_at: float | None
    ended_at: float | None
    pid: int | None
    pgid_children: int | None
    progress: float
    current_step: int
    step_count: int
    exit_status: int | None
    signal: int | None
    reason: str | None
    wall_time: float | None
    cpu_time: float | None
    max_rss_kb: int | None
    cancel_request: str | None  # None, "cancel" or "shutdown"
    executor: str  # "local" or "slurm": where the job runs
    external_id: str | None  # the Slurm job id
    # Files the job created or changed in its project: [{path, size}] (plain paths in rows
    # of older versions, which listed only what rad said it wrote).
    outputs: list[Any]
    after_ids: list[int]  # jobs that must be done before this one starts (--after)
    user: str | None = None  # who submitted it; None: the shared token (SHARED_USER)
    events: list[str] = dataclasses.field(default_factory=list)  # jobdb.EVENTS that happened
    project_dir: str | None = None  # the project's folder: the box's writable root
    cpus: int = 1  # cpu slots the job takes (its -n / rad -N)
    warnings: list[str] = dataclasses.field(default_factory=list)  # not failing the job
    resumes: int = 0  # times queued again after an interruption (resume_interrupted)
    resume_step: int | None = None  # the step (1-based) a resumed run continues from

    @classmethod
    def decode(cls, row: sqlite3.Row) -> JobRow:
        """The row of a ``SELECT *`` (or ``RETURNING *``)."""
        values = dict(row)
        unknown = set(values) - _FIELDS
        if unknown:
            # A column added to the table needs its field here (and in to_api if public).
            raise TypeError(
                f"jobs table column(s) {', '.join(sorted(unknown))} have no JobRow field "
                "(add them in rayserver/jobs/rows.py)"
            )
        for key, empty in JSON_COLUMNS.items():
            raw = values.get(key)
            values[key] = json.loads(raw) if raw else empty()
        values["state"] = JobState(values["state"])
        return cls(**values)

    @property
    def owner(self) -> str:
        """The job's user; jobs of the shared token (and of before named tokens) are its."""
        return self.user or SHARED_USER

    @property
    def final(self) -> bool:
        return self.state.final

    @property
    def resumable(self) -> bool:
        """Whether the job can be queued again after an interruption: no step streams
        to or from its client (that connection is gone, and its data with it)."""
        return not any(isinstance(s.get(k), dict) for s in self.steps for k in ("stdin", "stdout"))

    def __getitem__(self, column: str) -> Any:
        """``row["state"]``: read access by column name, as for the plain rows of old
        (tests and bench scripts read rows so); the code uses the attributes."""
        if column not in _FIELDS:
            raise KeyError(column)
        return getattr(self, column)

    def all_outputs(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The API's ``outputs``: [{path, size}] (size null for older rows), at most ``limit``."""
        out: list[dict[str, Any]] = []
        for entry in self.outputs or []:
            if limit is not None and len(out) >= limit:
                break
            if isinstance(entry, str):
                out.append({"path": entry, "size": None})
            elif isinstance(entry, dict) and isinstance(entry.get("path"), str):
                out.append({"path": entry["path"], "size": entry.get("size")})
        return out

    def to_api(self, waiting_for: list[int], outputs_limit: int | None = None) -> dict[str, Any]:
        """The API job object of docs/api-contract.md.

        ``waiting_for``: the jobs of ``after_ids`` not done yet (the database knows).
        ``outputs_limit``: list at most this many outputs (job lists; ``outputs_count``
        always tells them all).
        """
        return {
            "id": self.id,
            "name": self.name,
            "priority": self.priority,
            "state": self.state.public.value,
            "location": self.location,
            "project": self.project,
            "steps": [
                {
                    "program": s["program"],
                    "args": s["args"],
                    "stdin": s.get("stdin"),
                    "stdout": s.get("stdout"),
                    **{k: s[k] for k in ("sh", "script") if k in s},
                }
                for s in self.steps
            ],
            "user": self.owner,
            "client": self.client,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "progress": self.progress or 0.0,
            "current_step": self.current_step,
            "step_count": self.step_count,
            "exit_status": self.exit_status,
            "signal": self.signal,
            "reason": self.reason,
            "wall_time": self.wall_time,
            "cpu_time": self.cpu_time,
            "max_rss_kb": self.max_rss_kb,
            "cancel_requested": bool(self.cancel_request),
            "outputs": self.all_outputs(outputs_limit),
            "outputs_count": len(self.outputs or []),
            "pid": self.pid,
            "after": list(self.after_ids or []),
            "waiting_for": waiting_for,
            "warnings": list(self.warnings or []),
            "resumes": int(self.resumes or 0),
        }


_FIELDS = frozenset(f.name for f in dataclasses.fields(JobRow))
