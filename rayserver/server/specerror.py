"""The error a refused job (or probe) is raised with: an HTTP status and a message for a person.

Its own module so that the job checks split over several modules
(:mod:`rayserver.server.jobspec`, :mod:`rayserver.server.argcheck`) share
it without importing each other in a circle; ``jobspec.JobSpecError`` is
the same class.
"""

from __future__ import annotations


class JobSpecError(Exception):
    """A job that cannot be accepted; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        self.status = status
        self.message = message
        self.field = field
        super().__init__(message)
