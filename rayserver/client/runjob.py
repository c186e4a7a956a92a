"""Submit one job, follow it to its end and summarise it (``rayfront run``, the demo)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rayserver.client.connection import ClientError
from rayserver.client.output import print_json


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
        print_json(final, out)
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
        print_json(
            {"error": message, "status": None, "id": job["id"]}, sys.stderr if cancel else None
        )
        exc.json_reported = True  # type: ignore[attr-defined]  # main() adds no second one
    print(f"\nrayfront: {message}", file=sys.stderr)
