"""``rayfront``: submit Radiance simulations from a project directory to a rayserver.

    rayfront hosts                      servers of the hosts file, and whether they answer
    rayfront submit [opts] -- rad x.rif queue a job (any Radiance program after --)
    rayfront run [opts] -- rad x.rif    submit, follow with a progress bar, exit with its status
    rayfront run --hosts A,B|all ...    split rpict/rtrace/rcontrib/rfluxmtx/rad across servers
    rayfront status [ID]                table of jobs, or one job
    rayfront log [-f] ID                a job's log (follow it with -f)
    rayfront cancel ID                  cancel a queued or running job
    rayfront token new                  write a fresh random shared token file
    rayfront token new --user NAME      a named token (--role admin for an admin)
    rayfront token list | revoke NAME   named tokens: who, role, created; remove one
    rayfront demo                       render the example project through a temporary server

``--json`` on every command prints machine-readable output (errors too, as
``{"error": ..., "status": ...}``). Imports stay lazy: ``rayfront status``
must start in well under 150 ms.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from rayserver.client.connection import EXIT_LOCAL_ONLY, EXIT_USAGE, ClientError
from rayserver.client.context import Context, Project
from rayserver.common.states import JobState

# rad options that take a value (rad [-s][-n|-N npr][-t][-e][-V][-w][-v view][-o dev] rfile [VAR=val ..])
_RAD_VALUE_OPTIONS = {"-N", "-v", "-o"}


class _Parser(argparse.ArgumentParser):
    """argparse that also answers a usage error in JSON when --json was given."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if _Parser.json_errors:
            _print_json({"error": f"{self.prog}: {message}", "status": None})
        super().error(message)


