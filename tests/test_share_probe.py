"""POST /v1/share-probe on real servers: seeing the probe file, and locks passing between servers.

Two servers are two real ``python -m rayserver -f`` processes with homes and
ports of their own; the second one's hosts file points its location at the
first one's projects folder, which is how two hosts see one share. A lock a
worker holds is an fcntl lock of that worker process, so the second server
(another process) must see it, exactly as a second host would on a share
whose locks work. The "share that does not lock" is built from a copy of the
probe file in another folder: same name and nonce, another inode.

Nothing is mocked. For the permission-denied answer of 'hold' a server run as
root is started without the capabilities that let root open any file.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import RayHome, http_request, make_home, ready
from test_openapi import document, response_validator

ENDPOINT = "/v1/share-probe"
# Holds live in the worker: the tests that count them or edit the hosts file opt out.
pytestmark = pytest.mark.shared_server


def probe_file(folder: Path, nonce: str | None = None, name: str | None = None) -> tuple[str, str]:
    """(file name, nonce) of a probe file the way the client creates it."""
    name = name or f".rayfront-probe-{secrets.token_hex(8)}"
    nonce = nonce or secrets.token_hex(16)
    path = folder / name
    path.write_text(nonce + "\n")
    os.chmod(path, 0o664)
    return name, nonce


def probe(
    home: RayHome,
    op: str,
    file: str,
    nonce: str,
    *,
    project: str = "p",
    location: str = "projects",
    **extra: Any,
) -> tuple[int, Any]:
    body = {
        "location": location,
        "project": project,
        "file": file,
        "nonce": nonce,
        "op": op,
        **extra,
    }
    status, answer = http_request(home, "POST", ENDPOINT, body)
    if status == 200:
        # Every success answer must be one the document promises.
        response_validator(document(), ENDPOINT, "POST", 200, "application/json").validate(answer)
    return status, answer


def ok(home: RayHome, op: str, file: str, nonce: str, **extra: Any) -> dict[str, Any]:
    status, answer = probe(home, op, file, nonce, **extra)
    assert status == 200, answer
    assert answer["op"] == op
    return answer


@pytest.fixture
def project(rayhome: RayHome) -> Path:
    proj = rayhome.projects / "p"
    proj.mkdir()
    return proj


@pytest.fixture
def second(tmp_path: Path, rayhome: RayHome, server_factory: Any) -> tuple[RayHome, Any]:
    """Another rayserver (own home and port) whose location is the first one's projects."""
    home = make_home(tmp_path / "b")
    home.write_hosts(f'{home.host} 1 projects="{rayhome.projects}"\n')
    return home, ready(server_factory("-f", home=home))


def test_read_sees_the_file_only_with_the_nonce(
    server: Any, rayhome: RayHome, project: Path
) -> None:
    name, nonce = probe_file(project)
    answer = ok(rayhome, "read", name, nonce)
    assert answer == {
        "op": "read",
        "seen": True,
        "detail": "",
        "path": str(Path(os.path.realpath(project)) / name),
    }

    other, other_nonce = probe_file(project, nonce=secrets.token_hex(16))
    t0 = time.monotonic()
    answer = ok(rayhome, "read", other, nonce)
    assert not answer["seen"] and "something other than the client's nonce" in answer["detail"]
    assert other_nonce not in answer["detail"], "the answer must not show the file's content"
    assert time.monotonic() - t0 >= 2.8, "a read must wait for a share to catch up"

    missing = f".rayfront-probe-{secrets.token_hex(8)}"
    answer = ok(rayhome, "read", missing, nonce)
    assert not answer["seen"] and "does not exist on this server" in answer["detail"]
    assert answer["path"].endswith(missing)
    assert not (project / missing).exists(), "the server must never create the file"


