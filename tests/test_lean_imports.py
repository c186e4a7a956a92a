"""The supervisor and the fork server load none of the worker's libraries.

Each is checked in a fresh interpreter (a real subprocess), as they run:
the supervisor imports ``rayserver.daemon.cli``, the fork server
``rayserver.jobs.executors.forkserver``. OpenSSL (ssl, hashlib) alone is
~5 MiB of resident memory in every such process (issue 17, item 4).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("aiohttp", "yaml", "jsonschema", "watchdog", "asyncio", "ssl", "hashlib", "secrets")
# The fork server forks every procwrap: not even the argument parser or bz2/lzma.
FORK_SERVER_HEAVY = (*HEAVY, "argparse", "shutil", "logging.handlers")


def _loaded(module: str) -> set[str]:
    code = f"import sys, json; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(out.stdout))


@pytest.mark.parametrize(
    ("module", "heavy"),
    [
        ("rayserver.daemon.cli", HEAVY),
        ("rayserver.jobs.executors.forkserver", FORK_SERVER_HEAVY),
    ],
)
def test_lean_process_imports(module: str, heavy: tuple[str, ...]) -> None:
    loaded = _loaded(module)
    assert module in loaded
    assert sorted(loaded & set(heavy)) == []
