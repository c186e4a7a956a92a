"""The box around every job step: Landlock, seccomp, rlimits, a clean environment.

A :class:`Box` is built once per job in the procwrap (which stays outside:
it writes the job database and the log) and applied to each step's process
as it starts (:meth:`Box.spawn`), so the step and everything it starts
(rad -> sh -> rpict, oconv -> ``!xform``) inherit it and cannot leave it:

- Landlock: read and execute the system folders, the Radiance folders and
  the project; write the project and the job's private TMPDIR; no TCP;
  abstract unix sockets and signals scoped to the box (ABI 6);
- seccomp: no ``socket()`` at all, no io_uring, no key rings;
- no_new_privs, and no capabilities when the server runs as root;
- rlimits: file size, address space, no core files (hard = soft);
- a network namespace on top where it is cheap (see below);
- an environment built from scratch (:func:`clean_env`).

Two ways to start a step, the same confinement:

- **from a thread** (the default): Landlock domains, seccomp filters,
  no_new_privs and capabilities belong to a thread, and a child inherits
  the thread that started it. A short-lived thread of the procwrap confines
  itself and ``posix_spawn`` s (vfork + exec) the step through util-linux's
  ``prlimit``, which sets the rlimits on itself and execs the program. The
  procwrap's main thread stays unconfined. No fork of the procwrap: ~3 ms
  of cpu less per step than the other way (bench/sandbox.py). As root the
  thread also takes a new network namespace; as another user it cannot (a
  user namespace needs a single-threaded process), and seccomp alone keeps
  the network away, which it does completely.
- **forked** (no ``prlimit`` here): the procwrap forks, the child confines
  itself (with a user + network namespace where this user may make one,
  and RLIMIT_NPROC counted in it), then execs. A failure before the exec
  comes back through a close-on-exec pipe.

Either way a step that cannot be confined does not run (fail closed).
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
from dataclasses import dataclass, field
from typing import Any

from rayserver.jobs.procwrap import kernel, landlock, seccomp

# Read and execute: what programs need to load and run (the dynamic loader, libc,
# sh and the usual tools). /etc is not granted whole: it may hold a TLS key.
SYSTEM_READ = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/ld.so.preload",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/locale.alias",
    "/etc/alternatives",
    "/etc/mime.types",
)
DEVICES_RW = ("/dev/null", "/dev/zero", "/dev/full")
DEVICES_R = ("/dev/urandom", "/dev/random")
PRLIMIT = next((p for p in ("/usr/bin/prlimit", "/bin/prlimit") if os.access(p, os.X_OK)), "")


class SandboxError(Exception):
    """The box cannot be built or a step cannot be started in it; the message says why."""


@dataclass(frozen=True)
class Limits:
    """Per-step resource limits (0 = none)."""

    output_bytes: int = 0  # RLIMIT_FSIZE
    memory_bytes: int = 0  # RLIMIT_AS (unless a cgroup holds the job's memory)
    processes: int = 0  # RLIMIT_NPROC inside a step's own user namespace (forked, non-root)
    cgroup: str = ""  # the job's cgroup v2 folder; "" = rlimits for memory


@dataclass(frozen=True)
class Policy:
    """What one job's steps may touch."""

    read: tuple[str, ...]  # folders (or files) to read and execute
    write: tuple[str, ...]  # folders to read and write (the project, the private TMPDIR)
    confine: bool = True  # False: sandbox = "off" (limits and clean environment only)
    netns: bool = True  # a network namespace too, where it comes cheap
    limits: Limits = field(default_factory=Limits)
    threaded: bool = True  # start steps from a thread (needs prlimit), else by fork


def clean_env(*, bin_dir: str, raypath: str, tmpdir: str) -> dict[str, str]:
    """A step's whole environment: nothing of the server's is passed on.

    LANG is C.UTF-8: Radiance writes numbers with printf, and a locale with
    a decimal comma would change its output.
    """
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "RAYPATH": raypath,
        "LANG": "C.UTF-8",
        "TMPDIR": tmpdir,
        "HOME": tmpdir,
    }


def rlimits(limits: Limits) -> list[tuple[int, int]]:
    """(resource, value) pairs of a step: no core files, file size, memory."""
    out = [(resource.RLIMIT_CORE, 0)]
    if limits.output_bytes:
        out.append((resource.RLIMIT_FSIZE, limits.output_bytes))
    if limits.memory_bytes and not limits.cgroup:
        out.append((resource.RLIMIT_AS, limits.memory_bytes))
    # Never above the hard limit the server already has (raising it needs root).
    return [(r, _below_hard(r, v)) for r, v in out]


def _below_hard(res: int, value: int) -> int:
    hard = resource.getrlimit(res)[1]
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


_PRLIMIT_NAMES = {resource.RLIMIT_CORE: "core", resource.RLIMIT_FSIZE: "fsize"}
_PRLIMIT_NAMES[resource.RLIMIT_AS] = "as"


