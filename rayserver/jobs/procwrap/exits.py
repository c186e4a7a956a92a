"""Exit codes of a procwrap; the scheduler reads them when a procwrap died without recording a final state."""

from __future__ import annotations

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CLAIM_LOST = 3
EXIT_INTERNAL = 4
EXIT_CANCELLED = 5
EXIT_INTERRUPTED = 6
# Interrupted, and queued again to resume (resume_interrupted): the job is not final.
EXIT_RESUMED = 7
