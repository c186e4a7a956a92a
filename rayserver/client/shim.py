"""A shim: one Radiance program run on a render host as if it ran here (``rayfront shim``).

``rayfront shim DIR`` writes one tiny script per Radiance program into DIR;
each execs ``python -S -c 'from rayserver.client.shim import main' ...
PROGRAM "$@"``. With DIR first on PATH, Honeybee, lbt-recipes, make and
scripts run their Radiance commands on the servers of the hosts file
unchanged: same arguments, the current directory translated through the
hosts file, standard input and output streamed, the program's messages on
standard error, its exit status; Ctrl-C and SIGTERM cancel the job.

Runs locally instead (the real binary of the Radiance bin folder, exec'd,
so a shim never calls itself): ``RAYFRONT_SHIM=off``; programs cheaper than
the round trip (:data:`LOCAL_PROGRAMS`, or the ``shim_local`` setting);
and, with one line on standard error saying why, a call from outside every
location of the hosts file, or with a file argument outside the project
(the current directory), which the server would refuse.

Start-up is kept cheap (see bench/shim.py): ``-S`` skips site (the script
puts the package's folder on sys.path itself), and only the stdlib HTTP
client is imported; the split code only when ``--hosts`` is used.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

# Programs that cost less than a round trip to a server (bench/shim.py measures
# the round trip): readers and filters of small data, generators of scene text.
LOCAL_PROGRAMS = frozenset(
    "getinfo pvalue rcalc total cnt ev calc icalc histo neaten rlam rsplit tabfunc "
    "lookamb getbbox vwrays rcollate rmtxop lampcolor genbox genrev genworm gensurf "
    "genprism genblinds genclock gensky gendaylit genssky xform".split()
)
# Words naming files: themselves, @options files, VAR=path values (as the server reads them).
SPLIT_PROGRAMS = ("rtrace", "rcontrib", "rfluxmtx")
# Which programs read their standard input: a shim streams ours only to those (a tool's
# open pipe that nobody writes, as Honeybee's Popen(stdin=PIPE), must not hold a job).
# Always: the ray tracers' rays, the matrix splitters' data.
STDIN_ALWAYS = frozenset({"rtrace", "rcontrib", "rsplit", "rcollate", "rlam", "mkillum"})
# Filters: standard input when no input file is named.
STDIN_WITHOUT_FILE = frozenset(
    "xform pfilt pcond pextrem protate pflip psign ra_bmp ra_gif ra_hexbit ra_pict ra_ppm "
    "ra_ps ra_rgbe ra_t16 ra_t8 ra_tiff ra_xyze gendaymtx gensdaymtx obj2mesh obj2rad "
    "evalglare histo neaten total rcalc cnt getinfo pvalue tabfunc".split()
)
_FRAME_PREFIX = b"== "


class ShimOptions:
    """What the script fixed when ``rayfront shim`` wrote it."""

    def __init__(self, argv: list[str]) -> None:
        self.bin: str | None = None
        self.host: str | None = None
        self.hosts: str | None = None
        i = 0
        while i + 1 < len(argv) and argv[i] in ("--bin", "--host", "--hosts"):
            setattr(self, argv[i][2:], argv[i + 1])
            i += 2
        if i >= len(argv):
            raise SystemExit("rayfront shim: no program named (the script is broken: rewrite it)")
        self.program = argv[i]
        self.args = argv[i + 1 :]


def main(argv: list[str] | None = None) -> int:
    opts = ShimOptions(list(sys.argv[1:] if argv is None else argv))
    if os.environ.get("RAYFRONT_SHIM", "").strip().lower() in ("off", "0", "no", "local"):
        exec_local(opts, None)
    from rayserver.client.connection import ClientError
    from rayserver.client.context import Context

    ctx = Context()
    try:
        local = ctx.settings.shim_local
        if opts.program in (LOCAL_PROGRAMS if local is None else local):
            exec_local(opts, None)
        project = ctx.project()
    except ClientError as exc:
        exec_local(opts, str(exc))
    args, outside = translate_args(opts.args, project.local_dir)
    if outside:
        exec_local(opts, f"{outside} is outside the project {project.local_dir}")
    return run_remote(ctx, project, opts, args)


def reads_stdin(program: str, args: list[str]) -> bool:
    """Whether ``program`` with ``args`` reads its standard input (then a shim streams ours)."""
    if program in STDIN_ALWAYS or "-" in args:
        return True
    if program in STDIN_WITHOUT_FILE:
        return not any(not a.startswith("-") and os.path.isfile(a) for a in args)
    return False


def caller_name() -> str:
    """The calling tool's command line (the parent's), which names the job."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            words = f.read().rstrip(b"\0").split(b"\0")
        text = " ".join(w.decode("utf-8", "replace") for w in words).strip()
    except OSError:
        text = ""
    return (text or "shim")[:200]


