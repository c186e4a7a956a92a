"""The ``rayserver`` command: ``rayserver [-f | -d] [-u user] [-g group] [-m mask]``.

Parses the command line with the manual's messages, verbatim, then starts the
server in this order: umask, user/group lookup, configuration (hosts record
of this machine, settings), pid file check, log file, bind (with retries),
identity switch, detach (daemon mode), pid file, supervisor. Binding and the
identity switch happen before detaching, so their errors reach the shell.

Exit codes: 0 after a requested stop, 2 for a command-line error, 1 when the
server cannot start, the worker's own code when it fails while booting.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass

from rayserver.common.credentials import CredentialsError, ensure_token
from rayserver.common.hosts import HostsFileError
from rayserver.common.paths import Layout
from rayserver.common.settings import SettingsError
from rayserver.daemon.logsetup import LogFileError, LogSetup
from rayserver.server.confwatch import LiveConfig
from supervisor.core import Supervisor, WorkerTarget
from supervisor.daemon import PidFile, PidFileError, Readiness, detach
from supervisor.heartbeat import WorkerLink
from supervisor.identity import (
    Group,
    IdentityError,
    User,
    resolve_group,
    resolve_user,
    switch_identity,
)
from supervisor.sdnotify import SystemdWatchdog
from supervisor.sockets import BindError, bind_with_retries
from supervisor.util import announce, daemon_supported

log = logging.getLogger("rayserver")

NAME = "Rayserver"
RETRY_ENV = "RAYSERVER_BIND_RETRY_SECS"
BACKOFF_ENV = "RAYSERVER_RESTART_BACKOFF"
DEFAULT_RETRY_SECS = 30.0
BIND_ATTEMPTS = 3
PLATFORM_MESSAGE = "Daemon mode and user/group switching not available on this platform."

USAGE = """\
usage: rayserver [-f | -d] [-u user] [-g group] [-m mask]

   -f        run in foreground mode
   -d        run in background daemon mode (default)
             (-f and -d are mutually exclusive)
   -u user   run and create all files as username/UID
   -g group  run and create all files as groupname/GID
   -m mask   set the umask to mask (default 002)
   -h        show this help

Installation directory: $RAYFRONT_HOME (default ~/rayfront).
Signals: INT/TERM/QUIT stop the server, HUP reloads hosts and settings,
USR1 reopens the log file."""

_UMASK_RE = re.compile(r"^[0-7]{3}$")


class CliError(Exception):
    """A command-line error; the message is the manual's, verbatim."""


class HelpRequested(Exception):
    """-h / --help was given."""


@dataclass
class Options:
    """The parsed command line."""

    mode: str | None = None  # "f", "d", or None (daemon, the default)
    user: str | None = None
    group: str | None = None
    umask: int = 0o002

    @property
    def daemon(self) -> bool:
        return self.mode != "f"


def parse_args(argv: list[str]) -> Options:
    """Parse the arguments; raises CliError (manual's wording) or HelpRequested."""
    opts = Options()
    seen_umask = False
    args = list(argv)
    i = 0

    def value(option: str, what: str) -> str:
        # An option-like word after -u/-g/-m is a forgotten argument, not a name.
        if i + 1 >= len(args) or (args[i + 1].startswith("-") and len(args[i + 1]) > 1):
            raise CliError(f'Missing {what} after "{option}".')
        return args[i + 1]

    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            raise HelpRequested
        if arg in ("-f", "-d"):
            mine = arg[1]
            if opts.mode is not None and opts.mode != mine:
                raise CliError(f"-{opts.mode} and {arg} options are mutually exclusive.")
            opts.mode = mine
            i += 1
        elif arg == "-u":
            if opts.user is not None:
                raise CliError("Duplicate user name argument.")
            opts.user = value(arg, "user")
            i += 2
        elif arg == "-g":
            if opts.group is not None:
                raise CliError("Duplicate group name argument.")
            opts.group = value(arg, "group")
            i += 2
        elif arg == "-m":
            if seen_umask:
                raise CliError("Duplicate umask argument.")
            text = value(arg, "umask")
            if not _UMASK_RE.match(text):
                raise CliError("umask must be three digits between 0 and 7.")
            opts.umask = int(text, 8)
            seen_umask = True
            i += 2
        else:
            raise CliError(f'Unknown option "{arg}".')
    return opts


def _retry_secs() -> float:
    raw = os.environ.get(RETRY_ENV)
    if not raw:
        return DEFAULT_RETRY_SECS
    try:
        secs = float(raw)
    except ValueError:
        secs = -1.0
    if not 0 <= secs <= 3600:
        print(
            f"rayserver: {RETRY_ENV}={raw!r} is not a number of seconds between 0 and 3600; "
            f"using {DEFAULT_RETRY_SECS:g}",
            file=sys.stderr,
        )
        return DEFAULT_RETRY_SECS
    return secs


