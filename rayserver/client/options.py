"""rayfront's command line: the argument parser and the checks of option values."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NoReturn

from rayserver.client.output import print_json


class Parser(argparse.ArgumentParser):
    """argparse that also answers a usage error in JSON when --json was given."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if Parser.json_errors:
            print_json({"error": f"{self.prog}: {message}", "status": None})
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
    parser = Parser(
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
            usage=f"rayfront {name} [options] -- PROGRAM [ARGS ...]\n"
            f"       rayfront {name} [options] --sh 'COMMAND LINE'\n"
            f"       rayfront {name} [options] --script FILE [-- ARGS ...]",
        )
        _job_options(p, name)
        if name == "run":
            _run_options(p)
    _other_commands(sub, common)
    _receipt_commands(sub, common)
    return parser


def _receipt_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """receipt, reproduce."""
    p = sub.add_parser("receipt", parents=[common], help="a finished job's receipt (JSON)")
    p.add_argument("id", type=_job_id, help="job id")
    p = sub.add_parser(
        "reproduce",
        parents=[common],
        help="run a finished job again from its receipt and compare the outputs",
        description="Check the job's inputs (sha256 of the files now in the project; "
        "refused, naming each one, when any is missing or changed), move its outputs "
        "aside into .rayfront-reproduce-ID/, queue the same steps again and compare the "
        "new outputs with the originals. Identical results are expected when the settings "
        "are deterministic (-u-, or no sampling); otherwise Radiance seeds -u+ sampling "
        "with the clock second and the outputs are compared within --tolerance. "
        "Exit status 0 when they match, 1 otherwise.",
    )
    p.add_argument("id", type=_job_id, help="job id")
    p.add_argument(
        "--from",
        dest="from_host",
        metavar="HOST",
        help="the server that ran job ID (default: the first server of the hosts file); "
        "--host names where it runs again (default: this one)",
    )
    p.add_argument(
        "--tolerance",
        type=_tolerance,
        default=0.05,
        help="largest accepted difference where the settings sample with -u+: pictures by "
        "the mean relative difference of their pixel values, numbers by the largest "
        "relative difference (default 0.05)",
    )


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.05, got {text!r}") from None
    if not 0 <= value < 1e6:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _job_options(p: argparse.ArgumentParser, name: str) -> None:
    """What ``submit`` and ``run`` say about the job."""
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
        "--sh",
        metavar="'COMMAND LINE'",
        help="run a sh command line (pipes, redirections, loops) instead of one program, "
        "inside the job's sandbox in the project directory",
    )
    p.add_argument(
        "--script",
        metavar="FILE",
        help="run a sh script of the project (its arguments after --) instead of one program",
    )
    p.add_argument(
        "--after",
        type=_job_ids,
        action="extend",
        metavar="ID[,ID...]",
        help="start only when these jobs of the same server are done; cancelled "
        "when one of them fails or is cancelled",
    )


def _run_options(p: argparse.ArgumentParser) -> None:
    """``run`` only: a quiet log, and a run split across servers."""
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


def _other_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """status, log, cancel, token, shim, demo."""
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

    p = sub.add_parser(
        "shim", parents=[common], help="write shims that run Radiance programs on the servers"
    )
    p.add_argument(
        "dir", type=Path, metavar="DIR", help="folder for the shims (put it first on PATH)"
    )
    p.add_argument(
        "--hosts",
        metavar="A,B|all",
        help="spread the calls over these servers; rtrace, rcontrib and rfluxmtx "
        "split each call's rays over them",
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
