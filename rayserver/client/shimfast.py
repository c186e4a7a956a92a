"""A shim's quick path: a Radiance command on a server for little more than Python's start.

The scripts ``rayfront shim`` writes run ``python -I -S`` on this module
(:func:`main`). What the full client works out before it can submit (the
settings, the hosts file, which server, where the current directory is in
terms of a location, the token file) does not change from one command to
the next, so :mod:`rayserver.client.shim` (the full path) keeps it in a
*plan*: a marshal file next to the scripts, one per user, with the size,
mtime and inode of every file it was read from and the environment it
depends on. A plan that still holds lets this module submit and follow the
job in one exchange (:mod:`rayserver.client.shimhttp`) importing nothing but
``os`` and C modules (``--hosts`` shims ask the planned servers for the
least busy first). Anything else (no plan yet, a file changed, a new
directory, a split through ``--hosts``, ``rad``, TLS, an older server) goes
the full path, which behaves the same way and writes the plan for the next
call.
"""

from __future__ import annotations

import marshal
import os
import sys

from rayserver.client import shimhttp

# Programs that cost less than a round trip to a server (bench/shim.py measures
# the round trip): readers and filters of small data, generators of scene text.
LOCAL_PROGRAMS = frozenset(
    "getinfo pvalue rcalc total cnt ev calc icalc histo neaten rlam rsplit tabfunc "
    "lookamb getbbox vwrays rcollate rmtxop lampcolor genbox genrev genworm gensurf "
    "genprism genblinds genclock gensky gendaylit genssky xform".split()
)
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
OFF_WORDS = ("off", "0", "no", "local")
PLAN_VERSION = 1
PLAN_DIRS = 256  # directories remembered per plan (a new one costs one full-path call)
EXIT_ERROR = 1
STREAM = {"stream": True}


class ShimOptions:
    """What the script fixed when ``rayfront shim`` wrote it."""

    def __init__(self, argv: list[str]) -> None:
        self.bin: str | None = None
        self.host: str | None = None
        self.hosts: str | None = None
        self.plan: str | None = None
        i = 0
        while i + 1 < len(argv) and argv[i] in ("--bin", "--host", "--hosts", "--plan"):
            setattr(self, argv[i][2:], argv[i + 1])
            i += 2
        if i >= len(argv):
            raise SystemExit("rayfront shim: no program named (the script is broken: rewrite it)")
        self.program = argv[i]
        self.args = argv[i + 1 :]


def main(argv: list[str]) -> None:
    """Run the shim's program (never returns: exits or execs)."""
    opts = ShimOptions(argv)
    if os.environ.get("RAYFRONT_SHIM", "").strip().lower() in OFF_WORDS and opts.bin:
        exec_local(opts, None)
    split = opts.hosts and opts.program in SPLIT_PROGRAMS
    plan = None if split or opts.program == "rad" else load_plan(opts)
    if plan is not None and opts.program in plan["local"]:
        exec_local(opts, None)
    where = plan["dirs"].get(current_dir()) if plan else None
    if plan is None or where is None:
        from rayserver.client import shim

        sys.exit(shim.main(argv))
    if where[0] == "local":
        exec_local(opts, where[1])
    token = plan_token(plan)
    server = plan["server"] or shimhttp.least_busy(plan["servers"], token)
    if server is None:
        names = ", ".join(s[0] for s in plan["servers"])
        sys.stderr.write(f"rayfront shim: {opts.program}: no server of {names} is answering\n")
        _exit_now(EXIT_ERROR)
    label, address, port = server
    code = run_planned(opts, (label, address, port, token), where[1:])
    if code is None:  # an older server, without POST /v1/jobs/run
        from rayserver.client import shim

        sys.exit(shim.main(argv))
    _exit_now(code)


def _exit_now(code: int) -> None:
    """Exit without the interpreter's tear-down (~5 ms): nothing is left to clean up.

    The sockets close with the process; an uploader thread still waiting on
    our standard input (a program that did not read all of it) ends with it.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


# ---------------------------------------------------------------- the plan


def plan_file(opts: ShimOptions) -> str | None:
    return f"{opts.plan}-{os.getuid()}" if opts.plan else None


def plan_key(opts: ShimOptions) -> list[str]:
    """What, besides files, the full path's answers depend on."""
    env = os.environ
    names = ("RAYFRONT_HOME", "RAYFRONT_HOSTNAME", "HOME")
    return [
        *(env.get(n, "") for n in names),
        os.uname().nodename,
        opts.host or "",
        opts.hosts or "",
    ]


def stamp(path: str) -> list[object]:
    try:
        st = os.stat(path)
    except OSError:
        return [path, -1, -1, -1]
    return [path, st.st_mtime_ns, st.st_size, st.st_ino]


