"""Named tokens (issue 18, item 1): who submitted what, against a real server on 127.0.0.1.

The tokens are made by real ``rayfront token`` processes, the server reads
``<home>/config/tokens`` as it changes, and jobs are real rpict runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from typing import Any

from conftest import RayHome
from jobtools import (
    RAYFRONT,
    make_project,
    rayfront,
    rayfront_json,
    rpict,
    submit,
    wait_final,
    wait_until,
)

from rayserver.common import tokens


def _new(home: RayHome, user: str, *extra: str) -> str:
    body = rayfront_json(home, "token", "new", "--user", user, *extra, cwd=home.path)
    assert set(body) == {"user", "token"} and body["user"] == user, body
    return body["token"]


def _submit_as(server: Any, token: str) -> dict[str, Any]:
    status, body = server.request(
        "POST",
        "/v1/jobs",
        {"location": "projects", "project": "room", "steps": [rpict(8)]},
        token=token,
    )
    assert status == 201, body
    assert isinstance(body, dict)
    return body


def test_token_file_stores_hashes_only(rayhome: RayHome) -> None:
    alice = _new(rayhome, "alice")
    bob = _new(rayhome, "bob", "--role", "admin")
    path = rayhome.path / "config" / "tokens"
    text = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert alice not in text and bob not in text
    assert hashlib.sha256(alice.encode()).hexdigest() in text
    listed = rayfront_json(rayhome, "token", "list", cwd=rayhome.path)
    rows = {r["user"]: r for r in listed["tokens"]}
    assert rows["admin"]["role"] == "admin" and rows["admin"]["shared"]
    assert (rows["alice"]["role"], rows["bob"]["role"]) == ("user", "admin")
    assert alice not in str(listed) and all("token" not in r for r in listed["tokens"])
    # A new token for alice replaces hers; revoke removes bob's.
    again = _new(rayhome, "alice")
    entries = tokens.load(path)
    assert tokens.find(entries, again).user == "alice" and tokens.find(entries, alice) is None
    assert rayfront_json(rayhome, "token", "revoke", "bob", cwd=rayhome.path)["revoked"]
    assert set(tokens.load(path)) == {"alice"}


def test_token_cli_refusals(rayhome: RayHome) -> None:
    for args, needle in (
        (("new", "--user", "admin"), "belongs to the shared token"),
        (("new", "--user", "no spaces"), "is not usable"),
        (("revoke", "nobody"), "no token of user 'nobody'"),
        (("revoke", "admin"), "cannot be revoked"),
        (("new", "--role", "admin"), "takes no --role"),
        (("revoke",), "expected the user name"),
    ):
        proc = rayfront(rayhome, "token", *args, cwd=rayhome.path)
        assert proc.returncode != 0 and needle in proc.stderr, (args, proc.stderr)
    assert not (rayhome.path / "config" / "tokens").exists()


def test_shared_token_rotation_unchanged(rayhome: RayHome, server: Any) -> None:
    """`token new` without --user rotates the shared token, as before, and leaves named ones."""
    alice = _new(rayhome, "alice")
    before = rayhome.token()
    proc = rayfront(rayhome, "token", "new", cwd=rayhome.path)
    assert proc.returncode == 0, proc.stderr
    assert rayhome.token() != before
    assert server.request("GET", "/v1/jobs", token=before)[0] == 401
    assert server.request("GET", "/v1/jobs")[0] == 200
    assert server.request("GET", "/v1/jobs", token=alice)[0] == 200


def test_jobs_belong_to_their_user(rayhome: RayHome, server: Any) -> None:
    make_project(rayhome)
    alice, carol = _new(rayhome, "alice"), _new(rayhome, "carol")
    boss = _new(rayhome, "boss", "--role", "admin")
    mine = _submit_as(server, alice)
    shared = submit(server, [rpict(8)])
    assert (mine["user"], shared["user"]) == ("alice", "admin")
    assert wait_final(server, mine["id"])["state"] == "done"
    log_path = f"/v1/jobs/{mine['id']}/log"
    assert server.request("GET", log_path, token=alice)[0] == 200
    for token in (boss, True):  # a named admin, and the shared token
        assert server.request("GET", log_path, token=token)[0] == 200
    status, body = server.request("GET", log_path, token=carol)
    assert status == 403 and "belongs to user 'alice'" in body["error"], body
    assert "admin token" in body["error"]
    status, body = server.request("DELETE", f"/v1/jobs/{shared['id']}", token=alice)
    assert status == 403 and "'admin'" in body["error"], body
    # Everyone sees who submitted what: rayfront status shows the user column.
    proc = subprocess.run(
        [*RAYFRONT, "status"],
        env={**rayhome.env, "RAYFRONT_TOKEN": carol},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert "alice" in lines[str(mine["id"])].split() and "admin" in lines[str(shared["id"])]


def test_tokens_file_reloaded_and_bad_edit_kept(rayhome: RayHome, server: Any) -> None:
    path = rayhome.path / "config" / "tokens"
    alice = _new(rayhome, "alice")
    assert server.request("GET", "/v1/jobs", token=alice)[0] == 200
    good = path.read_text()
    # A broken hand edit: the server keeps the entries it had, and says why.
    path.write_text(good + "mallory admin 2026-12-01T00:00:00Z abc\n")
    os.chmod(path, 0o640)
    assert server.request("GET", "/v1/jobs", token=alice)[0] == 200
    server.wait_for("line 4: expected a sha256")
    path.write_text(good)
    os.chmod(path, 0o640)
    proc = rayfront(rayhome, "token", "revoke", "alice", cwd=rayhome.path)
    assert proc.returncode == 0, proc.stderr
    status, body = server.request("GET", "/v1/jobs", token=alice)
    assert status == 401 and "revoked" in body["error"], body
    # Unchanged: the shared token is still admin, and an existing install has no tokens file.
    assert server.request("GET", "/v1/jobs")[0] == 200
    wait_until(lambda: "named tokens from" in server.output, 5, "the reload logged")


def test_concurrent_token_commands_lose_nothing(rayhome: RayHome) -> None:
    """Eight real `rayfront token new --user` at once: the lock keeps every one."""
    env = {k: v for k, v in rayhome.env.items() if k != "RAYFRONT_TOKEN"}
    procs = [
        subprocess.Popen(
            [*RAYFRONT, "token", "new", "--user", f"u{i}", "--json"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    entries = tokens.load(rayhome.path / "config" / "tokens")
    assert set(entries) == {f"u{i}" for i in range(8)}
    for i, (out, _err) in enumerate(outputs):
        assert tokens.find(entries, json.loads(out)["token"]).user == f"u{i}"
