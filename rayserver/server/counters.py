"""Counters of this worker process that GET /metrics reports (requests, refusals).

Plain dictionaries in memory, incremented on the event loop: they start at
zero when a worker starts (Prometheus' ``rate()`` handles such resets).
Everything that outlives a worker (jobs, their durations, sandbox and limit
events) is counted from the job database instead.
"""

from __future__ import annotations

from collections import Counter

# (method, status code) of every answered HTTP request.
REQUESTS: Counter[tuple[str, int]] = Counter()
# Refusals by reason: "allow" (address not in allow), "limit" (connection
# limits), "token" (no or wrong token), "forbidden" (another user's job).
REFUSALS: Counter[str] = Counter()
_METHODS = frozenset({"GET", "HEAD", "POST", "DELETE", "PUT", "PATCH", "OPTIONS"})


def count_request(method: str, status: int) -> None:
    """Count one answer; unusual methods share one label, so a client cannot add labels."""
    REQUESTS[(method if method in _METHODS else "other", status)] += 1


def count_refusal(reason: str) -> None:
    REFUSALS[reason] += 1