def load_plan(opts: ShimOptions) -> dict | None:
    """The plan, if there is one and every file and setting it was made from is unchanged."""
    path = plan_file(opts)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            plan = marshal.loads(f.read())
    except (OSError, ValueError, EOFError, TypeError):
        return None
    if not isinstance(plan, dict) or plan.get("v") != PLAN_VERSION:
        return None
    if plan.get("key") != plan_key(opts):
        return None
    if any(stamp(old[0]) != old for old in plan["stamps"]):
        return None
    return plan


def save_plan(opts: ShimOptions, plan: dict) -> None:
    """Write the plan next to the scripts (atomically; quietly not, where we may not)."""
    path = plan_file(opts)
    if path is None:
        return
    old = load_plan(opts)
    same = ("stamps", "server", "servers", "token_file", "local")
    if old is not None and all(old.get(k) == plan[k] for k in same):
        dirs = dict(list(old["dirs"].items())[-(PLAN_DIRS - len(plan["dirs"])) :])
        plan["dirs"] = {**dirs, **plan["dirs"]}
    plan.update(v=PLAN_VERSION, key=plan_key(opts))
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(marshal.dumps(plan))
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def plan_token(plan: dict) -> str | None:
    """$RAYFRONT_TOKEN, else the token file's text (as the full client reads it)."""
    env = os.environ.get("RAYFRONT_TOKEN", "").strip()
    if env or not plan["token_file"]:
        return env or None
    try:
        with open(plan["token_file"], encoding="ascii") as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def current_dir() -> str:
    """The current directory as the user's shell names it ($PWD), if that is still right."""
    pwd = os.environ.get("PWD")
    if pwd and os.path.isabs(pwd):
        try:
            if os.path.samefile(pwd, "."):
                return pwd
        except OSError:
            pass
    return os.getcwd()


# ---------------------------------------------------------------- here or there


def exec_local(opts: ShimOptions, why: str | None) -> None:
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


def reads_stdin(program: str, args: list[str]) -> bool:
    """Whether ``program`` with ``args`` reads its standard input (then a shim streams ours)."""
    if program in STDIN_ALWAYS or "-" in args:
        return True
    if program in STDIN_WITHOUT_FILE:
        return not any(not a.startswith("-") and os.path.isfile(a) for a in args)
    return False


def stdin_has_data() -> bool:
    """True when our standard input should go to the program: not a terminal, not /dev/null."""
    try:
        if os.isatty(0):
            return False
        st = os.fstat(0)
    except OSError:
        return False  # closed
    if (st.st_mode & 0o170000) == 0o020000:  # a character device: /dev/null?
        try:
            null = os.stat(os.devnull)
        except OSError:
            return True
        return (st.st_rdev, st.st_ino) != (null.st_rdev, null.st_ino)
    return True


