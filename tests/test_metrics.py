"""GET /metrics (issue 18, item 3) against a real server, promtool and a real Prometheus.

The Prometheus test starts Debian's ``prometheus`` binary itself, as a child in
its own session with a temporary config and data folder, listening on
127.0.0.1 only, scraping the test's server every second; it is stopped in
``finally``. Without the package the tests needing it skip (fail under CI=true).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from conftest import RayHome, free_port
from jobtools import make_project, rayfront_json, rpict, submit, wait_final, wait_until
from services import need_service

from rayserver.jobs.jobdb import JobDB


def _scrape(server: Any, token: str | bool = False) -> str:
    status, body = server.request("GET", "/metrics", token=token)
    assert status == 200, body
    assert isinstance(body, str)
    return body


def _value(text: str, sample: str) -> float:
    """The value of one sample line, e.g. ``rayserver_jobs{state="done"}``."""
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    raise AssertionError(f"no sample {sample} in:\n{text}")


def test_metrics_count_jobs_requests_refusals_and_events(rayhome: RayHome, server: Any) -> None:
    make_project(rayhome)
    job = submit(server, [rpict(16)])
    assert wait_final(server, job["id"])["state"] == "done"
    assert server.request("GET", "/v1/jobs", token="w" * 40)[0] == 401
    JobDB(rayhome.path / "srvstate" / "jobs.sqlite3").add_event(job["id"], "log_capped")
    conn = http.client.HTTPConnection("127.0.0.1", rayhome.port, timeout=10)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    text = resp.read().decode()
    conn.close()
    assert _value(text, 'rayserver_jobs{state="done"}') == 1
    assert _value(text, 'rayserver_jobs{state="queued"}') == 0
    assert _value(text, "rayserver_queue_length") == 0
    assert _value(text, "rayserver_cpu_slots_free") == 2  # the hosts record's cpus, none used
    assert _value(text, "rayserver_job_duration_seconds_count") == 1
    assert _value(text, 'rayserver_job_duration_seconds_bucket{le="+Inf"}') == 1
    assert _value(text, "rayserver_job_duration_seconds_sum") > 0
    assert _value(text, 'rayserver_refusals_total{reason="token"}') >= 1
    assert _value(text, 'rayserver_job_events_total{event="log_capped"}') == 1
    assert _value(text, 'rayserver_http_requests_total{method="POST",code="201"}') == 1
    assert "# TYPE rayserver_job_duration_seconds histogram" in text


def _token_mode(home: RayHome, server_factory: Any) -> Any:
    home.write_settings(f'bind = "127.0.0.1"\nport = {home.port}\nmetrics_auth = "token"\n')
    srv = server_factory("-f")
    wait_until(lambda: srv.request("GET", "/v1/info", token=False)[0] == 200, 20, "server up")
    return srv


def test_metrics_auth_token(rayhome: RayHome, server_factory: Any) -> None:
    home = rayhome
    srv = _token_mode(home, server_factory)
    wait_until(lambda: srv.request("GET", "/v1/info", token=False)[0] == 200, 20, "server up")
    status, body = srv.request("GET", "/metrics", token=False)
    assert status == 401 and "token is required" in body["error"], body
    scraper = rayfront_json(home, "token", "new", "--user", "prometheus", cwd=home.path)["token"]
    assert "rayserver_queue_length 0" in _scrape(srv, scraper)
    assert "rayserver_queue_length 0" in _scrape(srv, True)  # the shared token too


def test_promtool_accepts_the_page(rayhome: RayHome, server: Any) -> None:
    need_service("prometheus")
    server.request("GET", "/v1/jobs")  # so the request counter has samples
    text = _scrape(server)
    out = subprocess.run(
        ["promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, f"{out.stdout}{out.stderr}\n{text}"
    assert not (out.stdout + out.stderr).strip(), out.stdout + out.stderr  # no lint warnings


def _query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            data = json.load(resp)
    except OSError:
        return []
    return data["data"]["result"] if data.get("status") == "success" else []


def _prometheus_config(tmp: Path, target_port: int, token: str) -> Path:
    (tmp / "scraper-token").write_text(token)
    config = tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: rayserver\n"
        f"    authorization: {{type: Bearer, credentials_file: {tmp / 'scraper-token'}}}\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
    )
    return config


def test_real_prometheus_scrapes_it(rayhome: RayHome, tmp_path: Path, server_factory: Any) -> None:
    """As docs/operations.md says: metrics_auth = "token", Prometheus with a named token."""
    need_service("prometheus")
    home = rayhome
    srv = _token_mode(home, server_factory)
    make_project(home)
    job = submit(srv, [rpict(16)])
    assert wait_final(srv, job["id"])["state"] == "done"
    token = rayfront_json(home, "token", "new", "--user", "prometheus", cwd=home.path)["token"]
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    port = free_port()
    with open(prom_dir / "log", "wb") as log:
        proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={_prometheus_config(prom_dir, home.port, token)}",
                f"--storage.tsdb.path={prom_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        done = 'rayserver_jobs{state="done"}'
        found = wait_until(lambda: _query(port, done), 60, f"Prometheus has {done}", 0.5)
        assert found[0]["value"][1] == "1", found
        assert found[0]["metric"]["job"] == "rayserver"
        count = _query(port, "rayserver_job_duration_seconds_count")
        assert count and count[0]["value"][1] == "1", count
        up = _query(port, 'up{job="rayserver"}')
        assert up and up[0]["value"][1] == "1", up
    except AssertionError:
        raise AssertionError((prom_dir / "log").read_text()[-3000:]) from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_metric_names_are_documented() -> None:
    text = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    from rayserver.server import metrics

    names = set(re.findall(r'"(rayserver_[a-z_]+)"', Path(metrics.__file__).read_text()))
    assert len(names) >= 8 and all(f"`{n}" in text for n in names), sorted(names)
