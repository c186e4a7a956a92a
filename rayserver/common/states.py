"""The states of a job, defined once for the server, the procwraps and the client.

A job moves ``queued -> starting -> running -> <final>``; ``starting`` is
internal (the scheduler picked the job, its procwrap has not claimed it yet)
and the API shows it as ``queued``. A final state is never left.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """One job state; each member equals (and is stored and sent as) its text."""

    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES

    @property
    def public(self) -> JobState:
        """The state as the API shows it (``starting`` is ``queued`` there)."""
        return JobState.QUEUED if self is JobState.STARTING else self


# Tuples, not sets: messages list them in this order.
FINAL_STATES: tuple[JobState, ...] = (
    JobState.DONE,
    JobState.FAILED,
    JobState.CANCELLED,
    JobState.INTERRUPTED,
)
# Not final yet: the scheduler or a procwrap holds the job.
ACTIVE_STATES: tuple[JobState, ...] = (JobState.STARTING, JobState.RUNNING)
# What ``GET /v1/jobs?state=`` accepts and the API reports.
API_STATES: tuple[JobState, ...] = (JobState.QUEUED, JobState.RUNNING, *FINAL_STATES)
ALL_STATES: tuple[JobState, ...] = (JobState.QUEUED, *ACTIVE_STATES, *FINAL_STATES)


def is_final(state: object) -> bool:
    """True for a final state, given as a JobState or as its text (an API answer's)."""
    return state in FINAL_STATES