def caller_name() -> str:
    """The calling tool's command line (the parent's), which names the job."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            words = f.read().rstrip(b"\0").split(b"\0")
        text = " ".join(w.decode("utf-8", "replace") for w in words).strip()
    except OSError:
        text = ""
    return (text or "shim")[:200]


def translate_args(args: list[str], project_dir: str) -> tuple[list[str], str | None]:
    """Arguments as the server takes them; (args, None) or (args, the word outside the project).

    An absolute path inside the project becomes relative to it; '..' that
    stays inside is folded away; anything leading out (absolute elsewhere,
    '..' above, '~', a symlink out) is reported.
    """
    project_dir = str(project_dir)
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
            full = os.path.normpath(os.path.join(project_dir, cand))
            if not (_inside(full, project_dir) or _inside(full, base)):
                return args, repr(arg)
            root = project_dir if _inside(full, project_dir) else base
            rel = os.path.relpath(full, root)
            if not _inside(os.path.join(base, rel), base):
                return args, repr(arg)
            new = new.replace(cand, rel, 1)
        out.append(new)
    return out, None


def _candidates(arg: str) -> list[str]:
    """Words naming files: the argument, an @options file, VAR=path values."""
    cands = [arg]
    if arg.startswith("@") and len(arg) > 1:
        cands.append(arg[1:])
    if "=" in arg:
        cands.extend(part for part in arg.split("=")[1:] if part)
    return [c for c in cands if c.startswith(("/", "~")) or "/" in c]


def _inside(path: str, root: str) -> bool:
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip("/") + "/")


# ---------------------------------------------------------------- the run


def run_planned(opts: ShimOptions, server: tuple, where: list[str]) -> int | None:
    """Run on ``server`` (label, address, port, token) in ``where`` (location, path, dir).

    The program's exit status; None when the server has no ``POST /v1/jobs/run``.
    """
    location, project, local_dir = where
    args, outside = translate_args(opts.args, local_dir)
    if outside:
        exec_local(opts, f"{outside} is outside the project {local_dir}")
    return run_in(opts, server, location, project, args)


def run_in(
    opts: ShimOptions, server: tuple, location: str, project: str, args: list[str]
) -> int | None:
    """Run the program with ``args`` (the server's) in ``location``/``project`` on ``server``."""
    has_in = reads_stdin(opts.program, args) and stdin_has_data()
    step = {"program": opts.program, "args": args, "stdin": None, "stdout": STREAM}
    if has_in:
        step["stdin"] = STREAM
    job = {"location": location, "project": project, "priority": 0, "name": caller_name()}
    job["steps"] = [step]
    try:
        return run_job(opts, server, job, has_in)
    except shimhttp.Refused as exc:
        if exc.status in (404, 405) and not exc.is_api:
            return None
        if exc.status == 403:  # refused at submit, nothing ran: run it here instead
            exec_local(opts, str(exc))
        sys.stderr.write(f"rayfront shim: {opts.program}: {exc}\n")
        return EXIT_ERROR
    except shimhttp.HttpError as exc:
        sys.stderr.write(f"rayfront shim: {opts.program}: {exc}\n")
        return EXIT_ERROR


def run_job(opts: ShimOptions, server: tuple, job: dict, has_in: bool) -> int:
    """Submit ``job`` and stream it back: output to fd 1, messages to fd 2; its exit status."""
    import _signal

    label, address, port, token = server
    _signal.signal(_signal.SIGTERM, _raise_interrupt)
    conn = shimhttp.Connection(label, address, port, token)
    job_id = None
    try:
        job_id = shimhttp.start_run(conn, job, has_in)
        if has_in:
            shimhttp.start_upload(conn)
        return _follow(opts, conn, job_id)
    except KeyboardInterrupt:
        if job_id is not None:
            failed = shimhttp.cancel(label, address, port, token, job_id)
            if failed:
                sys.stderr.write(f"rayfront shim: cancelling job {job_id} failed: {failed}\n")
        return 130
    except OSError as exc:
        raise shimhttp.HttpError(f"the run on rayserver {label} broke: {exc}") from None


def _raise_interrupt(signum: int, frame: object) -> None:
    # The main thread blocks in a read: the interrupt must reach it to cancel the job.
    raise KeyboardInterrupt


def _follow(opts: ShimOptions, conn: shimhttp.Connection, job_id: int) -> int:
    """The frames of the answer until the last; the program's exit status."""
    errors = _Messages()
    while True:
        kind, payload = shimhttp.next_frame(conn)
        if kind == b"O":
            view = memoryview(payload)
            try:
                while view:
                    view = view[os.write(1, view) :]
            except BrokenPipeError:
                conn.close()  # the server sees it, and the job ends without its reader
                return 141
        elif kind == b"L":
            errors.add(payload)
        elif kind == b"X":
            errors.flush()
            end = shimhttp.loads(payload)
            return _ended(opts, end["job"], end["problems"], job_id)


class _Messages:
    """The job's log without the server's '== ... ==' frame lines: the program's stderr."""

    def __init__(self) -> None:
        self.pending = b""

    def add(self, data: bytes) -> None:
        *lines, self.pending = (self.pending + data).split(b"\n")
        kept = [line + b"\n" for line in lines if not _frame_line(line)]
        if kept:
            os.write(2, b"".join(kept))

    def flush(self) -> None:
        if self.pending and not _frame_line(self.pending):
            os.write(2, self.pending + b"\n")
        self.pending = b""


def _frame_line(line: bytes) -> bool:
    return line.startswith(b"== ") and line.rstrip().endswith(b" ==")


def _ended(opts: ShimOptions, final: dict, problems: list[str], job_id: int) -> int:
    for problem in problems:
        sys.stderr.write(f"rayfront shim: {opts.program}: {problem}\n")
    code = exit_code(final)
    if code and final.get("state") != "failed":
        sys.stderr.write(f"rayfront shim: job {job_id} {final.get('state')}\n")
    return (code or 1) if problems else code


def exit_code(job: dict) -> int:
    """The job's exit status, or 128+signal, or 1 (as ``rayfront run``'s)."""
    status = job.get("exit_status")
    if isinstance(status, int) and status != 0:
        return status if 0 < status < 256 else 1
    sig = job.get("signal")
    if isinstance(sig, int) and sig > 0:
        return 128 + sig
    return 0 if job.get("state") == "done" else 1
