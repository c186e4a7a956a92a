"""``rayfront shim DIR``: one small script per Radiance program, written into DIR.

Each script execs this installation's Python on :mod:`rayserver.client.shim`
with the program's name and its arguments (see that module for what a shim
does). The Radiance bin folder and, when set now, RAYFRONT_HOME and
RAYFRONT_HOSTNAME are written into the scripts, so a tool that passes its
own environment (Honeybee) still reaches the same servers.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import rayserver
from rayserver.client.connection import EXIT_USAGE, ClientError
from rayserver.client.context import Context
from rayserver.common.radiance import bin_dir

MARK = "# rayfront shim:"


def programs(directory: Path) -> list[str]:
    """The executables of the Radiance bin folder, by name."""
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.is_file() and os.access(p, os.X_OK) and not p.name.startswith(".")
    )


def script(program: str, radiance_bin: Path, host: str | None, hosts: str | None) -> str:
    root = str(Path(rayserver.__file__).resolve().parent.parent)
    boot = (
        f"import sys; sys.path.insert(0, {root!r}); "
        "from rayserver.client.shim import main; sys.exit(main())"
    )
    words = [sys.executable, "-S", "-c", boot, "--bin", str(radiance_bin)]
    if host:
        words += ["--host", host]
    if hosts:
        words += ["--hosts", hosts]
    lines = ["#!/bin/sh", f"{MARK} {program} on a render host (RAYFRONT_SHIM=off: locally)"]
    for var in ("RAYFRONT_HOME", "RAYFRONT_HOSTNAME"):
        if os.environ.get(var):
            lines.append(f'{var}="${{{var}:-{_dq(os.environ[var])}}}"; export {var}')
    lines.append("exec " + " ".join(shlex.quote(w) for w in [*words, program]) + ' "$@"')
    return "\n".join(lines) + "\n"


def _dq(text: str) -> str:
    """``text`` inside double quotes of sh (where $ ` \\ and " are special)."""
    return "".join("\\" + c if c in '$`\\"' else c for c in text)


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
    for name in names:
        path = target / name
        if path.exists() and not _is_shim(path):
            raise ClientError(
                f"{path} exists and is not a shim rayfront wrote; expected an empty folder "
                "or one of earlier shims",
                exit_code=EXIT_USAGE,
            )
        tmp = target / f".{name}.tmp"
        tmp.write_text(script(name, radiance_bin, host, hosts))
        tmp.chmod(0o755)
        tmp.replace(path)
    return radiance_bin, names


def _is_shim(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return MARK.encode() in f.read(200)
    except OSError:
        return False
