"""A shim: one Radiance program run on a render host as if it ran here (``rayfront shim``).

``rayfront shim DIR`` writes one small Python script per Radiance program
into DIR (``#!python -IS``, see :mod:`rayserver.client.shimwrite`). With DIR
first on PATH, Honeybee, lbt-recipes, make and scripts run their Radiance
commands on the servers of the hosts file unchanged: same arguments, the
current directory translated through the hosts file, standard input and
output streamed, the program's messages on standard error, its exit status;
Ctrl-C and SIGTERM cancel the job.

Runs locally instead (the real binary of the Radiance bin folder, exec'd,
so a shim never calls itself): ``RAYFRONT_SHIM=off``; programs cheaper than
the round trip (:data:`LOCAL_PROGRAMS`, or the ``shim_local`` setting);
and, with one line on standard error saying why, a call from outside every
location of the hosts file, or with a file argument outside the project
(the current directory), which the server would refuse.

A script starts in :mod:`rayserver.client.shimfast`, which runs the command
in one exchange from the *plan* this module keeps; this module is the full
path, taken when there is no plan for the current directory yet, a file it
was made from changed, for rtrace, rcontrib and rfluxmtx through ``--hosts``
(they are split), for TLS and for a server older than ``POST /v1/jobs/run``
(then over five exchanges, as ``rayfront run`` does).
"""

from __future__ import annotations

import os
import signal
import sys

from rayserver.client.shimfast import (  # noqa: F401  (the shim's names, kept here too)
    LOCAL_PROGRAMS,
    OFF_WORDS,
    SPLIT_PROGRAMS,
    STDIN_ALWAYS,
    STDIN_WITHOUT_FILE,
    ShimOptions,
    caller_name,
    current_dir,
    exec_local,
    reads_stdin,
    run_in,
    save_plan,
    stamp,
    translate_args,
)

_FRAME_PREFIX = b"== "


def main(argv: list[str] | None = None) -> int:
    """The full path: settings, hosts file and project worked out (and kept in the plan)."""
    opts = ShimOptions(list(sys.argv[1:] if argv is None else argv))
    if os.environ.get("RAYFRONT_SHIM", "").strip().lower() in OFF_WORDS:
        exec_local(opts, None)
    from rayserver.client.connection import ClientError
    from rayserver.client.context import Context

    ctx = Context()
    stamps = [stamp(str(ctx.layout.settings_file)), stamp(str(ctx.layout.hosts_file))]
    try:
        local = ctx.settings.shim_local
        local = LOCAL_PROGRAMS if local is None else local
        if opts.program in local:
            _plan_quietly(ctx, opts, stamps, local)
            exec_local(opts, None)
        project, entry = _where(ctx)
        server = _plan_quietly(ctx, opts, stamps, local, entry)
        if project is None:
            exec_local(opts, entry[1])
    except ClientError as exc:
        exec_local(opts, str(exc))
    args, outside = translate_args(opts.args, project.local_dir)
    if outside:
        exec_local(opts, f"{outside} is outside the project {project.local_dir}")
    return run_remote(ctx, project, opts, args, server)


def _where(ctx):  # noqa: ANN001, ANN202
    """(the project, its plan entry); (None, ["local", why]) outside every location."""
    from rayserver.client.connection import EXIT_LOCAL_ONLY, ClientError

    try:
        project = ctx.project()
    except ClientError as exc:
        if exc.exit_code != EXIT_LOCAL_ONLY:
            raise
        return None, ["local", str(exc)]
    return project, ["remote", project.location, project.path, str(project.local_dir)]


def _plan_quietly(ctx, opts, stamps, local, entry=None) -> tuple | None:  # noqa: ANN001
    """:func:`remember`, or None when it cannot (the calls that follow say why, if they need)."""
    from rayserver.client.connection import ClientError

    try:
        return remember(ctx, opts, stamps, local, entry or _where(ctx)[1])
    except ClientError:
        return None


def remember(ctx, opts: ShimOptions, stamps: list, local, entry: list) -> tuple | None:  # noqa: ANN001
    """Keep what was worked out in the plan; the server (label, address, port, token) or None.

    With --hosts the plan keeps the servers (the least busy is chosen at each
    call) and this call's server is left to :func:`_pick_client` (None); for
    TLS (the quick path speaks plain HTTP only) nothing is kept.
    """
    from rayserver.common.credentials import _token_path

    if opts.hosts:
        names = [n.strip() for n in opts.hosts.split(",") if n.strip()]
        records = ctx.server_records(None if names in ([], ["all"]) else names)
        servers = [(ctx.target_for(r), r.cpus) for r in records]
        target = None
    else:
        target = ctx.target(opts.host)
        servers = [(target, 0)]
    if any(t.ssl_context is not None for t, _ in servers):
        return None
    token_file = _token_path(ctx.layout, ctx.settings)
    files = [*(ctx.hosts.files if ctx.hosts else []), str(token_file or "")]
    plan = {
        "stamps": stamps + [stamp(str(f)) for f in files if f],
        "server": [target.label, target.address, target.port] if target else None,
        "servers": [[t.label, t.address, t.port, cpus] for t, cpus in servers],
        "token_file": str(token_file) if token_file else None,
        "local": sorted(local),
        "dirs": {current_dir(): entry},
    }
    save_plan(opts, plan)
    return (target.label, target.address, target.port, ctx.token()) if target else None


