"""The start-up probe: is the sandbox usable here, for real?

Before the server serves, it builds a box around a throw-away folder and
runs a child in it that must be able to write inside, must be refused a
write next to it and a socket, and must still exec ``/bin/true``. Anything
less and the server refuses to start (fail closed), naming what is missing
and the setting ``sandbox = "off"``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import tempfile
from dataclasses import dataclass, field

from rayserver.jobs.procwrap import kernel, landlock, limits, sandbox, seccomp

TRUE = ("/bin/true", "/usr/bin/true")


@dataclass(frozen=True)
class ProbeResult:
    """What the probe found: usable or not, and the mechanism in words."""

    ok: bool
    mechanism: str  # e.g. "landlock-7+seccomp+netns"; "none" when not usable
    landlock_abi: int
    netns: bool
    memory_limit: str  # "cgroup" or "rlimit"
    problems: list[str] = field(default_factory=list)

    def info(self, mode: str) -> dict[str, object]:
        """The ``sandbox`` object of GET /v1/info."""
        return {
            "mode": mode,
            "mechanism": self.mechanism if mode == "on" else "none",
            "landlock_abi": self.landlock_abi,
            "network_namespace": self.netns and mode == "on",
            "memory_limit": self.memory_limit,
        }


_last: ProbeResult | None = None


def startup() -> ProbeResult:
    """The probe at server start; kept, so a worker forked later reports the same."""
    global _last
    _last = probe()
    return _last


def current() -> ProbeResult:
    """The start-up probe's result (probing now if there was none)."""
    return _last if _last is not None else startup()


def refusal(result: ProbeResult, settings_file: str) -> str:
    """The start-up refusal: what is missing, and the way out."""
    return (
        "rayserver: cannot start: this machine cannot confine jobs ("
        + "; ".join(result.problems)
        + "). Every job would run with all the rights of the server's user. Fix the "
        f'kernel (see docs/security.md), or set sandbox = "off" in {settings_file} to run '
        "jobs unconfined anyway"
    )


def probe(*, netns: bool = True) -> ProbeResult:
    """Build a box and try it: a write inside, a refused write outside, a refused socket."""
    abi = landlock.abi_version()
    memory = "cgroup" if limits.delegated_cgroup() else "rlimit"
    problems = []
    if abi < 1:
        problems.append(landlock.why_unavailable())
    if not seccomp.available():
        problems.append(f"kernel {os.uname().release} has no seccomp filters")
    if problems:
        return ProbeResult(False, "none", abi, False, memory, problems)
    base = tempfile.mkdtemp(prefix="rayserver-probe-")
    try:
        inside, outside = os.path.join(base, "in"), os.path.join(base, "out")
        os.mkdir(inside)
        os.mkdir(outside)
        policy = sandbox.Policy(read=sandbox.SYSTEM_READ, write=(inside,), netns=netns)
        try:
            box = sandbox.Box.build(policy)
        except sandbox.SandboxError as exc:
            return ProbeResult(False, "none", abi, False, memory, [str(exc)])
        try:
            failure = _try_box(box, inside, outside) or _try_spawn(box, inside, outside)
        finally:
            box.close()
        if not failure and os.listdir(outside):
            failure = "a write outside the box left a file behind"
    finally:
        import shutil  # here, not at the top: it pulls bz2 and lzma into the fork server

        shutil.rmtree(base, ignore_errors=True)
    if failure:
        return ProbeResult(False, "none", abi, False, memory, [failure])
    return ProbeResult(True, box.mechanism, abi, box.netns, memory)


def _try_box(box: sandbox.Box, inside: str, outside: str) -> str:
    """Run the checks in a confined child; '' when all held, else what failed."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        message = "the probe's child ended before its checks"
        try:
            box.enter()
            message = _checks(inside, outside)
            if not message:
                true = next((t for t in TRUE if os.path.exists(t)), TRUE[0])
                os.execv(true, [true])
        except BaseException as exc:  # noqa: BLE001 - report whatever it was
            message = str(exc)
        with contextlib.suppress(OSError):
            os.write(w, message.encode("utf-8", "replace")[:4000])
        os._exit(1)
    os.close(w)
    try:
        report = kernel.read_all(r).decode("utf-8", "replace")
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if report:
        return report
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        return f"/bin/true in the box did not succeed (wait status {status})"
    return ""


def _try_spawn(box: sandbox.Box, inside: str, outside: str) -> str:
    """A step started the way jobs start theirs: it writes inside and is refused outside."""
    script = f"echo x > {inside}/step; echo x > {outside}/step"
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    here = os.getcwd()
    try:
        pid = box.spawn(
            ["/bin/sh", "-c", script],
            cwd=inside,
            env={"PATH": "/usr/bin:/bin"},
            stdin_fd=None,
            stdout_fd=null,
            stderr_fd=null,
        )
        os.waitpid(pid, 0)
    except sandbox.SandboxError as exc:
        return f"a step could not be started in the box: {exc}"
    finally:
        os.close(null)
        os.chdir(here)
    if not os.path.exists(os.path.join(inside, "step")):
        return "a step in the box could not write inside it"
    if os.path.exists(os.path.join(outside, "step")):
        return "a step in the box wrote outside it: Landlock does not confine here"
    return ""


def _checks(inside: str, outside: str) -> str:
    """In the confined child: '' when the box holds, else the first thing that did not."""
    try:
        with open(os.path.join(inside, "probe"), "w") as fh:
            fh.write("inside\n")
    except OSError as exc:
        return f"a write inside the box was refused ({exc}): the box would stop every job"
    try:
        with open(os.path.join(outside, "probe"), "w") as fh:
            fh.write("outside\n")
        return "a write outside the box was allowed: Landlock does not confine here"
    except OSError as exc:
        if exc.errno != errno.EACCES:
            return f"a write outside the box failed with {exc}, not 'permission denied'"
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
        return "a socket could be made in the box: the seccomp filter does not hold"
    except OSError:
        return ""
