"""One job's box: what its steps may read and write, their environment and limits.

Built by the procwrap from trusted data only: the job's row (written by the
worker after its checks), the settings file of the installation and the
installation's own layout. Refused (the job fails, nothing runs) when a
folder the box would grant holds the installation's secrets: a project
that contains ``<home>`` (the token, the job database) or lies inside it,
or a Radiance or library folder that contains them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rayserver.common.settings import Settings, SettingsError, load_settings
from rayserver.jobs.procwrap import limits, sandbox
from rayserver.jobs.rows import JobRow

PRIVATE_TMP = "tmp"


@dataclass
class JobBox:
    """The built box of one job and what goes with it."""

    box: sandbox.Box
    env: dict[str, str]
    tmpdir: str
    cgroup: str = ""
    home_cgroup: str = ""  # the procwrap's own cgroup before the job's

    def close(self) -> None:
        """After the job: the private folder and the job's cgroup go."""
        self.box.close()
        import shutil  # here, not at the top: it pulls bz2 and lzma into the fork server

        shutil.rmtree(self.tmpdir, ignore_errors=True)
        if self.cgroup:
            limits.leave_job_cgroup(self.home_cgroup)
            limits.remove_job_cgroup(self.cgroup)


# path -> (the file's identity when read, what it gave): a warm procwrap parses
# the file again only when it changed.
_SETTINGS_READ: dict[str, tuple[tuple[int, ...], tuple[Settings, str]]] = {}


def job_settings(home: Path) -> tuple[Settings, str]:
    """The installation's settings as they are when a job starts; (settings, note).

    A settings file that does not parse gives the defaults, which confine:
    a broken edit never opens the box. The note says so for the job log.
    Parsed again whenever the file's inode, size, mtime or ctime changed.
    """
    path = Path(home) / "config" / "rayserver.toml"
    try:
        st = os.stat(path)
        key: tuple[int, ...] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        key = ()
    cached = _SETTINGS_READ.get(str(path))
    if key and cached is not None and cached[0] == key:
        return cached[1]
    try:
        result = load_settings(path), ""
    except SettingsError as exc:
        result = Settings(), f"rayserver: {exc}; this job runs with the default settings\n"
    if key:
        _SETTINGS_READ[str(path)] = (key, result)
    return result


def state_folders(home: Path) -> list[str]:
    """The installation's own folders: configuration (token), job state, server logs."""
    return [str(Path(home) / name) for name in ("config", "srvstate", "srvlogs")]


def secrets(home: Path, settings: Settings) -> list[str]:
    """Paths no grant of a box may contain: the installation's folders, keys, the user's home."""
    paths = state_folders(home)
    token = settings.token_path(Path(home) / "config" / "token")
    paths += [str(p) for p in (token, settings.tls_key) if p]
    real_home = os.path.expanduser("~")
    if real_home not in ("/", "~"):
        paths.append(real_home)
    return paths


def read_folders(row: JobRow) -> list[str]:
    """The system folders, Radiance's bin folder (of each step's program), the RAYPATH folders."""
    folders = list(sandbox.SYSTEM_READ)
    # Radiance's bin folder heads the job's PATH (an sh step's own program is /bin/sh).
    bin_dir = ((row.env or {}).get("PATH") or "").split(os.pathsep)[0]
    for folder in [bin_dir, *(os.path.dirname(s.get("path") or "") for s in row.steps)]:
        if folder and os.path.isabs(folder) and folder not in folders:
            folders.append(folder)
    raypath = (row.env or {}).get("RAYPATH", "")
    for entry in raypath.split(os.pathsep):
        if entry not in ("", ".") and os.path.isabs(entry) and entry not in folders:
            folders.append(entry)
    return folders


def check_grants(project: str, reads: list[str], home: Path, settings: Settings) -> None:
    """SandboxError when a grant would reach a secret (see the module docstring)."""
    hidden = secrets(home, settings)
    for granted, secret in sandbox.exposed([project], hidden):
        raise sandbox.SandboxError(
            f"the project folder {granted} contains {secret}, which jobs must never "
            "reach (the installation's token, job database or logs, a key, or the server "
            "user's home); refused: use a project folder outside it"
        )
    for folder in state_folders(home):
        if sandbox.inside(project, folder):
            raise sandbox.SandboxError(
                f"the project folder {project} lies inside {folder}, the installation's "
                "own files; refused"
            )
    for granted, secret in sandbox.exposed(reads, hidden):
        raise sandbox.SandboxError(
            f"the folder {granted}, which jobs may read, contains {secret}; refused: "
            "move the installation or the Radiance/library folder so they do not nest"
        )


def build(row: JobRow, settings: Settings, home: Path, job_dir: Path, netns: bool = True) -> JobBox:
    """The box of the job in ``row`` (SandboxError: it cannot be built; nothing runs)."""
    project = row.project_dir or row.workdir
    if not os.path.isdir(project):
        raise sandbox.SandboxError(
            f"the project directory {project} is missing (moved, deleted or its volume unmounted?)"
        )
    tmpdir = str(Path(job_dir) / PRIVATE_TMP)
    reads = read_folders(row)
    if settings.sandbox == "on":
        check_grants(project, reads, home, settings)
    os.makedirs(tmpdir, mode=0o700, exist_ok=True)
    cgroup, home_cgroup = "", limits.own_cgroup()
    base = limits.delegated_cgroup(home_cgroup)
    if base:
        try:
            # The procwrap moves in itself (the job's controller counts with it):
            # each step it starts is born there, whichever way it is started.
            cgroup = limits.enter_job_cgroup(
                base, row.id, settings.max_job_memory, settings.max_job_processes
            )
        except OSError:
            cgroup = ""  # then the rlimit holds memory
    policy = sandbox.Policy(
        read=tuple(reads),
        write=(project, tmpdir),
        confine=settings.sandbox == "on",
        netns=netns,
        limits=sandbox.Limits(
            output_bytes=settings.max_output_bytes,
            memory_bytes=settings.max_job_memory,
            processes=settings.max_job_processes,
            cgroup=cgroup,
        ),
    )
    try:
        box = sandbox.Box.build(policy)
    except sandbox.SandboxError:
        import shutil  # here, not at the top: it pulls bz2 and lzma into the fork server

        shutil.rmtree(tmpdir, ignore_errors=True)
        limits.remove_job_cgroup(cgroup)
        raise
    env_in = row.env or {}
    bin_dir = env_in.get("PATH", "").split(":")[0] or os.path.dirname(row.steps[0]["path"])
    env = sandbox.clean_env(bin_dir=bin_dir, raypath=env_in.get("RAYPATH", "."), tmpdir=tmpdir)
    return JobBox(box, env, tmpdir, cgroup, home_cgroup)