def _restart_backoff() -> dict[str, float]:
    """Worker restart delays from RAYSERVER_RESTART_BACKOFF="first,cap" (seconds), if set.

    Tests that crash the worker many times use it; without it the
    supervisor's defaults apply (0.25 s doubling up to 30 s).
    """
    raw = os.environ.get(BACKOFF_ENV)
    if not raw:
        return {}
    try:
        first, cap = (float(x) for x in raw.split(","))
    except ValueError:
        first = cap = -1.0
    if not 0 < first <= cap <= 3600:
        print(
            f"rayserver: {BACKOFF_ENV}={raw!r} is not 'first,cap' with 0 < first <= cap <= 3600 "
            "seconds; using the defaults",
            file=sys.stderr,
        )
        return {}
    return {"backoff_first": first, "backoff_cap": cap}


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(
    argv: list[str] | None = None, *, platform_ok: Callable[[], bool] = daemon_supported
) -> int:
    """Run the ``rayserver`` command; returns the exit code."""
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
    except HelpRequested:
        print(USAGE)
        return 0
    except CliError as exc:
        _err(str(exc))
        return 2

    if (opts.daemon or opts.user or opts.group) and not platform_ok():
        _err(PLATFORM_MESSAGE)
        if opts.mode == "d" or opts.user or opts.group:
            return 1
        opts.mode = "f"  # the default (daemon) is not possible here: run in the foreground

    os.umask(opts.umask)
    try:
        user: User | None = resolve_user(opts.user) if opts.user is not None else None
        group: Group | None = resolve_group(opts.group) if opts.group is not None else None
    except IdentityError as exc:
        _err(str(exc))
        return 1

    layout = Layout.current()
    try:
        config = LiveConfig(layout)
    except (HostsFileError, SettingsError) as exc:
        _err(f"rayserver: cannot start: {exc}")
        return 1

    pidfile = PidFile(layout.pid_file, NAME)
    try:
        pidfile.check()
    except PidFileError as exc:
        _err(f"rayserver: {exc}")
        return 1

    logs = LogSetup(layout.log_file, config.settings.log_level)
    logs.add_terminal()
    try:
        logs.open_file()
    except LogFileError as exc:
        _err(str(exc))
        if opts.daemon:
            _err(
                "rayserver: not starting in daemon mode without a log file "
                "(run with -f to see the messages on the terminal)"
            )
            return 1

    try:
        return _serve(opts, layout, config, pidfile, logs, user, group)
    except KeyboardInterrupt:
        announce(log, "*User Interrupt*", logging.WARNING)
        return 0


def _serve(
    opts: Options,
    layout: Layout,
    config: LiveConfig,
    pidfile: PidFile,
    logs: LogSetup,
    user: User | None,
    group: Group | None,
) -> int:
    settings = config.settings
    try:
        sock = bind_with_retries(
            settings.bind, settings.port, attempts=BIND_ATTEMPTS, delay=_retry_secs()
        )
    except BindError as exc:
        announce(log, str(exc), logging.CRITICAL)
        return 1
    announce(log, f"render_server: adding channel <render_server  at {id(sock)}>")

    if (user is not None or group is not None) and not _become(layout, config, logs, user, group):
        return 1
    if not _check_sandbox(layout, config):
        return 1
    # Before detaching: WATCHDOG_PID names the process systemd started.
    watchdog = SystemdWatchdog.from_env()
    readiness: Readiness | None = None
    if opts.daemon:
        readiness = detach(
            on_ready=lambda pid: f"{NAME} {pid} switching to daemon mode.",
            on_silence=f"rayserver: the background server stopped while starting; "
            f"see the log {layout.log_file}",
        )
        logs.remove_terminal()
    try:
        pidfile.acquire()
    except PidFileError as exc:
        if exc.pid is None and not opts.daemon:
            # In the foreground the pid file is a convenience, like the log file.
            log.warning("running without a pid file: %s", exc)
        else:
            announce(log, str(exc), logging.CRITICAL)
            if readiness is not None:
                readiness.fail(1, f"rayserver: {exc}")
            return 1
    try:
        code = _supervise(opts, layout, config, pidfile, logs, sock, readiness, watchdog)
    finally:
        pidfile.release()
        sock.close()
    if readiness is not None and readiness.pending:
        readiness.fail(
            code or 1,
            f"rayserver: the server stopped while starting (exit code "
            f"{code}); see the log {layout.log_file}",
        )
    log.info("%s %d stopped (exit code %d)", NAME, os.getpid(), code)
    return code


