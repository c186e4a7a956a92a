"""Receipts (issue 18 item 5): receipt.json of a finished job, GET /v1/jobs/{id}/receipt,
``rayfront receipt`` and ``rayfront reproduce``, through real servers on 127.0.0.1 with
real Radiance (pyradiance's binaries).

Radiance 6.0a seeds -u+ sampling from the clock second: the byte-identical reproduction
is a ``-u-`` render; a picture's header holds its capture time (CAPDATE/GMT), which
reproduce leaves out of the comparison and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import RayHome
from jobtools import (
    BIN,
    SCENE,
    VIEW,
    get,
    make_project,
    rad_env,
    rayfront,
    rayfront_json,
    rpict,
    submit,
    wait_final,
    wait_until,
)
from test_openapi import document, response_validator

from rayserver.client.compare import compare_files
from rayserver.client.demo import DEMO_SOURCE
from rayserver.common.receipt import named_files, octree_sources, option_defaults, sampling_reasons

# The test that makes named tokens keeps a server of its own.
pytestmark = pytest.mark.shared_server

JSON = "application/json"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _receipt(srv: Any, job_id: int) -> dict[str, Any]:
    status, body = srv.request("GET", f"/v1/jobs/{job_id}/receipt")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def test_demo_render_receipt(server: Any) -> None:
    """The demo project's rad render: every listed part of the receipt is there and true."""
    proj = server.home.projects / "demo"
    shutil.copytree(DEMO_SOURCE, proj)
    status, body = server.request(
        "POST", "/v1/jobs", {"location": "projects", "project": "demo", "rad": {"rif": "demo.rif"}}
    )
    assert status == 201, body
    job = wait_final(server, body["id"], timeout=240)
    assert job["state"] == "done", job
    receipt = _receipt(server, job["id"])
    validator = response_validator(document(), "/v1/jobs/{id}/receipt", "GET", 200, JSON)
    validator.validate(receipt)  # the shape docs/openapi.yaml gives
    inputs = {i["path"]: i for i in receipt["inputs"]}
    for name in ("demo.rif", "materials.rad", "sky.rad", "room.rad", "furniture.rad", "room.vf"):
        assert inputs[name]["sha256"] == _sha(proj / name), name
        assert inputs[name]["size"] == (proj / name).stat().st_size
    outputs = {o["path"]: o for o in receipt["outputs"]}
    for name in ("demo.oct", "demo_room.hdr"):
        assert outputs[name]["sha256"] == _sha(proj / name), name
    (step,) = receipt["steps"]
    assert step["program"] == "rad" and step["exit_status"] == 0
    assert step["argv"][-1] == "demo.rif"
    assert any(c.startswith("rpict ") for c in step["commands"])
    assert abs(step["seed_second"] - job["started_at"]) < 60
    programs = {b["program"]: b for b in receipt["binaries"]}
    assert programs["rpict"]["defaults"]["-u"] == "-", programs["rpict"]
    # rpict's own default (6.0a: -u-, correlated) decides: rad gives it no -u.
    assert receipt["deterministic"] is True, receipt
    for name in ("rad", "oconv", "rpict", "pfilt"):
        assert programs[name]["sha256"] == _sha(Path(programs[name]["path"])), name
    assert receipt["radiance"]["version"].startswith("RADIANCE")
    assert receipt["host"]["cpu_model"] and receipt["host"]["name"] == "testhost"
    assert "RAYPATH" in receipt["environment"] and "PATH" in receipt["environment"]
    assert [a["path"] for a in receipt["ambient_files"]] == ["demo.amb"]
    # Made again from the receipt: the same picture and octree (rpict -u-), the ambient
    # file not compared (it is a cache the render fills).
    summary = rayfront_json(server.home, "reproduce", str(job["id"]), cwd=proj)
    kinds = {row["path"]: row["kind"] for row in summary["outputs"]}
    assert kinds == {"demo.amb": "ambient", "demo.oct": "identical", "demo_room.hdr": "identical"}
    assert summary["matches"] is True, summary