def _raise_interrupt(signum: int, frame: object) -> None:
    # The follower blocks in a read: the interrupt must reach it to cancel the job.
    raise KeyboardInterrupt


def run_remote(
    ctx: object, project: object, opts: ShimOptions, args: list[str], server: tuple | None
) -> int:
    """Submit, stream, pass the program's messages through; the program's exit status.

    In one exchange (``POST /v1/jobs/run``) where the server has it and TLS is
    not in the way; else as ``rayfront run`` does, over five.
    """
    from rayserver.client.connection import ClientError

    try:
        if opts.hosts and opts.program in SPLIT_PROGRAMS:
            signal.signal(signal.SIGTERM, _raise_interrupt)
            return _run_split(ctx, project, opts, args)
        if server is None:
            client = _pick_client(ctx, opts)
            target = client.target
            if target.ssl_context is None:
                server = (target.label, target.address, target.port, client.token)
        if server is not None:
            code = run_in(opts, server, project.location, project.path, args)
            if code is not None:
                return code
        signal.signal(signal.SIGTERM, _raise_interrupt)
        return _run_one(ctx, project, opts, args)
    except ClientError as exc:
        sys.stderr.write(f"rayfront shim: {opts.program}: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 141


def _run_one(ctx, project, opts: ShimOptions, args: list[str]) -> int:  # noqa: ANN001
    from rayserver.client.connection import ClientError
    from rayserver.client.follow import job_exit_code
    from rayserver.client.jobrequest import build_job
    from rayserver.client.streams import StreamedRun, stdin_has_data

    has_in = reads_stdin(opts.program, args) and stdin_has_data()
    request = build_job(
        project, [opts.program, *args], caller_name(), 0, "-" if has_in else None, "-"
    )
    client = _pick_client(ctx, opts)
    try:
        job = client.submit(request)
    except ClientError as exc:
        if exc.status == 403:  # refused at submit, nothing ran: run it here instead
            exec_local(opts, str(exc))
        raise
    job_id = int(job["id"])
    streams = StreamedRun(client, job_id, stdin=has_in, stdout=True)
    streams.start()
    try:
        _pass_stderr(client, job_id)
        final = client.job(job_id, wait=30)
        while final.get("state") not in ("done", "failed", "cancelled", "interrupted"):
            final = client.job(job_id, wait=60)
    except KeyboardInterrupt:
        try:
            client.cancel(job_id)
        except ClientError as exc:
            sys.stderr.write(f"rayfront shim: cancelling job {job_id} failed: {exc}\n")
        raise
    problems = streams.finish(final)
    for problem in problems:
        sys.stderr.write(f"rayfront shim: {opts.program}: {problem}\n")
    if streams.output_closed:
        return 141
    code = job_exit_code(final)
    if code and final.get("state") != "failed":
        sys.stderr.write(f"rayfront shim: job {job_id} {final.get('state')}\n")
    return (code or 1) if problems else code


def _pass_stderr(client, job_id: int) -> None:  # noqa: ANN001
    """The job's log without the server's '== ... ==' frame lines: the program's stderr."""
    from rayserver.client.follow import stream_log

    err = sys.stderr.buffer

    def emit(line: bytes) -> None:
        if line.startswith(_FRAME_PREFIX) and line.rstrip().endswith(b" =="):
            return
        err.write(line + b"\n")
        err.flush()

    stream_log(client, job_id, emit)


def _pick_client(ctx, opts: ShimOptions):  # noqa: ANN001, ANN202
    """--host, else with --hosts the server with the most free cpus, else the first."""
    if opts.host or not opts.hosts:
        return ctx.client(opts.host)
    from rayserver.client.fairshare import least_busy

    return least_busy(ctx, opts.hosts)


def _run_split(ctx, project, opts: ShimOptions, args: list[str]) -> int:  # noqa: ANN001
    from rayserver.client.splitrun import SplitRun
    from rayserver.client.streams import stdin_has_data

    if opts.bin and not ctx.settings.radiance_bin:
        # The split plans and merges with Radiance here; under -S the pyradiance wheel
        # cannot be found by import: use the folder the script names.
        from dataclasses import replace

        lib = ctx.settings.raypath or (os.path.join(os.path.dirname(opts.bin), "lib"),)
        ctx.settings = replace(ctx.settings, radiance_bin=opts.bin, raypath=tuple(lib))
    names = [n.strip() for n in opts.hosts.split(",") if n.strip()]
    explicit = names != ["all"]
    run = SplitRun(
        ctx,
        project,
        [opts.program, *args],
        hosts=ctx.server_records(names if explicit else None),
        explicit_hosts=explicit,
        stdin="-" if reads_stdin(opts.program, args) and stdin_has_data() else None,
        stdout=None,
        name=caller_name(),
        quiet=True,
        silent=True,  # no bar, no account: the program's output is all we give
    )
    result = run.run()
    if result.summary.get("error"):
        sys.stderr.write(f"rayfront shim: {opts.program}: {result.summary['error']}\n")
    return result.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
