"""``rayfront shim DIR``: one small script per Radiance program, written into DIR.

Each script is run by this installation's Python (``-I -S``: no site, no
PYTHON* variables of the calling tool) and calls
:func:`rayserver.client.shimfast.main` with the program's name and its
arguments (see :mod:`rayserver.client.shim` for what a shim does). The
Radiance bin folder, the plan file and, when set now, RAYFRONT_HOME and
RAYFRONT_HOSTNAME are written into the scripts, so a tool that passes its
own environment (Honeybee) still reaches the same servers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import rayserver
from rayserver.client.connection import EXIT_USAGE, ClientError
from rayserver.client.context import Context
from rayserver.common.radiance import bin_dir

MARK = "# rayfront shim:"
PLAN = ".rayfront-plan"  # + "-<uid>": each user's plan (see rayserver.client.shimfast)
# Linux reads 255 bytes of a #! line (127 before 5.1): keep well inside.
SHEBANG_MAX = 120


def programs(directory: Path) -> list[str]:
    """The executables of the Radiance bin folder, by name."""
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.is_file() and os.access(p, os.X_OK) and not p.name.startswith(".")
    )


def script(
    program: str, radiance_bin: Path, host: str | None, hosts: str | None, plan: Path
) -> str:
    """The text of ``program``'s shim: Python, started without site (``-I -S``)."""
    root = str(Path(rayserver.__file__).resolve().parent.parent)
    fixed = ["--bin", str(radiance_bin), "--plan", str(plan)]
    if host:
        fixed += ["--host", host]
    if hosts:
        fixed += ["--hosts", hosts]
    python = sys.executable
    if len(python) <= SHEBANG_MAX and python.isprintable() and " " not in python:
        lines = [f"#!{python} -IS"]
    elif not set(python) & set('"\\$`\n'):
        # Too long or spaced for a #! line: sh execs Python on this same file (which,
        # to Python, is a string statement that does nothing).
        lines = ["#!/bin/sh", f'"exec" "{python}" "-IS" "$0" "$@"']
    else:
        raise ClientError(
            f"cannot write shims for the Python at {python!r}: its path has characters "
            'a shell line cannot hold (\\, ", $, `)',
            exit_code=EXIT_USAGE,
        )
    lines += [
        f"{MARK} {program} on a render host (RAYFRONT_SHIM=off: locally)",
        "import os, sys",
    ]
    for var in ("RAYFRONT_HOME", "RAYFRONT_HOSTNAME"):
        if os.environ.get(var):
            lines.append(f"os.environ[{var!r}] = os.environ.get({var!r}) or {os.environ[var]!r}")
    lines += [
        f"sys.path.insert(0, {root!r})",
        "from rayserver.client.shimfast import main",
        f"main([*{fixed!r}, {program!r}, *sys.argv[1:]])",
    ]
    return "\n".join(lines) + "\n"


def write_shims(
    ctx: Context, target: Path, host: str | None, hosts: str | None
) -> tuple[Path, list[str]]:
    """Write (or rewrite) DIR's shims; (the Radiance bin folder, the programs written)."""
    if host and hosts:
        raise ClientError(
            "give --host (one server) or --hosts (several), not both", exit_code=EXIT_USAGE
        )
    if hosts is not None:
        names = [n.strip() for n in hosts.split(",") if n.strip()]
        ctx.server_records(None if names in ([], ["all"]) else names)  # unknown names fail now
    try:
        radiance_bin = bin_dir(ctx.settings)
    except FileNotFoundError as exc:
        raise ClientError(str(exc), exit_code=EXIT_USAGE) from exc
    target.mkdir(parents=True, exist_ok=True)
    if target.resolve() == radiance_bin:
        raise ClientError(
            f"{target} is the Radiance bin folder itself; expected another folder for the "
            "shims (they run the programs of that one)",
            exit_code=EXIT_USAGE,
        )
    names = programs(radiance_bin)
    for old_plan in target.glob(PLAN + "-*"):
        old_plan.unlink(missing_ok=True)  # made for the scripts replaced now
    for name in names:
        path = target / name
        if path.exists() and not _is_shim(path):
            raise ClientError(
                f"{path} exists and is not a shim rayfront wrote; expected an empty folder "
                "or one of earlier shims",
                exit_code=EXIT_USAGE,
            )
        tmp = target / f".{name}.tmp"
        tmp.write_text(script(name, radiance_bin, host, hosts, target.resolve() / PLAN), "utf-8")
        tmp.chmod(0o755)
        tmp.replace(path)
    return radiance_bin, names


def _is_shim(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return MARK.encode() in f.read(4096)
    except OSError:
        return False