def _common(json_default: Any = argparse.SUPPRESS) -> argparse.ArgumentParser:
    # SUPPRESS on the sub-parsers keeps `rayfront --json status` and `rayfront status --json` both working.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=json_default, help="machine-readable output"
    )
    common.add_argument(
        "--host",
        default=argparse.SUPPRESS if json_default is argparse.SUPPRESS else None,
        metavar="HOST",
        help="server: a host of the hosts file or ADDRESS[:PORT] "
        "(default: the first server in the hosts file)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rayfront",
        parents=[_common(False)],
        description="Run Radiance simulations on a rayserver from a project directory.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common()

    sub.add_parser(
        "hosts", parents=[common], help="servers of the hosts file and whether they answer"
    )

    for name, what in (
        ("submit", "queue a job and print its id"),
        ("run", "submit, follow with a progress bar, exit with the job's status"),
    ):
        p = sub.add_parser(
            name,
            parents=[common],
            help=what,
            usage=f"rayfront {name} [options] -- PROGRAM [ARGS ...]",
        )
        p.add_argument("--name", help="a name for the job (default: the command)")
        p.add_argument(
            "--priority", type=_priority, default=0, help="-100..100, higher runs first (default 0)"
        )
        if name == "run":
            p.add_argument(
                "--stdin",
                metavar="FILE|-",
                help="project file the program reads as input; '-': our standard input "
                "(the default when it is not a terminal)",
            )
            p.add_argument(
                "--stdout",
                metavar="FILE",
                help="project file the program's output goes to; '-': our standard output, "
                "as it runs (the default, except with --json)",
            )
        else:
            p.add_argument("--stdin", metavar="FILE", help="project file the program reads")
            p.add_argument("--stdout", metavar="FILE", help="project file for the program's output")
        p.add_argument(
            "--after",
            type=_job_ids,
            action="extend",
            metavar="ID[,ID...]",
            help="start only when these jobs of the same server are done; cancelled "
            "when one of them fails or is cancelled",
        )
        if name == "run":
            p.add_argument("--quiet", "-q", action="store_true", help="no log lines, only the bar")
            p.add_argument(
                "--hosts",
                metavar="A,B|all",
                help="split one rpict, rtrace, rcontrib, rfluxmtx or rad across these "
                "servers of the hosts file ('all': every server with cpus > 0 that "
                "answers) and merge the result",
            )
            p.add_argument(
                "--parts",
                type=_positive_int,
                metavar="N",
                help="with --hosts: number of parts (default: one per cpu for rays, "
                "two per cpu for a picture)",
            )
            p.add_argument(
                "--lost-after",
                type=_seconds_arg,
                default=15.0,
                metavar="SECS",
                help="with --hosts: give a server up after it has not answered for "
                "this long, and re-run its parts elsewhere (default 15)",
            )

    p = sub.add_parser("status", parents=[common], help="table of jobs, or one job")
    p.add_argument("id", nargs="?", type=_job_id, help="job id")
    p.add_argument("--state", help="comma-separated states, e.g. queued,running")
    p.add_argument("--limit", type=int, default=30, help="at most this many jobs (default 30)")

    p = sub.add_parser("log", parents=[common], help="a job's log")
    p.add_argument("id", type=_job_id, help="job id")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")

    p = sub.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    p.add_argument("id", type=_job_id, help="job id")

    p = sub.add_parser("token", parents=[common], help="manage the shared and named tokens")
    p.add_argument(
        "action",
        choices=["new", "list", "revoke"],
        help="new: rotate the shared token, or with --user make a named one; "
        "list: the named tokens; revoke NAME: remove one",
    )
    p.add_argument("name", nargs="?", help="revoke: the user whose token is removed")
    p.add_argument("--user", help="new: a named token for this user (default: the shared token)")
    p.add_argument(
        "--role",
        choices=["user", "admin"],
        help="new --user: 'admin' may cancel and read every job (default 'user')",
    )

    p = sub.add_parser("demo", parents=[common], help="render the example project end to end")
    p.add_argument(
        "--home", type=Path, help="installation directory to create (default: a temp dir)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("demo-out"),
        help="folder for the picture and PNG (default ./demo-out)",
    )
    return parser


def _priority(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number -100..100, got {text!r}"
        ) from None
    if not -100 <= value <= 100:
        raise argparse.ArgumentTypeError(f"expected -100..100, got {value}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds between 0 and 3600, got {text!r}")
    return value


def _job_ids(text: str) -> list[int]:
    words = [w.strip() for w in text.split(",")]
    bad = [w for w in words if not (w.isdigit() and w.isascii() and int(w) >= 1)]
    if bad or not words:
        raise argparse.ArgumentTypeError(
            f"expected job ids separated by commas (e.g. 12,13), got {text!r}"
        )
    return [int(w) for w in words]


def _job_id(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a job id (a whole number >= 1), got {text!r}")
    return int(text)


# Building the job request.
def _project_file(project: Project, text: str, what: str) -> str:
    """A file named on the command line, as a path relative to the project directory."""
    path = Path(text)
    absolute = path if path.is_absolute() else project.local_dir / path
    # Compare without resolving symlinks of the file itself: it may not exist yet (stdout).
    parent = absolute.parent.resolve()
    base = project.local_dir.resolve()
    if parent != base and base not in parent.parents:
        raise ClientError(
            f"{what} {text!r} is outside the project directory {project.local_dir}; "
            "expected a file inside it",
            exit_code=EXIT_USAGE,
        )
    return (parent / absolute.name).relative_to(base).as_posix()


def _rad_request(args: list[str]) -> dict[str, Any] | None:
    """rad's arguments as the API's rad shortcut {rif, options}; None if it cannot say them.

    The shortcut runs ``rad <options> <rif>``, so VAR=value overrides (which rad
    only takes after the rif) cannot go through it: those return None and the
    command is sent as a plain step, run in the project directory like here.
    """
    rif = None
    options: list[str] = []
    overrides = False
    i = 0
    while i < len(args):
        word = args[i]
        if word in _RAD_VALUE_OPTIONS:
            if i + 1 >= len(args):
                raise ClientError(f"rad option {word} needs a value", exit_code=EXIT_USAGE)
            options += [word, args[i + 1]]
            i += 2
            continue
        if word.startswith("-"):
            options.append(word)
        elif rif is None:
            rif = word
        else:
            overrides = True
        i += 1
    if rif is None:
        raise ClientError(
            "rad needs a rif file, e.g. rayfront run -- rad scene.rif", exit_code=EXIT_USAGE
        )
    return None if overrides else {"rif": rif, "options": options}


def build_job(
    project: Project,
    command: list[str],
    name: str | None = None,
    priority: int = 0,
    stdin: str | None = None,
    stdout: str | None = None,
    after: list[int] | None = None,
) -> dict[str, Any]:
    """The POST /v1/jobs body for ``command`` run in ``project``."""
    if not command:
        raise ClientError(
            "no command: give the Radiance program and its arguments after '--', "
            "e.g. rayfront submit -- rad scene.rif",
            exit_code=EXIT_USAGE,
        )
    program = command[0]
    if "/" in program or not program:
        raise ClientError(
            f"program {program!r}: give a Radiance program's name (e.g. rpict), "
            "not a path; the server runs its own Radiance",
            exit_code=EXIT_USAGE,
        )
    job: dict[str, Any] = {
        "location": project.location,
        "project": project.path,
        "priority": priority,
        "name": name or " ".join(command)[:200],
    }
    if after:
        job["after"] = sorted(set(after))
    if program == "rad":
        if (stdin and stdin != "-") or stdout:
            raise ClientError(
                "--stdin/--stdout do not apply to rad (it names its own files)",
                exit_code=EXIT_USAGE,
            )
        rad = _rad_request(command[1:])
        if rad is not None:
            job["rad"] = rad
            return job
    job["steps"] = [
        {
            "program": program,
            "args": command[1:],
            "stdin": _redirect(project, stdin, "--stdin"),
            "stdout": _redirect(project, stdout, "--stdout"),
        }
    ]
    return job


STREAM = {"stream": True}


def _redirect(project: Project, given: str | None, what: str) -> str | dict[str, bool] | None:
    """``--stdin``/``--stdout``: a project file, ``-`` (streamed by rayfront run), or None."""
    if given == "-":
        return dict(STREAM)
    return _project_file(project, given, what) if given else None


def _run_streams(opts: argparse.Namespace, command: list[str]) -> tuple[str | None, str | None]:
    """``rayfront run``'s --stdin/--stdout with the defaults made explicit ('-': streamed).

    Like ssh: our standard input goes to the program unless it is a terminal
    (or /dev/null), its standard output comes back unless --stdout names a
    file (or --json holds our standard output; the JSON then goes to standard
    error if --stdout - is given). Not for rad: it names its own files, and its standard output is
    the command trail the progress is read from.
    """
    from rayserver.client.streams import stdin_has_data

    if command and command[0] == "rad":
        if opts.stdin == "-":
            raise ClientError(
                "--stdin - does not apply to rad (it reads no input)", exit_code=EXIT_USAGE
            )
        return opts.stdin, opts.stdout
    stdin = opts.stdin if opts.stdin is not None else ("-" if stdin_has_data() else None)
    # --json keeps our standard output for the JSON unless --stdout - asks for the stream.
    stdout = opts.stdout if opts.stdout is not None else (None if opts.json else "-")
    return stdin, stdout


# Output helpers.
def _print_json(data: Any, out: Any = None) -> None:
    out = out or sys.stdout
    json.dump(data, out, indent=2, sort_keys=True)
    out.write("\n")


def _when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "-"
    return time.strftime("%m-%d %H:%M:%S", time.localtime(ts))


def _job_table(jobs: list[dict[str, Any]]) -> str:
    header = ("ID", "STATE", "PROG", "PRIO", "USER", "SUBMITTED", "WALL", "EXIT", "NAME")
    rows = [header]
    for j in jobs:
        wall = j.get("wall_time")
        if not isinstance(wall, int | float) and isinstance(j.get("started_at"), int | float):
            wall = (j.get("ended_at") or time.time()) - j["started_at"]
        rows.append(
            (
                str(j.get("id")),
                _state_cell(j),
                f"{j.get('progress') or 0:.0f}%",
                str(j.get("priority", 0)),
                str(j.get("user") or "-"),
                _when(j.get("submitted_at")),
                f"{wall:.1f}s" if isinstance(wall, int | float) else "-",
                "-" if j.get("exit_status") is None else str(j["exit_status"]),
                str(j.get("name") or ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in rows
    )


def _state_cell(job: dict[str, Any]) -> str:
    """The state as the table shows it: ``*`` marks a cancel request, ``>`` what it waits for."""
    cell = str(job.get("state")) + ("*" if job.get("cancel_requested") else "")
    waiting = job.get("waiting_for") or []
    if waiting:
        cell += " >" + ",".join(map(str, waiting))
    return cell


def _job_details(job: dict[str, Any]) -> str:
    keys = (
        "id",
        "name",
        "state",
        "progress",
        "priority",
        "location",
        "project",
        "user",
        "client",
        "submitted_at",
        "started_at",
        "ended_at",
        "current_step",
        "step_count",
        "exit_status",
        "signal",
        "reason",
        "wall_time",
        "cpu_time",
        "max_rss_kb",
        "cancel_requested",
        "pid",
        "after",
        "waiting_for",
        "outputs",
    )
    lines = []
    for key in keys:
        value = job.get(key)
        if key.endswith("_at"):
            value = _when(value) if value is not None else "-"
        elif key == "outputs":
            value = ", ".join(value or []) or "-"
        elif key in ("after", "waiting_for"):
            value = ", ".join(map(str, value or [])) or "-"
        lines.append(f"{key:>16}: {'-' if value is None else value}")
    for n, step in enumerate(job.get("steps") or [], start=1):
        cmd = " ".join([step.get("program", "?"), *step.get("args", [])])
        for key, sign in (("stdin", "<"), ("stdout", ">")):
            if isinstance(step.get(key), dict):
                cmd += f" {sign} (streamed)"
            elif step.get(key):
                cmd += f" {sign} {step[key]}"
        lines.append(f"{'step ' + str(n):>16}: {cmd}")
    return "\n".join(lines)


# Commands.
def cmd_hosts(ctx: Context, opts: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from rayserver.client.connection import Client

    records = ctx.servers()
    if not records:
        raise ClientError(
            f"no servers (cpus > 0) in {ctx.layout.hosts_file}"
            if ctx.hosts is not None
            else f"no hosts file at {ctx.layout.hosts_file}: rayfront works locally only",
            exit_code=EXIT_LOCAL_ONLY,
        )
    token = None  # GET /v1/info needs no token

    def probe(rec: Any) -> dict[str, Any]:
        target = ctx.target(rec.name)
        row: dict[str, Any] = {
            "host": rec.name,
            "cpus": rec.cpus,
            "address": target.address,
            "port": target.port,
            "tls": target.ssl_context is not None,
            "locations": sorted(rec.locations),
        }
        try:
            info = Client(target, token, timeout=2.0).info(timeout=2.0)
            row.update(answering=True, info=info)
        except ClientError as exc:
            row.update(answering=False, error=str(exc))
        return row

    with ThreadPoolExecutor(max_workers=min(16, len(records))) as pool:
        rows = list(pool.map(probe, records))
    if opts.json:
        _print_json({"hosts": rows})
        return 0
    for row in rows:
        head = f"{row['host']:<20} cpus {row['cpus']:<4} {row['address']}:{row['port']}"
        if row["answering"]:
            info = row["info"]
            print(
                f"{head}  answering: rayserver {info.get('version', '?')}, "
                f"{info.get('running', '?')} running, {info.get('queued', '?')} queued"
            )
        else:
            print(f"{head}  not answering ({row['error'].rsplit('(', 1)[-1].rstrip(')')})")
    return 0


def cmd_submit(ctx: Context, opts: argparse.Namespace, command: list[str]) -> int:
    project = ctx.project()
    if "-" in (opts.stdin, opts.stdout):
        raise ClientError(
            "'-' (our standard input or output) needs rayfront run, which stays connected "
            "while the job runs; rayfront submit takes project files",
            exit_code=EXIT_USAGE,
        )
    job_request = build_job(
        project, command, opts.name, opts.priority, opts.stdin, opts.stdout, opts.after
    )
    client = ctx.client(opts.host)
    job = client.submit(job_request)
    if opts.json:
        _print_json(job)
    else:
        print(
            f"job {job['id']} {job.get('state', JobState.QUEUED)} on {client.target.host}: "
            f"{job_request['name']}"
        )
    return 0


def run_and_follow(
    client: Any,
    job_request: dict[str, Any],
    project_dir: Path | None,
    *,
    json_mode: bool,
    quiet: bool = False,
) -> tuple[int, dict[str, Any]]:
    """Submit, follow to the end and summarise; (exit code, final job). Shared with demo.

    A step with a streamed stdin/stdout (``{"stream": true}``) gets our
    standard input / gives its output on our standard output, as it runs;
    then every message (log, summary, the JSON) goes to standard error, and
    Ctrl-C cancels the job (nobody would read its output any more).
    """
    from rayserver.client.follow import follow, job_exit_code, summary_lines
    from rayserver.client.streams import StreamedRun

    has_in, has_out = (_streamed(job_request, key) for key in ("stdin", "stdout"))
    out = sys.stderr if has_out else sys.stdout
    job = client.submit(job_request)
    if not json_mode:
        print(
            f"job {job['id']} submitted to {client.target.host}: {job_request.get('name', '')}",
            file=sys.stderr,
        )
    streams = StreamedRun(client, int(job["id"]), stdin=has_in, stdout=has_out)
    streams.start()
    try:
        final = follow(
            client, job, show_log=not (json_mode or quiet), show_bar=not json_mode, out=out
        )
    except KeyboardInterrupt as exc:
        _interrupted(client, job, json_mode, exc, cancel=has_in or has_out)
        raise
    problems = streams.finish(final)
    if json_mode:
        _print_json(final, out)
    else:
        for line in summary_lines(final, project_dir):
            print(line, file=out)
    for problem in problems:
        print(f"rayfront: {problem}", file=sys.stderr)
    if streams.output_closed:
        print(f"rayfront: standard output closed; job {job['id']} stopped", file=sys.stderr)
        return 141, final  # 128 + SIGPIPE, as a shell reports a pipe's closed reader
    code = job_exit_code(final)
    return (code or 1) if problems else code, final


def _streamed(job_request: dict[str, Any], key: str) -> bool:
    return any(isinstance(s.get(key), dict) for s in job_request.get("steps") or [])


def _interrupted(
    client: Any, job: dict[str, Any], json_mode: bool, exc: KeyboardInterrupt, *, cancel: bool
) -> None:
    """Ctrl-C while following: a streamed job is cancelled, any other goes on."""
    where = client.target.host
    if cancel:
        try:
            client.cancel(int(job["id"]))
            message = f"interrupted; job {job['id']} on {where} cancelled"
        except ClientError as err:
            message = f"interrupted; cancelling job {job['id']} on {where} failed: {err}"
    else:
        message = (
            f"stopped following; job {job['id']} goes on on {where} "
            f"(rayfront cancel {job['id']} ends it)"
        )
    if json_mode:
        _print_json(
            {"error": message, "status": None, "id": job["id"]}, sys.stderr if cancel else None
        )
        exc.json_reported = True  # type: ignore[attr-defined]  # main() adds no second one
    print(f"\nrayfront: {message}", file=sys.stderr)


def cmd_run(ctx: Context, opts: argparse.Namespace, command: list[str]) -> int:
    if opts.hosts is not None:
        return cmd_split(ctx, opts, command)
    for option in ("parts",):
        if getattr(opts, option) is not None:
            raise ClientError(
                f"--{option} belongs to a split run: give --hosts too", exit_code=EXIT_USAGE
            )
    project = ctx.project()
    stdin, stdout = _run_streams(opts, command)
    job_request = build_job(project, command, opts.name, opts.priority, stdin, stdout, opts.after)
    code, _ = run_and_follow(
        ctx.client(opts.host), job_request, project.local_dir, json_mode=opts.json, quiet=opts.quiet
    )
    return code


def cmd_split(ctx: Context, opts: argparse.Namespace, command: list[str]) -> int:
    """``rayfront run --hosts``: one simulation split across servers, merged here."""
    from rayserver.client.splitrun import SplitRun, summary_lines

    if opts.host is not None:
        raise ClientError(
            "give --host (one server) or --hosts (a split run), not both", exit_code=EXIT_USAGE
        )
    if opts.after:
        raise ClientError(
            "--after names jobs of one server and does not apply to a split run (--hosts); "
            "wait for them first, e.g. with rayfront run --after ID on a small step",
            exit_code=EXIT_USAGE,
        )
    if not command:
        raise ClientError(
            "no command: give rpict, rtrace or rcontrib and its arguments after '--'",
            exit_code=EXIT_USAGE,
        )
    names = [n.strip() for n in opts.hosts.split(",") if n.strip()]
    if not names:
        raise ClientError(
            "--hosts: expected host names separated by commas, or 'all'", exit_code=EXIT_USAGE
        )
    explicit = names != ["all"]
    project = ctx.project()
    records = ctx.server_records(names if explicit else None)
    stdin = _split_stdin(project, opts.stdin, command[0])
    stdout = None if opts.stdout in (None, "-") else _project_file(project, opts.stdout, "--stdout")
    run = SplitRun(
        ctx,
        project,
        command,
        hosts=records,
        explicit_hosts=explicit,
        stdin=stdin,
        stdout=stdout,
        parts=opts.parts,
        name=opts.name,
        priority=opts.priority,
        json_mode=opts.json,
        quiet=opts.quiet,
        lost_after=opts.lost_after,
    )
    result = run.run()
    if opts.json:
        _print_json(result.summary)
    else:
        # The merged rays may have gone to standard output: the account goes to stderr then.
        out = sys.stdout if result.summary.get("output") else sys.stderr
        for line in summary_lines(result.summary, project.local_dir):
            print(line, file=out if not result.summary["error"] else sys.stderr)
    return result.exit_code


def _split_stdin(project: Project, given: str | None, program: str) -> str | None:
    """A split run's rays: a project file, or ``-`` for rayfront's own standard input.

    As ``ssh`` does, a standard input that is not a terminal is the input
    (``--stdin -`` says so explicitly); only the grid programs read one.
    """
    from rayserver.client.splitplan import GRID_PROGRAMS

    piped = sys.stdin is not None and not sys.stdin.isatty()
    if given == "-" or (given is None and program in GRID_PROGRAMS and piped):
        return "-"
    return _project_file(project, given, "--stdin") if given else None


def cmd_status(ctx: Context, opts: argparse.Namespace) -> int:
    client = ctx.client(opts.host)
    if opts.id is not None:
        job = client.job(opts.id)
        if opts.json:
            _print_json(job)
        else:
            print(_job_details(job))
        return 0
    states = [s.strip() for s in opts.state.split(",") if s.strip()] if opts.state else None
    if opts.limit < 1:
        raise ClientError(f"--limit must be at least 1, got {opts.limit}", exit_code=EXIT_USAGE)
    page = client.jobs(states, opts.limit)
    if opts.json:
        _print_json(page)
    elif not page.get("jobs"):
        print(f"no jobs on {client.target.host}")
    else:
        print(_job_table(page["jobs"]))
    return 0


def cmd_log(ctx: Context, opts: argparse.Namespace) -> int:
    client = ctx.client(opts.host)
    if opts.json:
        if opts.follow:
            text = b"".join(client.follow_log(opts.id))
            job = client.job(opts.id, wait=30)
        else:
            text = client.log(opts.id)
            job = client.job(opts.id)
        _print_json(
            {"id": opts.id, "state": job.get("state"), "log": text.decode("utf-8", "replace")}
        )
        return 0
    out = sys.stdout.buffer
    chunks = client.follow_log(opts.id) if opts.follow else [client.log(opts.id)]
    for chunk in chunks:
        out.write(chunk)
        out.flush()
    return 0


def cmd_cancel(ctx: Context, opts: argparse.Namespace) -> int:
    job = ctx.client(opts.host).cancel(opts.id)
    if opts.json:
        _print_json(job)
    elif job.get("state") == JobState.CANCELLED:
        print(f"job {opts.id} cancelled")
    else:
        print(
            f"job {opts.id}: cancel requested (state {job.get('state')}; "
            "it becomes 'cancelled' when its processes have ended)"
        )
    return 0


def cmd_token(ctx: Context, opts: argparse.Namespace) -> int:
    if opts.action != "new" or opts.user is not None:
        from rayserver.client.tokencmd import named_token_command

        return named_token_command(ctx, opts, _print_json)
    if opts.name is not None or opts.role is not None:
        raise ClientError(
            f"'rayfront token new' without --user rotates the shared token and takes no "
            f"{'name' if opts.name is not None else '--role'}; for a named token give --user NAME",
            exit_code=EXIT_USAGE,
        )
    from rayserver.common.credentials import CredentialsError, new_token

    path = ctx.settings.token_path(ctx.layout.default_token_file)
    if path is None:
        raise ClientError(
            f'tokens are switched off (token_file = "" in '
            f"{ctx.layout.settings_file}); nothing to write",
            exit_code=EXIT_USAGE,
        )
    try:
        new_token(path)
    except CredentialsError as exc:
        raise ClientError(str(exc)) from exc
    hint = (
        "a running rayserver uses the new token from its next request on (no reload "
        "needed); clients sharing this installation read it at their next command, "
        "others need the new token copied to them (or in RAYFRONT_TOKEN)"
    )
    if opts.json:
        _print_json({"token_file": str(path), "mode": "0640", "hint": hint})
    else:
        print(f"wrote a new token to {path} (mode 0640)")
        print(hint)
    return 0


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, command = _split_command(argv)
    parser = build_parser()
    _Parser.json_errors = "--json" in own
    opts = parser.parse_args(own)
    if not hasattr(opts, "host"):
        opts.host = None
    ctx = Context()
    _set_title(ctx, argv)
    try:
        if opts.command in ("submit", "run"):
            if command is None:
                raise ClientError(
                    f"expected the Radiance command after '--', e.g. "
                    f"rayfront {opts.command} -- rad scene.rif",
                    exit_code=EXIT_USAGE,
                )
            return (cmd_submit if opts.command == "submit" else cmd_run)(ctx, opts, command)
        if command is not None:
            raise ClientError(
                f"'rayfront {opts.command}' takes no command after '--'", exit_code=EXIT_USAGE
            )
        if opts.command == "demo":
            from rayserver.client.demo import run_demo

            return run_demo(opts.home, opts.out, json_mode=opts.json)
        handler = {
            "hosts": cmd_hosts,
            "status": cmd_status,
            "log": cmd_log,
            "cancel": cmd_cancel,
            "token": cmd_token,
        }[opts.command]
        return handler(ctx, opts)
    except ClientError as exc:
        if opts.json:
            _print_json(exc.as_json())
        print(f"rayfront: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        if opts.json and not getattr(exc, "json_reported", False):
            _print_json({"error": "interrupted", "status": None})
        return 130
    except BrokenPipeError:
        return 0


def _set_title(ctx: Context, argv: list[str]) -> None:
    try:
        from setproctitle import setproctitle
    except ImportError:  # a title is a convenience for `ps x`, never a reason to fail
        return
    setproctitle(" ".join([ctx.layout.editor_title, *argv]))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
