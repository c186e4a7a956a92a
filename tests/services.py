"""What some tests need from the machine, and the one way a test says it needs it.

A test that needs Slurm, chromium, systemd-analyze, root or a Python other users
can run carries the mark of that name (``@pytest.mark.slurm``; the conftest hook
checks the marks before the test) or calls ``need_service(name)``. When the
service is missing the test skips and says why; under ``CI=true`` it fails
instead: ``.ci/run`` installs and starts all of them, so there a skip would only
hide a broken install step. Tests never install or start any of these.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


# A node finishing an earlier job (its epilog) takes new ones once it is done: wait for it.
_SLURM_PASSING = ("completing", "powering_up", "configuring")
_SLURM_SETTLE = 60.0  # seconds


def _slurm() -> str | None:
    if not shutil.which("sinfo"):
        return "Slurm's commands are not installed (.ci/run starts a cluster: bash .ci/start-slurm)"
    deadline = time.monotonic() + _SLURM_SETTLE
    while True:
        states, why = _slurm_states()
        if why is not None:
            return why
        if any(s in ("idle", "mixed", "allocated") for s in states):
            return None
        if not states or not all(s in _SLURM_PASSING for s in states):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    return f"no Slurm node takes jobs (sinfo states: {states})"


def _slurm_states() -> tuple[list[str], str | None]:
    """The nodes' states (flags such as * and ~ taken off), or why sinfo gave none."""
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"sinfo did not run: {exc}"
    if out.returncode != 0:
        return [], f"sinfo fails, no Slurm cluster here: {out.stderr.strip()}"
    return [s.rstrip("*~#") for s in out.stdout.split()], None


def _chromium() -> str | None:
    if not Path(CHROMIUM).exists():
        return (
            f"{CHROMIUM} is missing: Debian's chromium "
            "(.ci/run: apt-get install -y --no-install-recommends chromium)"
        )
    return None


def _systemd() -> str | None:
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze is not installed (.ci/run installs the systemd package)"
    return None


def _root() -> str | None:
    return None if os.geteuid() == 0 else "needs root (CI runs as root)"


def _python_for_others() -> str | None:
    """Can user nobody start this venv's Python (a 0700 /root above pyenv says no)?"""
    if _root() is not None:
        return _root()
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import asyncio, aiohttp"],
            user="nobody",
            group="nogroup",
            extra_groups=[],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"user nobody cannot start {sys.executable}: {exc}"
    if probe.returncode != 0:
        return (
            f"user nobody cannot use {sys.executable} (.ci/run makes the folders above it "
            f"searchable): {probe.stderr.strip()[-200:]}"
        )
    return None


def _prometheus() -> str | None:
    missing = [b for b in ("prometheus", "promtool") if shutil.which(b) is None]
    if missing:
        return (
            f"{' and '.join(missing)} not installed: Debian's prometheus package "
            "(.ci/run: apt-get install -y --no-install-recommends prometheus)"
        )
    return None


PROBES: dict[str, Callable[[], str | None]] = {
    "slurm": _slurm,
    "chromium": _chromium,
    "systemd": _systemd,
    "root": _root,
    "python_for_others": _python_for_others,
    "prometheus": _prometheus,
}
# Marks (pyproject's markers) that mean "needs this service".
MARKS = {
    "slurm": "slurm",
    "browser": "chromium",
    "root": "root",
    "systemd": "systemd",
    "others": "python_for_others",
}


@functools.cache
def problem(name: str) -> str | None:
    """Why ``name`` is not available here, or None when it is (probed once a run)."""
    return PROBES[name]()


def need_service(name: str, reason: str | None = None) -> None:
    """Skip (fail under CI=true) when ``name`` is missing; ``reason`` overrides the probe."""
    why = reason if reason is not None else problem(name)
    if why is None:
        return
    if in_ci():
        pytest.fail(
            f"CI=true and {name} is missing: {why}. .ci/run must install/start it.", pytrace=False
        )
    pytest.skip(f"{name}: {why}")
