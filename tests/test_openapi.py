"""docs/openapi.yaml against reality: the document is sound, every route is in it, and
real answers of a running server match its response schemas (jsonschema).
"""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import referencing
import referencing.jsonschema
import schemathesis
import yaml
from conftest import REPO, RayHome

from rayserver.common.paths import Layout
from rayserver.server import api, farm, jobspec
from rayserver.server.confwatch import LiveConfig
from rayserver.server.dashboard import routes as dashboard

pytestmark = pytest.mark.shared_server

DOC_URI = "urn:test:openapi"


def document() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docs" / "openapi.yaml").read_text())


def _pointer(*parts: str) -> str:
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def response_validator(
    doc: dict[str, Any], path: str, method: str, status: int, ctype: str
) -> jsonschema.Draft202012Validator:
    """The schema the document gives for one answer; fails if that answer is undocumented."""
    op = doc["paths"][path][method.lower()]
    assert str(status) in op["responses"], f"{method} {path} -> {status} is not documented"
    answer = op["responses"][str(status)]
    parts = ["paths", path, method.lower(), "responses", str(status)]
    if "$ref" in answer:
        parts = answer["$ref"].lstrip("#/").split("/")
        answer = doc["components"]["responses"][parts[-1]]
    assert ctype in answer["content"], f"{method} {path} -> {status} is not documented as {ctype}"
    resource = referencing.Resource.from_contents(
        doc, default_specification=referencing.jsonschema.DRAFT202012
    )
    registry = referencing.Registry().with_resource(DOC_URI, resource)
    ref = DOC_URI + "#" + _pointer(*parts, "content", ctype, "schema")
    return jsonschema.Draft202012Validator({"$ref": ref}, registry=registry)


def test_docs_file_is_the_installed_package_file() -> None:
    docs, package = REPO / "docs" / "openapi.yaml", REPO / "rayserver" / "server" / "openapi.yaml"
    assert os.path.samefile(docs, package)
    assert '"openapi.yaml"' in (REPO / "pyproject.toml").read_text()
    assert jobspec.openapi_document() == document()


def test_document_is_sound() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1")
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    loaded = schemathesis.openapi.from_dict(doc)
    ops = {(op.ok().method.upper(), op.ok().path) for op in loaded.get_all_operations()}
    assert ("POST", "/v1/jobs") in ops and ("POST", "/v1/share-probe") in ops and len(ops) == 21
    # every $ref points somewhere
    text = json.dumps(doc)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        node: Any = doc
        for key in ref.lstrip("#/").split("/"):
            node = node[key]


def test_every_route_is_documented_and_every_path_served(rayhome: RayHome) -> None:
    layout = Layout(rayhome.path, rayhome.host)
    ctx = api.AppContext(layout=layout, live=LiveConfig(layout), db=None, scheduler=None)
    app = api.build_app(ctx)
    dashboard.setup_dashboard(app, ctx)
    farm.setup_farm(app, ctx)
    served = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD" and path and (path.startswith("/v1/") or path == "/metrics"):
            served.add((route.method, path))
    documented = {
        (m.upper(), p)
        for p, ops in document()["paths"].items()
        for m in ops
        if m in ("get", "post", "put", "delete", "patch")
    }
    assert served == documented


def _call(
    home: RayHome,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: bool = True,
    ctype: str | None = "application/json",
) -> tuple[int, str, Any]:
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {home.token()}"
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        if ctype:
            headers["Content-Type"] = ctype
    conn = http.client.HTTPConnection("127.0.0.1", home.port, timeout=60)
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        media = resp.getheader("Content-Type", "").split(";")[0]
        return resp.status, media, json.loads(raw) if media == "application/json" else raw
    finally:
        conn.close()


