"""``rayfront``: submit Radiance simulations from a project directory to a rayserver.

    rayfront hosts                      servers of the hosts file, and whether they answer
    rayfront submit [opts] -- rad x.rif queue a job (any Radiance program after --)
    rayfront run [opts] -- rad x.rif    submit, follow with a progress bar, exit with its status
    rayfront run --hosts A,B|all ...    split rpict/rtrace/rcontrib/rfluxmtx/rad across servers
    rayfront status [ID]                table of jobs, or one job
    rayfront log [-f] ID                a job's log (follow it with -f)
    rayfront cancel ID                  cancel a queued or running job
    rayfront receipt ID                 a finished job's receipt: what ran, on what, what came out
    rayfront reproduce ID [--host H]    run it again (inputs checked first), compare the outputs
    rayfront token new                  write a fresh random shared token file
    rayfront token new --user NAME      a named token (--role admin for an admin)
    rayfront token list | revoke NAME   named tokens: who, role, created; remove one
    rayfront shim DIR [--hosts A,B|all] one script per Radiance program: runs it on a server
    rayfront demo                       render the example project through a temporary server

``--json`` on every command prints machine-readable output (errors too, as
``{"error": ..., "status": ...}``). Imports stay lazy: ``rayfront status``
must start in well under 150 ms. The commands are here; the argument parser
is in ``options``, the job request in ``jobrequest``, the printing in
``output``, submitting and following one job in ``runjob``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rayserver.client.connection import EXIT_LOCAL_ONLY, EXIT_USAGE, ClientError
from rayserver.client.context import Context, Project
from rayserver.client.jobrequest import build_job, project_file
from rayserver.client.options import Parser, build_parser
from rayserver.client.output import job_details, job_table, print_json
from rayserver.common.states import JobState


def _run_streams(opts: argparse.Namespace, command: list[str]) -> tuple[str | None, str | None]:
    """``rayfront run``'s --stdin/--stdout with the defaults made explicit ('-': streamed).

    Like ssh: our standard input goes to the program unless it is a terminal
    (or /dev/null), its standard output comes back unless --stdout names a
    file (or --json holds our standard output; the JSON then goes to standard
    error if --stdout - is given). Not for rad: it names its own files, and its standard output is
    the command trail the progress is read from.
    """
    from rayserver.client.streams import stdin_has_data

    shell = opts.sh is not None or opts.script is not None
    if not shell and command and command[0] == "rad":
        if opts.stdin == "-":
            raise ClientError(
                "--stdin - does not apply to rad (it reads no input)", exit_code=EXIT_USAGE
            )
        return opts.stdin, opts.stdout
    stdin = opts.stdin if opts.stdin is not None else ("-" if stdin_has_data() else None)
    # --json keeps our standard output for the JSON unless --stdout - asks for the stream.
    stdout = opts.stdout if opts.stdout is not None else (None if opts.json else "-")
    return stdin, stdout


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
        print_json({"hosts": rows})
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
    job_request = _job_request(project, opts, command, opts.stdin, opts.stdout)
    client = ctx.client(opts.host)
    job = client.submit(job_request)
    if opts.json:
        print_json(job)
    else:
        print(
            f"job {job['id']} {job.get('state', JobState.QUEUED)} on {client.target.host}: "
            f"{job_request['name']}"
        )
    return 0


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
    job_request = _job_request(project, opts, command, stdin, stdout)
    from rayserver.client.runjob import run_and_follow

    code, _ = run_and_follow(
        ctx.client(opts.host), job_request, project.local_dir, json_mode=opts.json, quiet=opts.quiet
    )
    return code


def _job_request(
    project: Any, opts: argparse.Namespace, command: list[str], stdin: Any, stdout: Any
) -> dict[str, Any]:
    """The job of a submit or run: one program (after --), or a --sh / --script step."""
    if opts.sh is None and opts.script is None:
        return build_job(project, command, opts.name, opts.priority, stdin, stdout, opts.after)
    from rayserver.client.jobrequest import build_shell_job

    shell = ("sh", opts.sh) if opts.sh is not None else ("script", opts.script)
    return build_shell_job(
        project,
        shell,
        command,
        name=opts.name,
        priority=opts.priority,
        stdin=stdin,
        stdout=stdout,
        after=opts.after,
    )


def cmd_split(ctx: Context, opts: argparse.Namespace, command: list[str]) -> int:
    """``rayfront run --hosts``: one simulation split across servers, merged here."""
    from rayserver.client.splitrun import SplitRun, summary_lines

    if opts.host is not None:
        raise ClientError(
            "give --host (one server) or --hosts (a split run), not both", exit_code=EXIT_USAGE
        )
    if opts.sh is not None or opts.script is not None:
        raise ClientError(
            "--sh/--script run on one server; a split run (--hosts) cuts one rpict, rtrace, "
            "rcontrib, rfluxmtx or rad",
            exit_code=EXIT_USAGE,
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
    stdout = None if opts.stdout in (None, "-") else project_file(project, opts.stdout, "--stdout")
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
        print_json(result.summary)
    else:
        # The merged rays may have gone to standard output: the account goes to stderr then.
        out = sys.stdout if result.summary.get("output") else sys.stderr
        for line in summary_lines(result.summary, project.local_dir):
            print(line, file=out if not result.summary["error"] else sys.stderr)
    return result.exit_code


def _split_stdin(project: Project, given: str | None, program: str) -> str | None:
    """A split run's rays: a project file, or ``-`` for rayfront's own standard input.

    As ``ssh`` does (and rayfront run on one host), a standard input that is
    not a terminal nor /dev/null is the input (``--stdin -`` says so
    explicitly); only the grid programs read one.
    """
    from rayserver.client.splitplan import GRID_PROGRAMS
    from rayserver.client.streams import stdin_has_data

    if given == "-" or (given is None and program in GRID_PROGRAMS and stdin_has_data()):
        return "-"
    return project_file(project, given, "--stdin") if given else None


def cmd_status(ctx: Context, opts: argparse.Namespace) -> int:
    client = ctx.client(opts.host)
    if opts.id is not None:
        job = client.job(opts.id)
        if opts.json:
            print_json(job)
        else:
            print(job_details(job))
        return 0
    states = [s.strip() for s in opts.state.split(",") if s.strip()] if opts.state else None
    if opts.limit < 1:
        raise ClientError(f"--limit must be at least 1, got {opts.limit}", exit_code=EXIT_USAGE)
    page = client.jobs(states, opts.limit)
    if opts.json:
        print_json(page)
    elif not page.get("jobs"):
        print(f"no jobs on {client.target.host}")
    else:
        print(job_table(page["jobs"]))
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
        print_json(
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
        print_json(job)
    elif job.get("state") == JobState.CANCELLED:
        print(f"job {opts.id} cancelled")
    else:
        print(
            f"job {opts.id}: cancel requested (state {job.get('state')}; "
            "it becomes 'cancelled' when its processes have ended)"
        )
    return 0


def cmd_shim(ctx: Context, opts: argparse.Namespace) -> int:
    from rayserver.client.shimwrite import write_shims

    radiance_bin, names = write_shims(ctx, opts.dir, opts.host, opts.hosts)
    where = (
        f"split over {opts.hosts}"
        if opts.hosts
        else f"on {opts.host or 'the first server of the hosts file'}"
    )
    if opts.json:
        print_json({"dir": str(opts.dir), "radiance_bin": str(radiance_bin), "programs": names})
    else:
        print(
            f"wrote {len(names)} shims to {opts.dir} for the programs of {radiance_bin}; "
            f"they run {where}. Put the folder first on PATH, e.g.\n"
            f'  export PATH="{opts.dir.resolve()}:$PATH"'
        )
    return 0


def cmd_token(ctx: Context, opts: argparse.Namespace) -> int:
    if opts.action != "new" or opts.user is not None:
        from rayserver.client.tokencmd import named_token_command

        return named_token_command(ctx, opts, print_json)
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
        print_json({"token_file": str(path), "mode": "0640", "hint": hint})
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
    Parser.json_errors = "--json" in own
    opts = parser.parse_args(own)
    if not hasattr(opts, "host"):
        opts.host = None
    ctx = Context()
    _set_title(ctx, argv)
    try:
        if opts.command in ("submit", "run"):
            if opts.sh is not None and opts.script is not None:
                raise ClientError("give --sh or --script, not both", exit_code=EXIT_USAGE)
            if command is None and (opts.sh is not None or opts.script is not None):
                command = []
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
        if opts.command in ("receipt", "reproduce"):
            from rayserver.client import reproduce

            run = reproduce.cmd_receipt if opts.command == "receipt" else reproduce.cmd_reproduce
            return run(ctx, opts)
        if opts.command == "demo":
            from rayserver.client.demo import run_demo

            return run_demo(opts.home, opts.out, json_mode=opts.json)
        handler = {
            "hosts": cmd_hosts,
            "status": cmd_status,
            "log": cmd_log,
            "cancel": cmd_cancel,
            "token": cmd_token,
            "shim": cmd_shim,
        }[opts.command]
        return handler(ctx, opts)
    except ClientError as exc:
        if opts.json:
            print_json(exc.as_json())
        print(f"rayfront: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        if opts.json and not getattr(exc, "json_reported", False):
            print_json({"error": "interrupted", "status": None})
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
