"""Fuzzing the HTTP API of a live rayserver with schemathesis, from docs/openapi.yaml.

A real ``python -m rayserver -f`` (supervisor, worker, fork server) serves a
temporary home with a project and a few finished jobs, so generated ids, logs
and cancels hit real rows, not only 404s. schemathesis' own command line
(``st run``) then sends a bounded, seeded number of generated requests per
operation, with the token, and checks every answer:

- ``not_a_server_error``: no 5xx at all;
- ``status_code_conformance`` and ``content_type_conformance``: every answer
  is one the document promises;
- ``ignored_auth``: operations that demand the token refuse a request
  without it.

``GET /v1/events`` is left out: its answer is a stream that stays open by
design, so every generated case would wait out the request timeout (the
whole run went past 240 s with it). Its refusals are checked here directly
instead, and its stream by tests/test_push.py.

Afterwards the server must still answer, with the same worker pid (a crash
would have been hidden by the supervisor's restart), and its output and log
must hold no traceback and no "internal error".
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, RayHome

from rayserver.common import radiance
from rayserver.common.settings import Settings

SETTINGS = Settings()
BIN = radiance.bin_dir(SETTINGS)
SCENE = """\
void light bright 0 0 3 100 100 100
bright sphere lamp 0 0 4 2 2 2.5 0.3
void plastic grey 0 0 5 .6 .6 .6 0 0
grey polygon floor 0 0 12 0 0 0  4 0 0  4 4 0  0 4 0
"""
# Bounded and reproducible: this many generated cases per operation and phase.
MAX_EXAMPLES = 40
SEED = 20261
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,ignored_auth"
FINAL = ("done", "failed", "cancelled", "interrupted")


def _st() -> str:
    exe = Path(sys.executable).parent / "st"
    found = str(exe) if exe.exists() else shutil.which("st")
    if not found:
        pytest.fail("schemathesis' 'st' command is not installed (pip install -e '.[test]')")
    return found


def _seed_jobs(srv: Any, home: RayHome) -> list[int]:
    """A project and a few finished jobs (done, failed, cancelled) for the fuzzer to find."""
    proj = home.projects / "room"
    proj.mkdir()
    (proj / "scene.rad").write_text(SCENE)
    (proj / "points.txt").write_text("2 2 1 0 0 -1\n")
    steps = [
        [{"program": "oconv", "args": ["scene.rad"], "stdin": None, "stdout": "scene.oct"}],
        [
            {
                "program": "rtrace",
                "args": ["-h", "scene.oct"],
                "stdin": "points.txt",
                "stdout": "out.txt",
            }
        ],
        [{"program": "rtrace", "args": ["missing.oct"], "stdin": "points.txt", "stdout": None}],
    ]
    ids = []
    for step in steps:
        status, body = srv.request(
            "POST", "/v1/jobs", {"location": "projects", "project": "room", "steps": step}
        )
        assert status == 201, body
        ids.append(body["id"])
        status, body = srv.request("GET", f"/v1/jobs/{ids[-1]}?wait=30", timeout=60)
        assert status == 200 and body["state"] in FINAL, body
    return ids


def _report_counts(path: Path) -> tuple[int, list[str]]:
    """(test cases generated, failure descriptions) from schemathesis' ndjson event stream."""
    cases, failures = 0, []
    for line in path.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if finished:
            recorder = finished.get("recorder") or {}
            cases += len(recorder.get("cases") or {})
            for checks in (recorder.get("checks") or {}).values():
                for check in checks:
                    if str(check.get("status")).lower() == "failure":
                        failures.append(f"{check.get('name')}: {check.get('failure_info')}")
    return cases, failures


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(
    server: Any, rayhome: RayHome, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed_jobs(server, rayhome)
    status, info = server.request("GET", "/v1/info")
    assert status == 200
    worker = info["pid"]
    report = tmp_path / "events.ndjson"
    cmd = [
        _st(),
        "run",
        str(REPO / "docs" / "openapi.yaml"),
        "--url",
        f"http://127.0.0.1:{rayhome.port}",
        "--header",
        f"Authorization: Bearer {rayhome.token()}",
        "--checks",
        CHECKS,
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--phases",
        "examples,coverage,fuzzing",
        "--request-timeout",
        "20",
        "--workers",
        "1",
        "--no-shrink",
        "--report",
        "ndjson",
        "--report-ndjson-path",
        str(report),
        "--exclude-path",
        "/v1/events",
        "--continue-on-failure",
        "--suppress-health-check",
        "all",
    ]
    t0 = time.monotonic()
    # schemathesis keeps its own state in the working folder: run it in tmp.
    run = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )
    took = time.monotonic() - t0
    out = run.stdout + run.stderr
    cases, failures = _report_counts(report) if report.exists() else (0, [])
    with capsys.disabled():
        print(
            f"\nschemathesis: {cases} generated requests in {took:.1f} s, "
            f"{len(failures)} failed checks"
        )
    assert run.returncode == 0 and not failures, out[-6000:] + "\n" + "\n".join(failures[:20])
    assert cases >= 200, f"only {cases} cases ran:\n{out[-3000:]}"

    _events_refusals(server, rayhome)
    # Still the same worker, still answering, nothing crashed on the way.
    status, after = server.request("GET", "/v1/info")
    assert status == 200 and after["pid"] == worker, (info, after)
    for where, text in (("terminal", server.output), ("log file", rayhome.log_file.read_text())):
        assert "internal error" not in text, f"{where}:\n{text[-4000:]}"
        assert not _unexpected_tracebacks(text), f"{where}:\n{_unexpected_tracebacks(text)[0]}"


def _events_refusals(server: Any, rayhome: RayHome) -> None:
    """What schemathesis would have checked of GET /v1/events, without opening a stream."""
    status, body = server.request("GET", "/v1/events?since=soon")
    assert status == 400 and "since" in json.dumps(body), (status, body)
    status, body = server.request("GET", "/v1/events?since=-1")
    assert status == 400, (status, body)
    conn = http.client.HTTPConnection("127.0.0.1", rayhome.port, timeout=20)
    try:
        conn.request("GET", "/v1/events")  # no token
        answer = conn.getresponse()
        assert answer.status == 401, answer.status
        assert answer.getheader("Content-Type", "").startswith("application/json")
    finally:
        conn.close()


def _unexpected_tracebacks(text: str) -> list[str]:
    """Log records with a traceback, except aiohttp's report of an unparsable request.

    aiohttp logs a malformed request line or header (the fuzzer sends a NUL
    in a header) with a traceback at ERROR and answers it with 400 itself;
    that is noise, not a failure of ours. Anything else is.
    """
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|\d\d:\d\d:\d\d )", text)
    return [r for r in records if "Traceback" in r and "BadHttpMessage" not in r]