def translate_args(args: list[str], project_dir: Path) -> tuple[list[str], str | None]:
    """Arguments as the server takes them; (args, None) or (args, the word outside the project).

    An absolute path inside the project becomes relative to it; '..' that
    stays inside is folded away; anything leading out (absolute elsewhere,
    '..' above, '~', a symlink out) is reported.
    """
    base = os.path.realpath(project_dir)
    out: list[str] = []
    for arg in args:
        new = arg
        for cand in _candidates(arg):
            if cand.startswith("~"):
                return args, repr(arg)
            if not (cand.startswith("/") or ".." in cand.split("/")):
                if "/" in cand and not _inside(os.path.join(base, cand), base):
                    return args, repr(arg)
                continue
            full = os.path.normpath(os.path.join(str(project_dir), cand))
            if not (_inside(full, str(project_dir)) or _inside(full, base)):
                return args, repr(arg)
            root = str(project_dir) if _inside(full, str(project_dir)) else base
            rel = os.path.relpath(full, root)
            if not _inside(os.path.join(base, rel), base):
                return args, repr(arg)
            new = new.replace(cand, rel, 1)
        out.append(new)
    return out, None


def _candidates(arg: str) -> list[str]:
    cands = [arg]
    if arg.startswith("@") and len(arg) > 1:
        cands.append(arg[1:])
    if "=" in arg:
        cands.extend(part for part in arg.split("=")[1:] if part)
    return [c for c in cands if c.startswith(("/", "~")) or "/" in c]


def _inside(path: str, root: str) -> bool:
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip("/") + "/")


def exec_local(opts: ShimOptions, why: str | None) -> NoReturn:
    """Replace this process by the real program of the Radiance bin folder."""
    bin_dir = opts.bin or _configured_bin()
    real = os.path.join(bin_dir, opts.program)
    me = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] not in ("-c", "") else ""
    if os.path.realpath(real) == me or not os.access(real, os.X_OK):
        sys.stderr.write(f"{opts.program}: no such Radiance program in {bin_dir}\n")
        os._exit(127)
    if why:
        sys.stderr.write(f"rayfront shim: {opts.program} runs locally: {why}\n")
        sys.stderr.flush()
    env = dict(os.environ)
    # Its own children (rad's oconv, rfluxmtx's rcontrib) run locally too, not via shims.
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "/usr/bin:/bin")])
    if "RAYPATH" not in env:
        lib = os.path.join(os.path.dirname(bin_dir), "lib")
        env["RAYPATH"] = os.pathsep.join([".", lib])
    os.execve(real, [opts.program, *opts.args], env)


def _configured_bin() -> str:
    from rayserver.client.context import Context
    from rayserver.common.radiance import bin_dir

    return str(bin_dir(Context().settings))


def _raise_interrupt(signum: int, frame: object) -> None:
    # The follower blocks in a read: the interrupt must reach it to cancel the job.
    raise KeyboardInterrupt


def run_remote(ctx: object, project: object, opts: ShimOptions, args: list[str]) -> int:
    """Submit, stream, pass the program's messages through; the program's exit status."""
    from rayserver.client.connection import ClientError

    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if opts.hosts and opts.program in SPLIT_PROGRAMS:
            return _run_split(ctx, project, opts, args)
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
