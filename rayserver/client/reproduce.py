"""``rayfront receipt ID`` and ``rayfront reproduce ID``: a job's receipt, and its result made again.

reproduce, in order:

1. fetches the receipt (GET /v1/jobs/ID/receipt of ``--from``, default the
   first server); a job not done, or one whose stdin/stdout was streamed, is refused;
2. checks every input: the sha256 of the file now in the project (this
   machine's mount of the job's location) against the receipt's; any
   missing or different file refuses the run, each one named;
3. moves the outputs aside into ``<project>/.rayfront-reproduce-ID/`` (so
   every program makes them anew: rad rebuilds only what is out of date);
4. queues the receipt's request (the same steps, the same project) on
   ``--host`` (default: the server it came from) and waits for it;
5. compares each output with the original (rayserver.client.compare):
   identical is expected when every step's settings are deterministic
   (``-u-``, or no sampling); otherwise within ``--tolerance``, since
   Radiance seeds ``-u+`` sampling with the clock second.

The originals are put back when the new run fails; they stay in the aside
folder when the results differ, and the folder is removed when they match.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from rayserver.client.compare import compare_files
from rayserver.client.connection import EXIT_ERROR, Client, ClientError
from rayserver.client.context import Context
from rayserver.client.output import print_json
from rayserver.common import radiance
from rayserver.common.receipt import sha256_file
from rayserver.common.states import FINAL_STATES

DEFAULT_TOLERANCE = 0.05
ASIDE = ".rayfront-reproduce-{id}"


def cmd_receipt(ctx: Context, opts: argparse.Namespace) -> int:
    """``rayfront receipt ID``: the receipt as pretty JSON."""
    receipt = fetch_receipt(ctx.client(opts.host), opts.id)
    json.dump(receipt, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def fetch_receipt(client: Client, job_id: int) -> dict[str, Any]:
    receipt = client.request("GET", f"/v1/jobs/{job_id}/receipt")
    if not isinstance(receipt, dict) or "request" not in receipt:
        raise ClientError(f"job {job_id}: the server's answer is not a receipt")
    return receipt


def check_reproducible(receipt: dict[str, Any], job_id: int) -> None:
    """Only a done job whose steps read and wrote project files can be run again from it."""
    state = receipt["job"].get("state")
    if state != "done":
        raise ClientError(
            f"job {job_id} ended {state} ({receipt['job'].get('reason')}); only a done job's "
            "results can be reproduced"
        )
    for step in receipt.get("steps", []):
        for key in ("stdin", "stdout"):
            if isinstance(step.get(key), dict):
                raise ClientError(
                    f"job {job_id} step {step['step']} streamed its standard "
                    f"{'input' if key == 'stdin' else 'output'} through rayfront run: the "
                    "receipt does not hold what was streamed; run it again with --stdin/--stdout "
                    "files to make it reproducible"
                )


def local_project(ctx: Context, receipt: dict[str, Any]) -> Path:
    """The job's project folder as this machine mounts it (its location in the hosts file)."""
    job = receipt["job"]
    record = ctx.own_record()
    root = record.locations.get(job["location"])
    if root is None:
        raise ClientError(
            f"this host {record.name!r} has no location {job['location']!r} in the hosts file: "
            "reproduce checks the inputs here, so it must see the project"
        )
    return Path(root) / job["project"]


def changed_inputs(receipt: dict[str, Any], project: Path) -> list[str]:
    """Each input whose file in ``project`` is missing or not the one the job read."""
    outputs = {o["path"] for o in receipt.get("outputs", [])}
    problems = []
    for entry in receipt.get("inputs", []):
        path = project / entry["path"]
        if "sha256" not in entry:
            problems.append(f"{entry['path']}: not hashed in the receipt ({entry.get('error')})")
            continue
        try:
            digest, size = sha256_file(path)
        except FileNotFoundError:
            problems.append(f"{entry['path']}: missing")
            continue
        if digest != entry["sha256"]:
            why = " (the job itself changed it: restore the version it read)"
            problems.append(
                f"{entry['path']}: changed (sha256 {digest[:12]}..., {size} bytes; the job read "
                f"{entry['sha256'][:12]}..., {entry['size']} bytes)"
                f"{why if entry['path'] in outputs else ''}"
            )
    return problems