def test_real_answers_match_the_documented_schemas(server: Any, rayhome: RayHome) -> None:
    proj = rayhome.projects / "p"
    proj.mkdir()
    (proj / "scene.rad").write_text("void light l 0 0 3 1 1 1\nl sphere s 0 0 4 0 0 2 .5\n")
    Path(proj / "pts.txt").write_text("0 0 0 0 0 1\n")
    job = {
        "location": "projects",
        "project": "p",
        "steps": [
            {"program": "oconv", "args": ["scene.rad"], "stdout": "s.oct"},
            {"program": "rtrace", "args": ["-h", "s.oct"], "stdin": "pts.txt", "stdout": "o.txt"},
        ],
    }
    doc = document()
    checked: list[tuple[str, str, int]] = []

    def check(
        template: str, method: str, path: str, expected: int, body: Any = None, **kw: Any
    ) -> Any:
        status, media, answer = _call(rayhome, method, path, body, **kw)
        assert status == expected, answer
        validator = response_validator(doc, template, method, status, media)
        if media == "application/json":
            validator.validate(answer)
        checked.append((method, template, status))
        return answer

    check("/v1/info", "GET", "/v1/info", 200, token=False)
    check("/v1/openapi.yaml", "GET", "/v1/openapi.yaml", 200, token=False)
    created = check("/v1/jobs", "POST", "/v1/jobs", 201, job)
    jid = created["id"]
    done = check("/v1/jobs/{id}", "GET", f"/v1/jobs/{jid}?wait=30", 200)
    assert done["state"] == "done"
    check("/v1/jobs", "GET", "/v1/jobs?limit=1", 200)
    check("/v1/jobs/{id}/log", "GET", f"/v1/jobs/{jid}/log", 200)
    check("/v1/jobs/{id}", "DELETE", f"/v1/jobs/{jid}", 409)
    check("/v1/jobs/{id}", "GET", "/v1/jobs/4242", 404)
    check("/v1/jobs/{id}", "GET", "/v1/jobs/x", 400)
    check("/v1/jobs", "GET", "/v1/jobs?state=nope", 400)
    check("/v1/jobs", "POST", "/v1/jobs", 401, job, token=False)
    check("/v1/jobs", "POST", "/v1/jobs", 400, b"{", ctype="application/json")
    check("/v1/jobs", "POST", "/v1/jobs", 415, job, ctype="text/plain")
    check("/v1/jobs", "POST", "/v1/jobs", 422, {**job, "priority": 1000})
    check("/v1/jobs", "POST", "/v1/jobs", 404, {**job, "location": "elsewhere"})
    check("/v1/jobs", "POST", "/v1/jobs", 403, {**job, "project": "/etc"})
    # Two readers of s.oct with outputs of their own: jobs that run together must not
    # rewrite a file another reads (two copies of job, oconv > s.oct each, failed).
    readers = [{**job, "steps": [{**job["steps"][1], "stdout": f"o{n}.txt"}]} for n in (1, 2)]
    batch = check("/v1/jobs/batch", "POST", "/v1/jobs/batch", 201, {"jobs": readers})
    assert [j["id"] for j in batch["jobs"]] == [jid + 1, jid + 2]
    check(
        "/v1/jobs/batch", "POST", "/v1/jobs/batch", 422, {"jobs": [job, {**job, "priority": 1000}]}
    )
    check("/v1/jobs/{id}/preview.png", "GET", "/v1/jobs/4242/preview.png", 404)
    check("/v1/jobs/{id}/stdout", "GET", f"/v1/jobs/{jid}/stdout", 409)
    check("/v1/jobs/{id}/stdin", "PUT", f"/v1/jobs/{jid}/stdin", 409, b"x", ctype=None)
    # Each batch job ran (and the streamed job below is the only one left running).
    for other in batch["jobs"]:
        waited = _call(rayhome, "GET", f"/v1/jobs/{other['id']}?wait=60")[2]
        assert waited["state"] == "done", waited
    stream = {"stream": True}
    piped = {**job, "steps": [{**job["steps"][1], "stdin": stream, "stdout": stream}]}
    piped["steps"][0]["args"] = ["-h", "s.oct"]
    sid = check("/v1/jobs", "POST", "/v1/jobs", 201, piped)["id"]
    sent = check("/v1/jobs/{id}/stdin", "PUT", f"/v1/jobs/{sid}/stdin", 200, b"0 0 0 0 0 1\n")
    assert sent == {"id": sid, "bytes": 12}
    out = check("/v1/jobs/{id}/stdout", "GET", f"/v1/jobs/{sid}/stdout", 200)
    assert out.count(b"\t") == 3
    hosts = check("/v1/farm", "GET", "/v1/farm", 200)["hosts"]
    assert [h["self"] for h in hosts] == [True]
    check("/v1/farm/{host}/jobs", "GET", "/v1/farm/nohost/jobs", 404)
    check("/v1/jobs/{id}/grid.png", "GET", f"/v1/jobs/{jid}/grid.png", 200)  # pts.txt -> o.txt
    check("/v1/jobs/{id}/grid.png", "GET", "/v1/jobs/4242/grid.png", 404)
    assert len(checked) == 28