def test_read_waits_for_a_file_that_appears_late(
    server: Any, rayhome: RayHome, project: Path
) -> None:
    name, nonce = f".rayfront-probe-{secrets.token_hex(8)}", secrets.token_hex(16)
    # A share that shows the client's file a second late (NFS attribute cache).
    timer = threading.Timer(1.0, probe_file, (project, nonce, name))
    timer.start()
    try:
        t0 = time.monotonic()
        answer = ok(rayhome, "read", name, nonce)
        took = time.monotonic() - t0
    finally:
        timer.cancel()
        timer.join()
    assert answer["seen"], answer
    assert 0.9 <= took < 2.5, took


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("file", "../etc/passwd", "file: expected a plain file name of the form .rayfront-probe-"),
        ("file", ".rayfront-probe-short", "file: expected"),
        ("file", ".rayfront-probe-" + "A" * 16, "file: expected"),
        ("file", ".rayfront-probe-" + "a" * 16 + "\n", "file: expected"),
        ("file", 12, "file: expected a string"),
        ("nonce", "abc", "nonce: expected 16 to 128 lowercase hex digits"),
        ("nonce", "a" * 129, "nonce: expected 16 to 128"),
        ("op", "lock", "op: expected one of read, hold, test, release, got 'lock'"),
        ("location", "", "location: must not be empty"),
        ("hold_seconds", 0, "hold_seconds: must be at least 1"),
        ("hold_seconds", 121, "hold_seconds: must be at most 120"),
        ("colour", "red", "unknown field 'colour'"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(
    server: Any, rayhome: RayHome, project: Path, field: str, value: Any, expected: str
) -> None:
    name, nonce = probe_file(project)
    body = {
        "location": "projects",
        "project": "p",
        "file": name,
        "nonce": nonce,
        "op": "hold",
        field: value,
    }
    status, answer = http_request(rayhome, "POST", ENDPOINT, body)
    assert status == 422, answer
    assert expected in answer["error"], answer


def test_op_rules_and_body_errors(server: Any, rayhome: RayHome, project: Path) -> None:
    name, nonce = probe_file(project)
    base = {"location": "projects", "project": "p", "file": name, "nonce": nonce}
    cases = [
        ({**base}, 422, "missing required field 'op'"),
        ({**base, "op": "release"}, 422, "missing required field 'hold_id'"),
        ({**base, "op": "read", "hold_id": "a" * 32}, 422, "hold_id: only for op 'release'"),
        ({**base, "op": "test", "hold_seconds": 5}, 422, "hold_seconds: only for op 'hold'"),
        ({**base, "op": "release", "hold_id": "xyz"}, 422, "hold_id: expected the hold_id"),
        (["not", "an", "object"], 422, "the probe must be a JSON object"),
    ]
    for body, expected, words in cases:
        status, answer = http_request(rayhome, "POST", ENDPOINT, body)
        assert status == expected and words in answer["error"], (body, answer)
    # Not JSON at all: the same statuses as a job submission.
    import http.client

    for ctype, data, expected, words in (
        ("text/plain", b"{}", 415, "Content-Type"),
        ("application/json", b"{", 400, "not valid JSON"),
    ):
        conn = http.client.HTTPConnection("127.0.0.1", rayhome.port, timeout=10)
        try:
            conn.request(
                "POST",
                ENDPOINT,
                body=data,
                headers={"Content-Type": ctype, "Authorization": f"Bearer {rayhome.token()}"},
            )
            resp = conn.getresponse()
            text = resp.read().decode()
        finally:
            conn.close()
        assert resp.status == expected and words in text, text


def test_location_and_project_errors_match_job_submission(
    server: Any, rayhome: RayHome, project: Path
) -> None:
    name, nonce = probe_file(project)
    job = {"steps": [{"program": "oconv", "args": []}]}
    for where, expected in (
        ({"location": "elsewhere", "project": "p"}, 404),
        ({"location": "projects", "project": "nope"}, 404),
        ({"location": "projects", "project": "/etc"}, 403),
        ({"location": "projects", "project": "../.."}, 403),
    ):
        status_job, answer_job = http_request(rayhome, "POST", "/v1/jobs", {**where, **job})
        status, answer = http_request(
            rayhome, "POST", ENDPOINT, {**where, "file": name, "nonce": nonce, "op": "read"}
        )
        assert status == status_job == expected, (answer, answer_job)
        assert answer["error"] == answer_job["error"], (answer, answer_job)
    assert (
        "location 'elsewhere' is not known"
        in http_request(
            rayhome,
            "POST",
            ENDPOINT,
            {"location": "elsewhere", "project": "p", "file": name, "nonce": nonce, "op": "read"},
        )[1]["error"]
    )


@pytest.mark.shared_server(False)
def test_a_location_added_to_the_hosts_file_is_found_without_restart(
    server: Any, rayhome: RayHome, tmp_path: Path
) -> None:
    extra = tmp_path / "extra"
    (extra / "q").mkdir(parents=True)
    name, nonce = probe_file(extra / "q")
    hosts = rayhome.path / "config" / "hosts"
    hosts.write_text(hosts.read_text().replace('projects="', f'extra="{extra}" projects="', 1))
    assert ok(rayhome, "read", name, nonce, location="extra", project="q")["seen"]


def test_the_token_is_required(server: Any, rayhome: RayHome, project: Path) -> None:
    name, nonce = probe_file(project)
    body = {"location": "projects", "project": "p", "file": name, "nonce": nonce, "op": "hold"}
    status, answer = http_request(rayhome, "POST", ENDPOINT, body, token=False)
    assert status == 401 and "token is required" in answer["error"], answer
    status, answer = http_request(rayhome, "POST", ENDPOINT, body, token="x" * 40)
    assert status == 401 and "wrong token" in answer["error"], answer
    with open(project / name, "rb") as fh:
        # No hold was taken: this process can lock the file at once.
        fcntl.lockf(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)


def _locked_here(path: Path) -> bool:
    """Whether a process other than this one holds a lock on ``path`` (asked by pytest)."""
    with open(path, "rb") as fh:
        try:
            fcntl.lockf(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        return False


def test_hold_on_one_server_is_seen_by_the_other(
    server: Any, rayhome: RayHome, project: Path, second: tuple[RayHome, Any]
) -> None:
    home_b, _srv_b = second
    name, nonce = probe_file(project)
    assert ok(home_b, "read", name, nonce)["seen"]
    held = ok(rayhome, "hold", name, nonce, hold_seconds=60)
    assert held["held"] is True and held["expires_in"] == 60, held
    assert _locked_here(project / name), "the hold is no real fcntl lock"

    assert ok(home_b, "test", name, nonce) == {"op": "test", "locked": True, "detail": ""}
    # Neither server can take a second hold; the holder says it is its own.
    again = ok(rayhome, "hold", name, nonce)
    assert not again["held"] and "already locked by this server" in again["detail"], again
    other = ok(home_b, "hold", name, nonce)
    assert other == {"op": "hold", "held": False, "detail": "already locked by another process"}
    # Testing on the holder itself proves nothing, and must not drop the lock.
    own = ok(rayhome, "test", name, nonce)
    assert not own["locked"] and "holds that lock itself" in own["detail"], own
    assert ok(rayhome, "read", name, nonce)["seen"]
    assert ok(home_b, "test", name, nonce)["locked"], "a read or test on the holder dropped it"

    # A wrong nonce does not release someone else's hold.
    wrong = ok(rayhome, "release", name, secrets.token_hex(16), hold_id=held["hold_id"])
    assert not wrong["released"] and "another probe" in wrong["detail"], wrong
    assert ok(rayhome, "release", name, nonce, hold_id=held["hold_id"]) == {
        "op": "release",
        "released": True,
    }
    assert not _locked_here(project / name)
    free = ok(home_b, "test", name, nonce)
    assert free == {
        "op": "test",
        "locked": False,
        "detail": "no lock seen although another server holds one",
    }
    gone = ok(rayhome, "release", name, nonce, hold_id=held["hold_id"])
    assert not gone["released"] and "no hold" in gone["detail"], gone
    # The server never changed the file.
    assert (project / name).read_text() == nonce + "\n"


def test_a_hold_expires(
    server: Any, rayhome: RayHome, project: Path, second: tuple[RayHome, Any]
) -> None:
    home_b, _srv_b = second
    name, nonce = probe_file(project)
    held = ok(rayhome, "hold", name, nonce, hold_seconds=1)
    assert held["held"] and held["expires_in"] == 1
    assert ok(home_b, "test", name, nonce)["locked"]
    deadline = time.monotonic() + 5
    while _locked_here(project / name):
        assert time.monotonic() < deadline, "the hold did not expire after 1 s"
        time.sleep(0.1)
    assert not ok(home_b, "test", name, nonce)["locked"]
    assert not ok(rayhome, "release", name, nonce, hold_id=held["hold_id"])["released"]


def test_a_lock_of_another_process_is_seen(server: Any, rayhome: RayHome, project: Path) -> None:
    name, nonce = probe_file(project)
    with open(project / name, "r+b") as fh:
        fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert ok(rayhome, "test", name, nonce)["locked"]
        blocked = ok(rayhome, "hold", name, nonce)
        assert blocked == {
            "op": "hold",
            "held": False,
            "detail": "already locked by another process",
        }
        fcntl.lockf(fh, fcntl.LOCK_UN)
        assert not ok(rayhome, "test", name, nonce)["locked"]


def test_a_copy_of_the_file_is_not_a_share_that_locks(
    server: Any, rayhome: RayHome, project: Path, tmp_path: Path, server_factory: Any
) -> None:
    # Server B's "projects" is another folder with a copy (a synced folder):
    # it sees the same name and nonce, but a lock on A's file never reaches it.
    home_b = make_home(tmp_path / "synced")
    (home_b.projects / "p").mkdir()
    home_b.write_hosts(f'{home_b.host} 1 projects="{home_b.projects}"\n')
    ready(server_factory("-f", home=home_b))
    name, nonce = probe_file(project)
    probe_file(home_b.projects / "p", nonce=nonce, name=name)

    assert ok(rayhome, "read", name, nonce)["seen"]
    assert ok(home_b, "read", name, nonce)["seen"], "the copy looks like the same file"
    held = ok(rayhome, "hold", name, nonce)
    assert held["held"]
    test = ok(home_b, "test", name, nonce)
    assert test == {
        "op": "test",
        "locked": False,
        "detail": "no lock seen although another server holds one",
    }
    assert ok(rayhome, "release", name, nonce, hold_id=held["hold_id"])["released"]


@pytest.mark.shared_server(False)
def test_at_most_32_holds(server: Any, rayhome: RayHome, project: Path) -> None:
    files = [probe_file(project) for _ in range(33)]
    ids = [ok(rayhome, "hold", name, nonce)["hold_id"] for name, nonce in files[:32]]
    status, answer = probe(rayhome, "hold", *files[32])
    assert status == 429 and "32 probe locks" in answer["error"], answer
    assert not _locked_here(project / files[32][0])
    assert ok(rayhome, "release", *files[0], hold_id=ids[0])["released"]
    assert ok(rayhome, "hold", *files[32])["held"]


def test_a_symlink_is_not_the_probe_file(
    server: Any, rayhome: RayHome, project: Path, tmp_path: Path
) -> None:
    # A link to a file outside the project must not get that file locked.
    outside_name, nonce = probe_file(tmp_path)
    link = f".rayfront-probe-{secrets.token_hex(8)}"
    (project / link).symlink_to(tmp_path / outside_name)
    answer = ok(rayhome, "hold", link, nonce)
    assert not answer["held"] and "symbolic link" in answer["detail"], answer
    assert not _locked_here(tmp_path / outside_name)
    assert "symbolic link" in ok(rayhome, "test", link, nonce)["detail"]


def test_a_restarted_worker_has_no_holds(
    server: Any, rayhome: RayHome, project: Path, second: tuple[RayHome, Any]
) -> None:
    home_b, _srv_b = second
    name, nonce = probe_file(project)
    held = ok(rayhome, "hold", name, nonce, hold_seconds=120)
    assert ok(home_b, "test", name, nonce)["locked"]
    worker = server.request("GET", "/v1/info")[1]["pid"]
    # The worker is our server's child (the supervisor respawns it).
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        try:
            status, info = server.request("GET", "/v1/info", timeout=2)
            if status == 200 and info["pid"] != worker:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, server.output
        time.sleep(0.1)
    assert not ok(home_b, "test", name, nonce)["locked"]
    gone = ok(rayhome, "release", name, nonce, hold_id=held["hold_id"])
    assert not gone["released"] and "restarted" in gone["detail"], gone


# Root opens any file: as root, the server runs without the two capabilities that let it
# (setpriv drops them from its bounding set), so the file's mode refuses it as it would
# refuse any user.
NO_DAC = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all")


def test_a_file_the_server_cannot_write_is_explained(
    server_factory: Any, rayhome: RayHome, project: Path
) -> None:
    ready(server_factory("-f", wrapper=NO_DAC if os.geteuid() == 0 else ()))
    name, nonce = probe_file(project)
    os.chmod(project / name, 0o444)
    answer = ok(rayhome, "hold", name, nonce)
    assert not answer["held"] and "permission denied" in answer["detail"], answer
    assert "write access to the project directory" in answer["detail"]


def test_the_client_method(
    server: Any, rayhome: RayHome, project: Path, second: tuple[RayHome, Any]
) -> None:
    from rayserver.client.connection import Client, ClientError, Target

    home_b, _srv_b = second
    a = Client(Target(rayhome.host, "127.0.0.1", rayhome.port), rayhome.token())
    b = Client(Target(home_b.host, "127.0.0.1", home_b.port), home_b.token())
    name, nonce = probe_file(project)
    body = {"location": "projects", "project": "p", "file": name, "nonce": nonce}
    assert a.share_probe({**body, "op": "read"})["seen"]
    held = a.share_probe({**body, "op": "hold", "hold_seconds": 10})
    assert b.share_probe({**body, "op": "test"})["locked"]
    assert a.share_probe({**body, "op": "release", "hold_id": held["hold_id"]})["released"]
    with pytest.raises(ClientError) as err:
        a.share_probe({**body, "op": "read", "nonce": "xyz"})
    assert err.value.status == 422 and "nonce: expected" in str(err.value)