def move_aside(receipt: dict[str, Any], project: Path, job_id: int) -> Path:
    """The outputs now in the project moved into the aside folder (it is returned)."""
    aside = project / ASIDE.format(id=job_id)
    if aside.exists():
        raise ClientError(
            f"{aside} exists (an earlier reproduce kept the originals there): "
            "look at it, then remove it"
        )
    for entry in receipt.get("outputs", []):
        src = project / entry["path"]
        if src.is_file():
            dest = aside / entry["path"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            src.rename(dest)
    aside.mkdir(exist_ok=True)
    return aside


def put_back(aside: Path, project: Path) -> None:
    """The originals back in place (the new run failed); the aside folder removed."""
    for path in sorted(p for p in aside.rglob("*") if p.is_file()):
        dest = project / path.relative_to(aside)
        dest.parent.mkdir(parents=True, exist_ok=True)
        path.replace(dest)
    shutil.rmtree(aside, ignore_errors=True)


def wait_job(client: Client, job_id: int) -> dict[str, Any]:
    while True:
        job = client.job(job_id, wait=30)
        if job.get("state") in FINAL_STATES:
            return job


def cmd_reproduce(ctx: Context, opts: argparse.Namespace) -> int:
    """``rayfront reproduce ID [--from HOST] [--host HOST] [--tolerance X]``."""
    source = ctx.client(opts.from_host)
    receipt = fetch_receipt(source, opts.id)
    check_reproducible(receipt, opts.id)
    project = local_project(ctx, receipt)
    problems = changed_inputs(receipt, project)
    if problems:
        raise ClientError(
            f"job {opts.id}'s inputs are not what it read; refusing to reproduce:\n  "
            + "\n  ".join(problems)
        )
    target = ctx.client(opts.host) if opts.host else source
    aside = move_aside(receipt, project, opts.id)
    try:
        job = target.submit(receipt["request"])
        if not opts.json:
            print(f"job {job['id']} on {target.target.host}: the steps of job {opts.id} again")
        job = wait_job(target, job["id"])
    except BaseException:
        put_back(aside, project)
        raise
    if job.get("state") != "done":
        put_back(aside, project)
        raise ClientError(
            f"the new run, job {job['id']}, ended {job.get('state')}: {job.get('reason')}; "
            "the original outputs are back in place"
        )
    summary = compare_outputs(ctx, receipt, project, aside, opts.tolerance)
    summary.update(original=opts.id, job=job["id"], host=target.target.host)
    return report(summary, aside, opts.json)


def compare_outputs(
    ctx: Context, receipt: dict[str, Any], project: Path, aside: Path, tolerance: float
) -> dict[str, Any]:
    """Each original output against the new one: identical, within tolerance, or not."""
    pvalue = radiance.program_path(ctx.settings, "pvalue")
    deterministic = bool(receipt.get("deterministic"))
    ambient = {a["path"] for a in receipt.get("ambient_files", [])}
    rows, matched = [], True
    for entry in receipt.get("outputs", []):
        old, new = aside / entry["path"], project / entry["path"]
        row: dict[str, Any] = {"path": entry["path"]}
        if entry["path"] in ambient:
            row.update(kind="ambient", measure=None, note="an ambient file (-af): not compared")
        elif not new.is_file():
            row.update(kind="missing", measure=None, note="the new run did not write it")
        elif not old.is_file():
            digest, _ = sha256_file(new)
            same = digest == entry.get("sha256")
            row.update(kind="identical" if same else "binary", measure=0.0 if same else None)
            row["note"] = "sha256 " + ("as in the receipt" if same else "differs from the receipt")
        else:
            diff = compare_files(old, new, pvalue)
            row.update(kind=diff.kind, measure=diff.measure, note=diff.note)
        ok = row["kind"] in ("identical", "ambient") or (
            not deterministic and row["measure"] is not None and row["measure"] <= tolerance
        )
        row["matches"] = ok
        matched = matched and ok
        rows.append(row)
    return {
        "matches": matched,
        "deterministic": deterministic,
        "nondeterministic_because": receipt.get("nondeterministic_because", []),
        "tolerance": tolerance,
        "outputs": rows,
    }


def report(summary: dict[str, Any], aside: Path, json_mode: bool) -> int:
    """Print the comparison; the aside folder removed when everything matched."""
    if summary["matches"]:
        shutil.rmtree(aside, ignore_errors=True)
    else:
        summary["originals"] = str(aside)
    if json_mode:
        print_json(summary)
        return 0 if summary["matches"] else EXIT_ERROR
    for row in summary["outputs"]:
        print(f"  {'ok  ' if row['matches'] else 'DIFF'} {row['path']}: {row['note']}")
    if summary["deterministic"]:
        print("settings are deterministic (-u- or no sampling): identical results expected")
    else:
        print(
            "cannot be byte-identical: Radiance seeds -u+ sampling with the clock second ("
            + "; ".join(summary["nondeterministic_because"])
            + f"); compared within --tolerance {summary['tolerance']:g}"
        )
    verdict = "reproduced" if summary["matches"] else "NOT reproduced"
    print(f"job {summary['original']}: {verdict} by job {summary['job']} on {summary['host']}")
    if not summary["matches"]:
        print(f"the original outputs are kept in {aside}")
    return 0 if summary["matches"] else EXIT_ERROR
