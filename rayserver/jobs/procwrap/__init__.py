"""The procwrap: the controlling process of a simulation job (of several in turn, when warm).

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

The package's modules: ``entry`` (the spare of the fork server, a direct run,
the command line), ``warm`` (when a spare may run another job after one, and its
reset between jobs), ``job`` (one job's steps, log, progress and final record),
``watch`` (one running step: output, progress, memory, cancel, reaping),
``confine`` (files opened inside the project), ``ambient`` (a missing ambient file
created by one writer alone, its integrity checked after the step), ``procs`` (spawning a step in
its own process group, /proc scans, subreaper), ``rtcount`` and ``progress``
(progress of rtrace and rpict/rad), ``exits`` (exit codes), ``receipt`` (the job's receipt.json: what ran, on what inputs,
with what outputs). It imports only
``rayserver.common`` and ``rayserver.jobs.jobdb``, never the HTTP layer.
"""

from rayserver.jobs.procwrap.confine import ConfinementError, open_confined
from rayserver.jobs.procwrap.entry import main, preload, procwrap_title, run_job, run_spare
from rayserver.jobs.procwrap.exits import (
    EXIT_CANCELLED,
    EXIT_CLAIM_LOST,
    EXIT_DONE,
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_RESUMED,
    EXIT_USAGE,
)
from rayserver.jobs.procwrap.procs import group_gone, group_members, set_subreaper, spawn

__all__ = [
    "EXIT_CANCELLED",
    "EXIT_CLAIM_LOST",
    "EXIT_DONE",
    "EXIT_FAILED",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_RESUMED",
    "EXIT_USAGE",
    "ConfinementError",
    "group_gone",
    "group_members",
    "main",
    "open_confined",
    "preload",
    "procwrap_title",
    "run_job",
    "run_spare",
    "set_subreaper",
    "spawn",
]