def _done(srv: Any, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    job = wait_final(srv, submit(srv, steps, **extra)["id"])
    assert job["state"] == "done", job
    return job


def test_reproduce_deterministic_render_then_refuse_changed_input(server: Any) -> None:
    """A -u- render reproduced byte for byte (but the header's capture time), through a real
    rayfront; then scene.rad changes and reproduce refuses, naming it."""
    home: RayHome = server.home
    proj = make_project(home)
    job = _done(server, [rpict(16, "-u-", "-ab", "1")])
    receipt = _receipt(server, job["id"])
    inputs = {i["path"]: i for i in receipt["inputs"]}
    assert inputs["scene.oct"]["role"] == "argument"
    assert inputs["scene.rad"]["role"] == "built into scene.oct"  # from the octree's header
    assert inputs["scene.rad"]["sha256"] == _sha(proj / "scene.rad")
    assert receipt["deterministic"] is True and receipt["steps"][0]["stdout"] == "out.hdr"
    shown = rayfront(home, "receipt", str(job["id"]), cwd=proj)
    assert shown.returncode == 0 and json.loads(shown.stdout) == receipt
    original = (proj / "out.hdr").read_bytes()

    summary = rayfront_json(home, "reproduce", str(job["id"]), cwd=proj)
    assert summary["matches"] is True, summary
    (row,) = summary["outputs"]
    assert row["kind"] == "identical" and row["path"] == "out.hdr", row
    again = _receipt(server, summary["job"])
    assert again["outputs"][0]["size"] == len(original)
    assert not (proj / f".rayfront-reproduce-{job['id']}").exists()

    (proj / "scene.rad").write_text((proj / "scene.rad").read_text() + "# changed\n")
    refused = rayfront(home, "reproduce", str(job["id"]), cwd=proj)
    assert refused.returncode != 0
    assert "scene.rad: changed" in refused.stderr and "refusing" in refused.stderr, refused.stderr
    (proj / "scene.oct").unlink()
    refused = rayfront(home, "reproduce", str(job["id"]), cwd=proj)
    assert "scene.oct: missing" in refused.stderr and "scene.rad" in refused.stderr


@pytest.mark.shared_server(False)
def test_receipt_of_another_users_job_is_refused(server: Any) -> None:
    """Named tokens: bob may not read alice's receipt (403), the shared token (admin) may;
    a job without a receipt is a 404 that says why; a receipt that cannot be written is a
    warning of a job that is still done."""
    home: RayHome = server.home
    make_project(home)
    tokens = {}
    for user in ("alice", "bob"):
        body = rayfront_json(home, "token", "new", "--user", user, cwd=home.path)
        tokens[user] = body["token"]
    status, body = server.request(
        "POST",
        "/v1/jobs",
        {"location": "projects", "project": "room", "steps": [rpict(8)]},
        token=tokens["alice"],
    )
    assert status == 201, body
    job = wait_final(server, body["id"])
    path = f"/v1/jobs/{job['id']}/receipt"
    status, answer = server.request("GET", path, token=tokens["bob"])
    assert status == 403 and "belongs to user 'alice'" in str(answer), answer
    assert server.request("GET", path, token=tokens["alice"])[0] == 200
    assert server.request("GET", path)[0] == 200  # the shared token counts as admin
    (home.path / "srvstate" / "jobs" / str(job["id"]) / "receipt.json").unlink()
    status, answer = server.request("GET", path)
    assert status == 404 and "has no receipt yet" in str(answer), answer
    status, answer = server.request("GET", "/v1/jobs/9999/receipt")
    assert status == 404, answer
    # receipt.json cannot be written (a folder is in its place): the job is still done,
    # with a warning that says so, and GET receipt says it ended without one.
    blocker = home.path / "srvstate" / "jobs" / str(job["id"] + 1) / "receipt.json"
    blocker.mkdir(parents=True)
    second = _done(server, [rpict(8)])
    assert second["id"] == job["id"] + 1
    assert any("receipt not written" in w for w in second["warnings"]), second
    status, answer = server.request("GET", f"/v1/jobs/{second['id']}/receipt")
    assert status == 404 and "ended without one" in str(answer), answer
    # A failed job has one too, with its exit status.
    failed = wait_final(
        server, submit(server, [{"sh": "exit 3", "stdin": None, "stdout": None}])["id"]
    )
    assert failed["state"] == "failed", failed
    receipt = _receipt(server, failed["id"])
    assert receipt["job"]["state"] == "failed" and receipt["steps"][0]["exit_status"] == 3


def _next_second() -> None:
    """Sleep into the next clock second: Radiance's -u+ seed differs from the last run's."""
    time.sleep(1.05 - (time.time() % 1.0))


def _direct(proj: Path, argv: list[str], out: Path, stdin: bytes | None = None) -> None:
    with open(out, "wb") as fh:
        subprocess.run(
            [str(BIN / argv[0]), *argv[1:]],
            cwd=proj,
            input=stdin,
            stdout=fh,
            check=True,
            env=rad_env(),
            timeout=60,
        )


def test_reproduce_sampled_render_within_measured_scatter(server: Any) -> None:
    """-ab 1 with -u+ (rpict's default is -u-): not byte-identical (clock seeding), compared by pixel values within a
    tolerance of three times the scatter this test measures between two direct runs."""
    home: RayHome = server.home
    proj = make_project(home)
    step = rpict(24, "-u+", "-ab", "1", "-ad", "64", "-as", "0", "-aa", "0")
    argv = ["rpict", *step["args"]]
    _direct(proj, argv, proj / "a.hdr")
    _next_second()
    _direct(proj, argv, proj / "b.hdr")
    scatter = compare_files(proj / "a.hdr", proj / "b.hdr", BIN / "pvalue")
    assert scatter.kind == "picture" and scatter.measure > 0, scatter
    job = _done(server, [step])
    _next_second()
    tolerance = f"{3 * scatter.measure:.6f}"
    proc = rayfront(home, "reproduce", str(job["id"]), "--tolerance", tolerance, cwd=proj)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cannot be byte-identical" in proc.stdout and "-u+" in proc.stdout, proc.stdout
    assert "mean relative difference" in proc.stdout, proc.stdout
    # A tolerance of 0 cannot be met: exit non-zero, the originals kept aside.
    _next_second()
    proc = rayfront(home, "reproduce", str(job["id"]), "--tolerance", "0", cwd=proj)
    assert proc.returncode == 1 and "NOT reproduced" in proc.stdout, proc.stdout + proc.stderr
    assert (proj / f".rayfront-reproduce-{job['id']}" / "out.hdr").is_file()


def test_compare_numeric_output_largest_relative_difference(
    tmp_path: Path, rayhome: RayHome
) -> None:
    """rtrace values of two -u+ runs in different seconds: numbers, largest relative
    difference above 0; the same file against itself is identical."""
    proj = make_project(rayhome)
    rays = b"".join(b"2 2 1.5 %g 0 -1\n" % (dx / 10) for dx in range(-5, 6))
    argv = ["rtrace", "-h", "-ab", "1", "-ad", "32", "-aa", "0", "scene.oct"]
    _direct(proj, argv, tmp_path / "a.txt", rays)
    _next_second()
    _direct(proj, argv, tmp_path / "b.txt", rays)
    diff = compare_files(tmp_path / "a.txt", tmp_path / "b.txt", None)
    assert diff.kind == "numbers" and 0 < diff.measure < 1, diff
    assert compare_files(tmp_path / "a.txt", tmp_path / "a.txt", None).kind == "identical"


def test_sampling_verdicts_from_argv_and_the_binaries_defaults(rayhome: RayHome) -> None:
    """The verdicts against what two direct runs in different seconds showed (6.0a): rpict's
    default -u- repeats; -u+ -ab 0 still scatters by pixel jitter; rtrace -ab 0 -ss 0 repeats."""
    defaults = {}
    for program in ("rpict", "rtrace", "rcontrib"):
        listing = subprocess.run(
            [str(BIN / program), "-defaults"],
            capture_output=True,
            text=True,
            env=rad_env(),
            timeout=30,
            check=False,
        ).stdout
        defaults[program] = option_defaults(listing)
    assert defaults["rpict"]["-u"] == "-" and defaults["rtrace"]["-u"] == "+"
    verdict = {
        ("rpict", "-ab", "1", "x.oct"): False,
        ("rpict", "-u+", "-ab", "0", "x.oct"): True,  # pixel jitter
        ("rpict", "-u+", "-ab", "0", "-pj", "0", "-ss", "0", "x.oct"): False,
        ("rtrace", "-ab", "0", "-ss", "0", "x.oct"): False,
        ("rtrace", "-ab", "1", "x.oct"): True,
        ("rtrace", "-u-", "-ab", "2", "x.oct"): False,
        ("rcontrib", "-u+", "-m", "sky", "x.oct"): True,
        ("oconv", "a.rad"): False,
    }
    for argv, samples in verdict.items():
        assert bool(sampling_reasons(list(argv), defaults.get(argv[0]))) is samples, argv
    assert named_files(
        ["rpict", "-af", "a.amb", "-o", "out.hdr", "@opts", "-vf", "v.vf", "s.oct"]
    ) == [
        ("a.amb", "ambient"),
        ("opts", "options file"),
        ("v.vf", "argument"),
        ("s.oct", "argument"),
    ]
    assert named_files(["rpict", "-r", ".x.hdr.resume", "-vf", "v.vf", "s.oct"])[0] == (
        "v.vf",
        "argument",
    )
    proj = make_project(rayhome)
    assert octree_sources(proj / "scene.oct") == ["scene.rad"]


def test_reproduce_on_another_server(tmp_path: Path) -> None:
    """A -u- render of server 1 made again on server 2 (--from/--host, the shared project):
    identical; the new receipt names the other host and the same inputs."""
    from splittools import make_cluster

    cluster = make_cluster(tmp_path, 2)
    try:
        first, second = cluster.names
        proj = cluster.project
        (proj / "scene.rad").write_text(SCENE)
        _direct(proj, ["oconv", "scene.rad"], proj / "scene.oct")
        run = cluster.rayfront(
            "run", "--json", "--host", first, "--stdout", "v.hdr", "--",
            *["rpict", "-u-", "-ab", "1", *VIEW, "-x", "16", "-y", "16", "scene.oct"],
        )  # fmt: skip
        job = json.loads(run.stdout)
        assert run.returncode == 0 and job["state"] == "done", run.stdout + run.stderr
        proc = cluster.rayfront(
            "reproduce", "--json", str(job["id"]), "--from", first, "--host", second
        )
        summary = json.loads(proc.stdout)
        assert proc.returncode == 0 and summary["matches"], proc.stdout + proc.stderr
        assert summary["host"] == "127.0.0.2" and summary["outputs"][0]["kind"] == "identical"
        shown = cluster.rayfront("receipt", str(summary["job"]), "--host", second)
        again, before = (
            json.loads(shown.stdout),
            json.loads(cluster.rayfront("receipt", str(job["id"]), "--host", first).stdout),
        )
        assert again["host"]["name"] == "127.0.0.2" and before["host"]["name"] == "127.0.0.1"
        assert again["inputs"] == before["inputs"]
    finally:
        cluster.stop()


def test_input_hashing_cache_confinement_and_size_limit(tmp_path: Path) -> None:
    """An input of 1 MiB or more is hashed once while unchanged; rewritten in place with the
    same size and its mtime set back, its ctime still tells, and it is hashed anew. Nothing
    outside the project is read; a sparse giant is listed by size.
    (Only the procwrap's job folder is needed here: a namespace stands in for the Job.)"""
    from types import SimpleNamespace

    from rayserver.jobs.procwrap import receipt as procwrap_receipt

    (tmp_path / "jobs" / "1").mkdir(parents=True)
    big = tmp_path / "big.oct"
    big.write_bytes(b"a" * (2 << 20))
    job = SimpleNamespace(
        job_dir=tmp_path / "jobs" / "1", outputs=SimpleNamespace(root=str(tmp_path))
    )
    first = procwrap_receipt.Receipt()
    before = first.input_hash(job, str(big))["sha256"]
    assert before == _sha(big)
    # The saved entry is what the next job takes for the unchanged file (marked to show it).
    cache = first.cache(job)
    (key,) = cache.data
    cache.data[key]["sha256"] = "f" * 64
    cache.save()
    assert procwrap_receipt.Receipt().input_hash(job, str(big))["sha256"] == "f" * 64
    stat = big.stat()
    time.sleep(0.01)
    with open(big, "r+b") as fh:
        fh.write(b"b")
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert big.stat().st_mtime_ns == stat.st_mtime_ns and big.stat().st_size == stat.st_size
    after = procwrap_receipt.Receipt().input_hash(job, str(big))["sha256"]
    assert after == _sha(big) and after != before
    # Nothing outside the project is read: a symlink out is no input, and one swapped in
    # after the check (simulated: hashed by the outside name) is refused by the confined open.
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("secret\n")
    (tmp_path / "link.txt").symlink_to(outside)
    job.workdir = str(tmp_path)
    collecting = procwrap_receipt.Receipt()
    collecting._add_input(job, 0, "link.txt", "argument", set())
    assert collecting.inputs == {}
    refused = procwrap_receipt._project_hash(str(tmp_path), str(outside))
    assert "sha256" not in refused and "not read" in refused["error"], refused
    outside.unlink()
    # A sparse file claiming more than HASH_LIMIT_BYTES is listed by size, not read through.
    sparse = tmp_path / "sparse.dat"
    with open(sparse, "wb") as fh:
        fh.truncate(procwrap_receipt.HASH_LIMIT_BYTES + 1)
    listed = procwrap_receipt.Receipt().input_hash(job, str(sparse))
    assert (
        listed["size"] == procwrap_receipt.HASH_LIMIT_BYTES + 1 and "not hashed" in listed["error"]
    )


def test_shell_step_receipt_and_reproduction(server: Any) -> None:
    """A sh step: its text as run, the files its commands read (not the one it writes, though
    it exists from before), its binaries; rtrace -ab 0 -ss 0 repeats, so the reproduction
    of its numbers is identical."""
    home: RayHome = server.home
    proj = make_project(home)
    (proj / "pts.txt").write_text("2 2 1.5 0 0 -1\n1 1 1 0 0 -1\n")
    (proj / "out.dat").write_text("from an earlier run\n")
    text = "rtrace -h -ab 0 -ss 0 scene.oct < pts.txt > out.dat"
    job = _done(server, [{"sh": text, "stdin": None, "stdout": None}])
    receipt = _receipt(server, job["id"])
    (step,) = receipt["steps"]
    assert step["sh"] == text and step["argv"][-2:] == ["-c", text], step
    inputs = {i["path"]: i["role"] for i in receipt["inputs"]}
    assert inputs == {
        "scene.oct": "argument",
        "pts.txt": "argument",
        "scene.rad": "built into scene.oct",
    }
    programs = {b["program"] for b in receipt["binaries"]}
    assert "rtrace" in programs and len(programs) == 2, programs  # and the shell
    assert receipt["deterministic"] is True, receipt["nondeterministic_because"]
    assert [o["path"] for o in receipt["outputs"]] == ["out.dat"]
    summary = rayfront_json(home, "reproduce", str(job["id"]), cwd=proj)
    assert summary["matches"] and summary["outputs"][0]["note"] == "byte-identical", summary


def test_resumed_job_keeps_the_interrupted_runs_receipt(
    server_factory: Any, rayhome: RayHome
) -> None:
    """A render interrupted by a server shutdown writes its receipt; the run that resumes it
    (the next server's) keeps that one under previous_runs, seed seconds and all, and lists
    the step it did not run again."""
    make_project(rayhome)
    srv = server_factory("-f")
    wait_until(lambda: _answers(srv), 20, "server answering")
    steps = [rpict(8, out="small.hdr"), rpict(300, "-ab", "2", "-ad", "256", "-aa", "0")]
    job_id = submit(srv, steps)["id"]
    wait_until(lambda: get(srv, job_id)["current_step"] == 2, 60, "the render running")
    time.sleep(0.5)
    os.killpg(srv.proc.pid, signal.SIGTERM)
    srv.proc.wait(60)
    first = json.loads(
        (rayhome.path / "srvstate" / "jobs" / str(job_id) / "receipt.json").read_text()
    )
    assert first["job"]["state"] == "interrupted", first["job"]
    again = server_factory("-f")
    wait_until(lambda: _answers(again), 20, "second server answering")
    job = wait_final(again, job_id, 240)
    assert job["state"] == "done" and job["resumes"] == 1, job
    receipt = _receipt(again, job_id)
    (earlier,) = receipt["previous_runs"]
    assert earlier["job"]["state"] == "interrupted" and len(earlier["steps"]) == 2
    # The resumed run did step 2 only; step 1 is listed as done by the earlier run.
    skipped, resumed = receipt["steps"]
    assert skipped == {"step": 1, "program": "rpict", "done_in_an_earlier_run": True}, skipped
    assert resumed["step"] == 2 and resumed["exit_status"] == 0, resumed
    assert earlier["steps"][1]["seed_second"] <= resumed["seed_second"]
    assert receipt["job"]["state"] == "done"


def _answers(srv: Any) -> bool:
    try:
        return srv.request("GET", "/v1/info", timeout=2)[0] == 200
    except OSError:
        return False
