"""How a job's procwrap is started and stopped, behind one protocol (``base``):
on this host through the fork server (``local``, with ``forkserver``: the
single-threaded process that forks procwraps, and ``forkclient``: the worker's
asyncio client for it), or on a cluster through Slurm (``slurm``: sbatch, squeue, scancel).
Imports ``jobs`` and ``common`` only (and the generic ``supervisor.util``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayserver.jobs.executors.base import Executor, SchedulerEvents
    from rayserver.jobs.executors.forkserver import ForkServer
    from rayserver.jobs.jobdb import JobDB


def create(
    name: str, *, db: JobDB, live: Any, fork_server: ForkServer, events: SchedulerEvents
) -> Executor:
    """The executor the settings' ``executor`` value ``name`` stands for.

    Imported here, on demand: the fork server process imports this package
    and must stay small.
    """
    if name == "local":
        from rayserver.jobs.executors.local import LocalExecutor

        return LocalExecutor(
            db, fork_server, events, grace=lambda: _grace(live), resume=lambda: _resume(live)
        )
    if name == "slurm":
        from rayserver.jobs.executors.slurm import SlurmExecutor

        return SlurmExecutor(db, live.settings, on_change=events.notify)
    raise ValueError(f"unknown executor {name!r}; expected 'local' or 'slurm'")


def _grace(live: Any) -> float:
    settings = getattr(live, "settings", None)
    return float(getattr(settings, "cancel_grace", 5.0))


def _resume(live: Any) -> bool:
    settings = getattr(live, "settings", None)
    return bool(getattr(settings, "resume_interrupted", True))