def _become(
    layout: Layout, config: LiveConfig, logs: LogSetup, user: User | None, group: Group | None
) -> bool:
    """Hand the files over and switch identity (-u/-g); False, once said why, if it failed."""
    uid = user.uid if user else -1
    gid = group.gid if group else user.gid  # type: ignore[union-attr]
    logs.chown(uid, gid)
    try:
        if os.geteuid() == 0:  # otherwise the switch itself fails, with the manual's message
            _hand_over(layout, config, uid, gid)
    except (CredentialsError, OSError) as exc:
        announce(log, f"rayserver: cannot start: {exc}", logging.CRITICAL)
        return False
    try:
        switch_identity(user, group, name=NAME)
    except IdentityError as exc:
        announce(log, str(exc), logging.CRITICAL)
        return False
    return True


def _supervise(
    opts: Options,
    layout: Layout,
    config: LiveConfig,
    pidfile: PidFile,
    logs: LogSetup,
    sock: socket.socket,
    readiness: Readiness | None,
    watchdog: SystemdWatchdog | None,
) -> int:
    """Run the supervisor loop with rayserver's hooks until it stops; its exit code."""
    port = sock.getsockname()[1]

    def on_ready(_worker: int, first: bool) -> None:
        if not first:
            return
        announce(log, f"render_server: Async Rayfront Server started on port {port}")
        if not opts.daemon:
            print(flush=True)
        announce(log, f"{NAME} {os.getpid()} running.")
        if readiness is not None:
            readiness.ready()

    def on_reload() -> None:
        if config.reload():
            logs.set_level(config.settings.log_level)

    def child_setup() -> None:
        pidfile.forget_in_child()
        if readiness is not None:
            readiness.close()

    timeout = config.settings.worker_timeout or None
    if watchdog is not None:
        log.info(
            "systemd watchdog: WATCHDOG=1 every %g s while the worker is healthy "
            "(WatchdogSec %g s, worker_timeout %s)",
            watchdog.interval,
            watchdog.timeout,
            f"{timeout:g} s" if timeout else "off",
        )
    sup = Supervisor(
        sock,
        _worker_target(layout),
        name=NAME,
        title=layout.server_title,
        worker_title=f"{layout.server_title} worker",
        on_ready=on_ready,
        on_reload=on_reload,
        on_reopen=logs.reopen,
        child_setup=child_setup,
        worker_timeout=timeout,
        watchdog=watchdog,
        **_restart_backoff(),
    )
    return sup.run()


def _check_sandbox(layout: Layout, config: LiveConfig) -> bool:
    """Fail closed: probe the job sandbox for real, as the server's final user, before serving.

    Also moves the server into its delegated cgroup subtree, where there is
    one, so job memory is limited by cgroups (rayserver.jobs.procwrap.limits).
    With ``sandbox = "off"`` it says so, loudly, at every start.
    """
    from rayserver.jobs.procwrap import boxprobe, limits

    cgroup = limits.setup_cgroup()
    if config.settings.sandbox == "off":
        announce(
            log,
            f'WARNING: sandbox = "off" in {layout.settings_file}: jobs run UNCONFINED, '
            "with every right of the server's user (its files, the token, the network)",
            logging.WARNING,
        )
        return True
    result = boxprobe.startup()
    if not result.ok:
        announce(log, boxprobe.refusal(result, str(layout.settings_file)), logging.CRITICAL)
        return False
    log.info(
        "job sandbox: %s; memory limit by %s%s",
        result.mechanism,
        result.memory_limit,
        f" ({cgroup})" if cgroup else "",
    )
    return True


def _hand_over(layout: Layout, config: LiveConfig, uid: int, gid: int) -> None:
    """Before the identity switch: make what the switched server cannot make itself.

    At boot the installation directory usually belongs to root. The state
    folder is created for the new user, and the default token file is created
    here (mode 0640) and given to the server's group, whose members (the
    users) and the switched server then read it.
    """
    for folder in (layout.state_dir, layout.jobs_dir):
        if not folder.exists():
            folder.mkdir(parents=True)
            os.chown(folder, uid, gid)
    if config.settings.token_file is None:
        token = layout.default_token_file
        existed = token.exists()
        ensure_token(layout, config.settings)
        if not existed:
            os.chown(token, -1, gid)


def _worker_target(layout: Layout) -> WorkerTarget:
    def target(sock: socket.socket, link: WorkerLink) -> int:
        # Imported in the worker only: the supervisor stays small and never serves.
        from rayserver.daemon.worker import run_worker

        return run_worker(sock, layout, link)

    return target