@dataclass
class Box:
    """A built policy, ready to start steps (one per job, in the procwrap)."""

    policy: Policy
    ruleset: landlock.Ruleset | None = None
    filter: seccomp.Filter | None = None
    netns: bool = False
    threaded: bool = False
    uid: int = field(default_factory=os.geteuid)
    gid: int = field(default_factory=os.getegid)

    @classmethod
    def build(cls, policy: Policy) -> Box:
        """Make the ruleset and the filter; SandboxError when the kernel cannot confine."""
        box = cls(policy, threaded=policy.threaded and bool(PRLIMIT))
        if not policy.confine:
            return box
        try:
            box.ruleset = landlock.Ruleset()
            for path in policy.read:
                box.ruleset.allow(path, landlock.READ)
            for path in ETC_FILES:
                box.ruleset.allow(path, landlock.FS_READ_FILE | landlock.FS_READ_DIR)
            for path in DEVICES_RW:
                box.ruleset.allow(path, landlock.FS_READ_FILE | landlock.FS_WRITE_FILE)
            for path in DEVICES_R:
                box.ruleset.allow(path, landlock.FS_READ_FILE)
            for path in policy.write:
                if not box.ruleset.allow(path, landlock.WRITE):
                    raise SandboxError(f"folder {path} is missing: the box cannot grant it")
            box.filter = seccomp.Filter(deny_truncate=not box.ruleset.covers_truncate)
        except (OSError, seccomp.SeccompError) as exc:
            box.close()
            raise SandboxError(f"cannot build the sandbox: {exc}") from exc
        if policy.netns:
            box.netns = os.geteuid() == 0 if box.threaded else kernel.userns_available()
        return box

    @property
    def mechanism(self) -> str:
        if self.ruleset is None:
            return "none"
        parts = [f"landlock-{self.ruleset.abi}", "seccomp"]
        if self.netns:
            parts.append("netns")
        return "+".join(parts)

    def close(self) -> None:
        if self.ruleset is not None:
            self.ruleset.close()

    # --- starting a step ------------------------------------------------------

    def spawn(
        self,
        argv: list[str],
        *,
        cwd: str,
        env: dict[str, str],
        stdin_fd: int | None,
        stdout_fd: int,
        stderr_fd: int,
    ) -> int:
        """Start ``argv`` in the box as the leader of a new process group; its pid.

        stdin is /dev/null when ``stdin_fd`` is None. Raises SandboxError
        (nothing ran) when the confinement or the start failed, e.g.
        ``exec <program>: No such file or directory``. No descriptor of the
        procwrap above 2 reaches the step (close_fds).
        """
        if not os.access(argv[0], os.X_OK):
            raise SandboxError(f"exec {argv[0]}: {_why_not_executable(argv[0])}")
        if self.threaded:
            return self._spawn_from_thread(argv, cwd, env, stdin_fd, stdout_fd, stderr_fd)
        return self._spawn_forked(argv, cwd, env, stdin_fd, stdout_fd, stderr_fd)

    def _spawn_from_thread(
        self,
        argv: list[str],
        cwd: str,
        env: dict[str, str],
        stdin_fd: int | None,
        stdout_fd: int,
        stderr_fd: int,
    ) -> int:
        _no_inherited_fds()
        os.chdir(cwd)  # (process-wide: every path of the procwrap is absolute)
        wrapped = [
            PRLIMIT,
            *(f"--{_PRLIMIT_NAMES[r]}={v}:{v}" for r, v in rlimits(self.policy.limits)),
        ]
        wrapped += ["--", *argv]
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) if stdin_fd is None else None
        actions: list[tuple[Any, ...]] = [
            (os.POSIX_SPAWN_DUP2, stdin_fd if null is None else null, 0),
            (os.POSIX_SPAWN_DUP2, stdout_fd, 1),
            (os.POSIX_SPAWN_DUP2, stderr_fd, 2),
        ]
        result: dict[str, Any] = {}

        def confined() -> None:
            try:
                self.enter_thread()
                result["pid"] = os.posix_spawn(
                    PRLIMIT,
                    wrapped,
                    env,
                    file_actions=actions,
                    setpgroup=0,
                    setsigdef=kernel.DEFAULT_SIGNALS,
                    setsigmask=(),
                )
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result["error"] = exc

        thread = threading.Thread(target=confined, name="box-spawn")
        try:
            thread.start()
            thread.join()
        finally:
            if null is not None:
                os.close(null)
        if "error" in result:
            exc = result["error"]
            raise SandboxError(str(exc) if isinstance(exc, SandboxError) else f"start: {exc}")
        return int(result["pid"])

    def enter_thread(self) -> None:
        """Confine the calling thread (it only starts steps, then ends); SandboxError if not."""
        stage = "no_new_privs"
        try:
            if self.ruleset is None:
                return
            kernel.no_new_privs()
            if self.netns:
                stage = "network namespace"
                kernel.unshare_net()
            if os.geteuid() == 0:
                stage = "capabilities"
                kernel.drop_capabilities()
            stage = "landlock"
            self.ruleset.restrict_self()
            stage = "seccomp"
            assert self.filter is not None
            self.filter.install()
        except OSError as exc:
            raise SandboxError(f"sandbox ({stage}): {exc}") from exc

    def _spawn_forked(
        self,
        argv: list[str],
        cwd: str,
        env: dict[str, str],
        stdin_fd: int | None,
        stdout_fd: int,
        stderr_fd: int,
    ) -> int:
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.fork()
        except OSError:
            os.close(err_r)
            os.close(err_w)
            raise
        if pid == 0:  # pragma: no cover - the child; reports through err_w
            os.close(err_r)
            self._child(argv, cwd, env, stdin_fd, stdout_fd, stderr_fd, err_w)
        os.close(err_w)
        with contextlib.suppress(OSError):  # (the child may have exec'd already)
            os.setpgid(pid, pid)
        try:
            report = kernel.read_all(err_r)
        finally:
            os.close(err_r)
        if report:
            os.waitpid(pid, 0)
            raise SandboxError(report.decode("utf-8", "replace"))
        return pid

    def _child(
        self,
        argv: list[str],
        cwd: str,
        env: dict[str, str],
        stdin_fd: int | None,
        stdout_fd: int,
        stderr_fd: int,
        err_w: int,
    ) -> None:
        stage = "start"
        try:
            kernel.reset_signals()
            os.setpgid(0, 0)
            stage = "standard streams"
            if stdin_fd is None:
                stdin_fd = os.open(os.devnull, os.O_RDONLY)
            os.dup2(stdin_fd, 0)
            os.dup2(stdout_fd, 1)
            os.dup2(stderr_fd, 2)
            stage = f"working directory {cwd}"
            os.chdir(cwd)
            self.enter()
            # No descriptor of the procwrap reaches the step (close_fds); err_w
            # is close-on-exec and reports a failed exec.
            os.closerange(3, err_w)
            os.closerange(err_w + 1, 1 << 20)
            stage = f"exec {argv[0]}"
            os.execve(argv[0], argv, env)
        except BaseException as exc:  # noqa: BLE001 - anything: report and end
            text = f"{stage}: {exc}" if not isinstance(exc, SandboxError) else str(exc)
            with contextlib.suppress(OSError):
                os.write(err_w, text.encode("utf-8", "replace")[:4000])
        finally:
            os._exit(127)

    def enter(self) -> None:
        """Confine the calling process (a forked child): limits, namespaces, Landlock, seccomp.

        Raises SandboxError naming the stage that failed. Irreversible.
        """
        stage = "limits"
        try:
            for res, value in rlimits(self.policy.limits):
                resource.setrlimit(res, (value, value))
            limit = self.policy.limits.processes
            if self.ruleset is None:
                return
            if self.netns:
                stage = "user and network namespace"
                kernel.enter_userns_netns(self.uid, self.gid)
                if limit and os.geteuid() != 0:
                    # Counted per user namespace (Linux 5.14+): in the step's own
                    # namespace this counts its processes, not all of the user's.
                    resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
            if os.geteuid() == 0:
                stage = "capabilities"
                kernel.drop_capabilities()
            stage = "no_new_privs"
            kernel.no_new_privs()
            stage = "landlock"
            self.ruleset.restrict_self()
            stage = "seccomp"
            assert self.filter is not None
            self.filter.install()
        except (OSError, ValueError) as exc:
            raise SandboxError(f"sandbox ({stage}): {exc}") from exc


def _why_not_executable(path: str) -> str:
    if not os.path.exists(path):
        return "No such file or directory"
    return "Permission denied (not an executable file)"


def _no_inherited_fds() -> None:
    """Every descriptor above 2 close-on-exec (posix_spawn has no close_fds)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # (the listing's own descriptor is gone)
                if os.get_inheritable(fd):
                    os.set_inheritable(fd, False)


def netns_available() -> bool:
    """Would a box get a network namespace here (as the policy's default asks)?"""
    return os.geteuid() == 0 if PRLIMIT else kernel.userns_available()


def inside(path: str, folder: str) -> bool:
    """True when ``path`` is ``folder`` or lies beneath it (both resolved)."""
    return _within(os.path.realpath(path), os.path.realpath(folder))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def exposed(granted: list[str] | tuple[str, ...], secrets: list[str]) -> list[tuple[str, str]]:
    """(granted folder, secret) pairs where a grant would reach a secret path."""
    # Each path resolved once (not once per pair: ~100 realpath calls a job).
    real = {p: os.path.realpath(p) for p in (*granted, *secrets) if p}
    return [(g, s) for g in granted for s in secrets if s and _within(real[s], real[g])]
