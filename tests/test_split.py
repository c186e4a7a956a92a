"""``rayfront run --hosts``: one simulation split across three real rayservers on 127.0.0.x.

The servers have their own installation directories, ports and names (from
the ``name`` setting) and share one project directory, as render hosts
sharing a file server do. Direct-light runs (``-ab 0 -dt 0``) are
deterministic, so a split run must give the very bytes / pixels of one run;
with ambient sampling the picture is compared within a tolerance derived
from the ambient accuracy ``-aa``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import free_port, our_pids
from splittools import (
    RADIANCE_ENV,
    Cluster,
    api,
    as_json,
    finish,
    jobs_of,
    make_cluster,
    picture_size,
    picture_values,
    run_local,
    write_points,
    write_scene,
)

from rayserver.client import splitplan

DIRECT = ["-ab", "0", "-dt", "0"]


# One xdist worker runs the split modules, in order: its module-scoped fixture is built
# once, and consecutive tests of the other split modules share three_servers.
pytestmark = pytest.mark.xdist_group("split")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three servers with one cpu each, plus a fourth record nobody answers on."""
    base = tmp_path_factory.mktemp("split")
    dead = f'127.0.0.4:{free_port()} 1 projects="{base / "projects"}"\n'
    c = make_cluster(base, 3, extra_records=dead)
    try:
        write_scene(c.project)
        write_points(c.project / "grid.pts", 2000)
        yield c
    finally:
        c.stop()


def test_grid_split_gives_the_bytes_of_one_rtrace_run(cluster: Cluster) -> None:
    args = ["rtrace", "-h", "-I", *DIRECT, "-ds", "0.05", "scene.oct"]
    run_local(args, cluster.project, cluster.project / "grid.pts", cluster.project / "one.dat")
    proc = cluster.rayfront(
        "run",
        "--json",
        "--hosts",
        "all",
        "--stdin",
        "grid.pts",
        "--stdout",
        "split.dat",
        "--",
        *args,
    )
    summary = as_json(proc)
    assert proc.returncode == 0, proc.stderr
    assert (cluster.project / "split.dat").read_bytes() == (
        cluster.project / "one.dat"
    ).read_bytes()
    # One part per cpu, each on its own server, in input order.
    assert [p["label"] for p in summary["parts"]] == [
        "rays 1-666 of 2000",
        "rays 667-1333 of 2000",
        "rays 1334-2000 of 2000",
    ]
    assert sorted(p["host"] for p in summary["parts"]) == sorted(cluster.names)
    # --hosts all leaves out the record nobody answers on, and says so.
    assert [h["host"] for h in summary["hosts"]] == cluster.names
    assert any("leaving out 127.0.0.4:" in e for e in summary["events"])
    assert not (cluster.project / ".rayfront-split").exists()


def _posts_created(server: object) -> float:
    """The server's count of POSTs answered 201 (its /metrics page, a real counter)."""
    status, text = api(server, "GET", "/metrics")
    assert status == 200 and isinstance(text, str), text
    key = 'rayserver_http_requests_total{method="POST",code="201"}'
    found = [line.split()[-1] for line in text.splitlines() if line.startswith(key + " ")]
    return float(found[0]) if found else 0.0


def test_each_server_gets_its_parts_in_one_batch_request(cluster: Cluster) -> None:
    # Six parts on three cpus: two parts go to each server at once (one running, one
    # waiting in its queue), and they must arrive in one POST /v1/jobs/batch.
    args = ["rtrace", "-h", *DIRECT, "-ds", "0.07", "scene.oct"]
    before = [(_posts_created(s), len(jobs_of(s))) for s in cluster.servers]
    proc = cluster.rayfront(
        "run",
        "--json",
        "--hosts",
        "all",
        "--parts",
        "6",
        "--stdin",
        "grid.pts",
        "--stdout",
        "batch.dat",
        "--",
        *args,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(as_json(proc)["parts"]) == 6
    after = [(_posts_created(s), len(jobs_of(s))) for s in cluster.servers]
    posts = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
    jobs = [a[1] - b[1] for a, b in zip(after, before, strict=True)]
    assert jobs == [2, 2, 2], jobs
    assert posts == [1, 1, 1], posts


def test_parts_with_indirect_light_share_one_ambient_file(cluster: Cluster) -> None:
    # -ab 1 with caching: every part would rebuild the ambient cache on its own;
    # the parts get one ambient file in the run's folder instead (and lose it
    # with the folder). Values agree with one run within ambient noise.
    write_points(cluster.project / "few.pts", 600, seed=3)
    before = set((cluster.project / ".rayfront-split").glob("*"))
    args = ["rtrace", "-h", "-I", "-ab", "1", "-aa", "0.1", "-ad", "256", "-ds", "0.3", "scene.oct"]
    run_local(args, cluster.project, cluster.project / "few.pts", cluster.project / "few1.dat")
    proc = cluster.rayfront(
        "run", "--json", "--hosts", "all", "--stdin", "few.pts", "--stdout", "few.dat", "--", *args
    )
    summary = as_json(proc)
    assert proc.returncode == 0, proc.stderr
    assert any(
        "the parts share the ambient file .rayfront-split/" in e for e in summary["events"]
    ), summary["events"]
    split = [
        float(line.split()[0]) for line in (cluster.project / "few.dat").read_text().splitlines()
    ]
    one = [
        float(line.split()[0]) for line in (cluster.project / "few1.dat").read_text().splitlines()
    ]
    assert len(split) == len(one) == 600
    assert abs(statistics.fmean(split) / statistics.fmean(one) - 1) < 0.05
    assert set((cluster.project / ".rayfront-split").glob("*")) <= before


def test_header_of_the_first_part_only_and_binary_rays(cluster: Cluster) -> None:
    # Binary float input (-ff) is cut on 24-byte records, and the merged output
    # carries one header although every part wrote one.
    run_local(
        ["rcalc", "-of", "-e", "$1=$1;$2=$2;$3=$3;$4=$4;$5=$5;$6=$6"],
        cluster.project,
        cluster.project / "grid.pts",
        cluster.project / "grid.bin",
    )
    args = ["rtrace", "-ff", "-I", *DIRECT, "scene.oct"]
    run_local(args, cluster.project, cluster.project / "grid.bin", cluster.project / "one.bin")
    proc = cluster.rayfront(
        "run",
        "--hosts",
        ",".join(cluster.names[:2]),
        "--parts",
        "5",
        "--stdin",
        "grid.bin",
        "--stdout",
        "split.bin",
        "--",
        *args,
    )
    assert proc.returncode == 0, proc.stderr
    merged = (cluster.project / "split.bin").read_bytes()
    one = (cluster.project / "one.bin").read_bytes()
    assert splitplan.strip_header(merged) == splitplan.strip_header(one)
    assert merged.count(b"#?RADIANCE") == 1

    def stable(data: bytes) -> list[bytes]:  # binary output headers carry the time of day
        head = data[: len(data) - len(splitplan.strip_header(data))]
        return [line for line in head.split(b"\n") if not line.startswith((b"CAPDATE=", b"GMT="))]

    assert stable(merged) == stable(one)
    assert "merged 5 parts into" in proc.stdout


def test_picture_split_has_every_scanline_once(cluster: Cluster) -> None:
    # -ps 1 -pj 0: one sample at each pixel centre, so bands that cover the
    # picture exactly once reproduce the single render pixel for pixel.
    options = [
        "-vf",
        "room.vf",
        "-x",
        "320",
        "-y",
        "320",
        *DIRECT,
        "-ds",
        "0.2",
        "-ps",
        "1",
        "-pj",
        "0",
    ]
    run_local(["rpict", *options, "scene.oct"], cluster.project, None, cluster.project / "one.hdr")
    proc = cluster.rayfront(
        "run",
        "--json",
        "--hosts",
        "all",
        "--parts",
        "7",
        "--",
        "rpict",
        *options,
        "-o",
        "split.hdr",
        "scene.oct",
    )
    summary = as_json(proc)
    assert proc.returncode == 0, proc.stderr
    one, split = cluster.project / "one.hdr", cluster.project / "split.hdr"
    assert picture_size(split) == picture_size(one) == tuple(summary["resolution"])
    assert picture_values(split) == picture_values(one)
    data = split.read_bytes()
    header = data[: data.index(b"\n\n")].decode("latin-1")
    top_view = [line for line in header.splitlines() if line.startswith("VIEW=")]
    assert top_view and "-vv 55" in top_view[-1], header
    rows = [p["label"] for p in summary["parts"]]
    assert rows[0].startswith("rows 0-") and rows[-1].endswith(f"of {summary['resolution'][1]}")


def test_picture_with_ambient_matches_within_sampling_noise(cluster: Cluster) -> None:
    # Each band computes its own indirect light, so pixels differ by ambient
    # sampling noise. The yardstick is Radiance's own noise, two more single
    # renders: one that differs only in the number of ambient divisions (-ad 300
    # instead of 256: the same cache points, other samples) and one with -u+
    # (clock-seeded: other cache points too). The split picture may not differ
    # from the single one by more than the noisier of the two does (twice its
    # figures, plus 1%, and 2% for the mean): the mean brightness, the 95th
    # percentile of per-pixel differences, and the 90th percentile of per-row
    # mean differences. The mean's margin is measured: over runs here the split's
    # mean moved 0.3-1.6% (the plan of the parts decides where each band's cache
    # starts) and the -u+ render's 0.2-0.9%, while the -ad 300 one moves 0.1%.
    # A missing, misplaced or doubled band moves them by far more.
    options = [
        "-vf",
        "room.vf",
        "-x",
        "240",
        "-y",
        "240",
        "-ab",
        "1",
        "-aa",
        "0.1",
        "-as",
        "64",
        "-ds",
        "0.2",
    ]
    for extra, name in (
        (["-ad", "256"], "amb1.hdr"),
        (["-ad", "300"], "amb2.hdr"),
        (["-ad", "256", "-u+"], "amb3.hdr"),
    ):
        run_local(
            ["rpict", *options, *extra, "scene.oct"],
            cluster.project,
            None,
            cluster.project / name,
        )
    proc = cluster.rayfront(
        "run",
        "--hosts",
        "all",
        "--stdout",
        "amb_split.hdr",
        "--",
        "rpict",
        *options,
        "-ad",
        "256",
        "scene.oct",
    )
    assert proc.returncode == 0, proc.stderr
    width, height = picture_size(cluster.project / "amb1.hdr")
    assert picture_size(cluster.project / "amb_split.hdr") == (width, height)
    one = picture_values(cluster.project / "amb1.hdr")

    def deviations(other: Sequence[float]) -> tuple[float, float, float]:
        mean = abs(statistics.fmean(other) / statistics.fmean(one) - 1)
        pixels = sorted(abs(a - b) / max(b, 1e-3) for a, b in zip(other, one, strict=True))
        rows = sorted(
            abs(
                statistics.fmean(other[r * width : (r + 1) * width])
                / max(statistics.fmean(one[r * width : (r + 1) * width]), 1e-3)
                - 1
            )
            for r in range(height)
        )
        return mean, pixels[int(0.95 * len(pixels))], rows[int(0.9 * len(rows))]

    split = deviations(picture_values(cluster.project / "amb_split.hdr"))
    noise = [
        max(pair)
        for pair in zip(
            deviations(picture_values(cluster.project / "amb2.hdr")),
            deviations(picture_values(cluster.project / "amb3.hdr")),
            strict=True,
        )
    ]
    margins = (0.02, 0.01, 0.01)
    for what, got, floor, margin in zip(
        ("mean", "pixel p95", "row p90"), split, noise, margins, strict=True
    ):
        assert got <= 2 * floor + margin, (what, got, floor)


def test_a_failing_part_fails_the_run_and_cancels_the_rest(cluster: Cluster) -> None:
    proc = cluster.rayfront(
        "run",
        "--hosts",
        "all",
        "--stdin",
        "grid.pts",
        "--stdout",
        "x.dat",
        "--",
        "rtrace",
        "-I",
        "nothere.oct",
    )
    # rtrace's "system" errors exit 2; rayfront ends with the part's status.
    assert proc.returncode == 2, proc.stderr
    assert "failed on 127.0.0." in proc.stderr and "exit status 2" in proc.stderr
    assert "nothere.oct" in proc.stderr  # the tail of the failed part's log
    assert not (cluster.project / "x.dat").exists()
    assert "part files kept in" in proc.stderr


def test_ctrl_c_cancels_every_part(cluster: Cluster) -> None:
    with cluster.started(
        "run",
        "--hosts",
        "all",
        "--stdout",
        "slow.hdr",
        "--",
        "rpict",
        "-vf",
        "room.vf",
        "-x",
        "900",
        "-y",
        "900",
        *DIRECT,
        "-ds",
        "0.005",
        "scene.oct",
    ) as proc:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            running = [
                j
                for s in cluster.servers
                for j in jobs_of(s)
                if j["state"] == "running" and "slow.hdr" not in j["name"] and "rpict" in j["name"]
            ]
            if len(running) >= 3:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the parts did not start on all three servers")
        os.kill(proc.pid, signal.SIGINT)
        result = finish(proc, 30)
    err = result.stderr
    assert result.returncode == 130, err
    assert "cancelled" in err
    # Every part ends: cancelled, or done if it finished before the cancel reached it (on
    # a busy machine a band can end between the Ctrl-C and the cancel). None may run on,
    # start afterwards, or fail (a part started after the run removed its part files).
    deadline = time.monotonic() + 20  # a server kills a part at the latest grace + 2 s on
    while time.monotonic() < deadline:
        parts = [j for s in cluster.servers for j in jobs_of(s) if "-ds 0.005" in j["name"]]
        if parts and all(j["state"] in ("cancelled", "done") for j in parts):
            break
        time.sleep(0.2)
    states = [(j["id"], j["state"], j["reason"], j["name"].rsplit("[", 1)[-1]) for j in parts]
    assert parts and all(j["state"] in ("cancelled", "done") for j in parts), states
    assert any(j["state"] == "cancelled" for j in parts), states
    assert not (cluster.project / "slow.hdr").exists()


def test_a_part_cancelled_elsewhere_cancels_the_run(cluster: Cluster) -> None:
    before = set((cluster.project / ".rayfront-split").glob("*"))
    with cluster.started(
        "run",
        "--json",
        "--hosts",
        "all",
        "--stdout",
        "slow2.hdr",
        "--",
        "rpict",
        "-vf",
        "room.vf",
        "-x",
        "800",
        "-y",
        "800",
        *DIRECT,
        "-ds",
        "0.006",
        "scene.oct",
    ) as proc:
        deadline = time.monotonic() + 30
        victim = None
        while victim is None and time.monotonic() < deadline:
            for server in cluster.servers:
                running = [
                    j
                    for j in jobs_of(server)
                    if j["state"] == "running" and "-ds 0.006" in j["name"]
                ]
                if running:
                    victim = (server, running[0]["id"])
                    break
            time.sleep(0.1)
        assert victim is not None, "no part started"
        status, _ = api(victim[0], "DELETE", f"/v1/jobs/{victim[1]}")  # as `rayfront cancel` does
        assert status in (200, 202)
        result = finish(proc, 30)
    assert result.returncode == 130, result.stderr
    summary = as_json(result)
    assert summary["state"] == "cancelled" and "was cancelled on" in summary["error"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        parts = [j for s in cluster.servers for j in jobs_of(s) if "-ds 0.006" in j["name"]]
        if all(j["state"] in ("cancelled", "done") for j in parts):
            break
        time.sleep(0.2)
    assert parts and all(j["state"] in ("cancelled", "done") for j in parts), parts
    assert not (cluster.project / "slow2.hdr").exists()
    assert set((cluster.project / ".rayfront-split").glob("*")) <= before


@pytest.mark.parametrize(
    ("vtype", "size"),
    [
        ("v", ["-vh", "70", "-vv", "55"]),
        ("l", ["-vh", "8", "-vv", "6"]),
        ("a", ["-vh", "150", "-vv", "120"]),
        ("h", ["-vh", "170", "-vv", "150"]),
        ("c", ["-vh", "200", "-vv", "60"]),
        ("s", ["-vh", "180", "-vv", "150"]),
    ],
)
def test_bands_reproduce_every_view_type(cluster: Cluster, vtype: str, size: list[str]) -> None:
    # The planner and merge alone (no servers): bands rendered here and put
    # together must equal the single render pixel for pixel, with a lifted
    # view (-vl) so the band shifts are not symmetric.
    options = [
        "-vf",
        "room.vf",
        f"-vt{vtype}",
        *size,
        "-vl",
        "0.05",
        "-x",
        "96",
        "-y",
        "96",
        *DIRECT,
        "-ds",
        "0.3",
        "-ps",
        "1",
        "-pj",
        "0",
    ]
    folder = cluster.project / f"views-{vtype}"
    folder.mkdir()
    view = splitplan.resolve_picture(options, cluster.project, RADIANCE_ENV)
    run_local(["rpict", *options, "scene.oct"], cluster.project, None, folder / "one.hdr")
    bands = []
    for part in splitplan.plan_picture(options, "scene.oct", view, 5):
        band = folder / f"band{part.index}.hdr"
        run_local(["rpict", *part.args], cluster.project, None, band)
        bands.append((part, band))
    splitplan.merge_picture(bands, view, folder / "split.hdr", cluster.project, RADIANCE_ENV)
    assert picture_size(folder / "split.hdr") == (view.width, view.height)
    split, one = picture_values(folder / "split.hdr"), picture_values(folder / "one.hdr")
    if vtype not in "cs":
        assert split == one
    else:
        # Cylindrical and planisphere: a few pixels at lamp edges differ (15 of
        # 3072 and 7 of 7104). For one such cylindrical pixel, tracing its
        # centre (vwrays | rtrace) gave the band's value, not the single render's.
        differ = sum(1 for a, b in zip(split, one, strict=True) if a != b)
        assert differ <= 0.01 * len(one), differ


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--hosts", "nosuch", "--", "rpict", "x.oct"], "nosuch"),
        (["--hosts", "all", "--", "oconv", "x.rad"], "runs on one host"),
        (["--hosts", "all", "--", "rad", "-v", "a", "x.rif"], "renders one view"),
        (["--hosts", "all", "--", "rtrace", "scene.oct"], "--stdin FILE"),
        (["--hosts", "all", "--", "rpict", "-vf", "room.vf", "scene.oct"], "needs an output file"),
        (["--hosts", "all", "--host", "x", "--", "rpict", "x.oct"], "not both"),
        (["--parts", "3", "--", "rpict", "x.oct"], "give --hosts too"),
        (["--hosts", "ws-client", "--", "rpict", "x.oct"], "client only"),
    ],
)
def test_usage_errors_name_what_is_wrong(cluster: Cluster, args: list[str], expected: str) -> None:
    proc = cluster.rayfront("run", *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert expected in proc.stderr


def test_an_explicitly_named_host_that_does_not_answer_is_an_error(cluster: Cluster) -> None:
    dead = [
        line.split()[0]
        for line in (cluster.base / "shared" / "hosts").read_text().splitlines()
        if line.startswith("127.0.0.4:")
    ][0]
    proc = cluster.rayfront(
        "run",
        "--hosts",
        f"{cluster.names[0]},{dead}",
        "--stdin",
        "grid.pts",
        "--stdout",
        "y.dat",
        "--",
        "rtrace",
        "scene.oct",
    )
    assert proc.returncode == 1
    assert f"host {dead} named in --hosts is not answering" in proc.stderr


def test_a_server_killed_midway_has_its_part_run_elsewhere(tmp_path: Path) -> None:
    c = make_cluster(tmp_path, 3)
    try:
        write_scene(c.project)
        write_points(c.project / "grid.pts", 3000)
        args = ["rtrace", "-h", "-I", *DIRECT, "-ds", "0.01", "scene.oct"]
        victim = c.servers[1]
        victim_name = c.names[1]
        with c.started(
            "run",
            "--json",
            "--hosts",
            "all",
            "--lost-after",
            "1",
            "--stdin",
            "grid.pts",
            "--stdout",
            "split.dat",
            "--",
            *args,
        ) as proc:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(
                j["state"] == "running" for j in jobs_of(victim)
            ):
                time.sleep(0.05)
            time.sleep(0.3)
            # The whole host goes: server, worker and the procwraps with their rtrace.
            os.killpg(victim.proc.pid, signal.SIGKILL)
            for pid in our_pids(victim.home.path):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            victim.proc.wait(10)
            result = finish(proc, 120)
        assert result.returncode == 0, result.stderr
        summary = as_json(result)
        run_local(args, c.project, c.project / "grid.pts", c.project / "one.dat")
        assert (c.project / "split.dat").read_bytes() == (c.project / "one.dat").read_bytes()
        lost = [h for h in summary["hosts"] if h["lost"]]
        assert [h["host"] for h in lost] == [victim_name]
        retried = [p for p in summary["parts"] if len(p["attempts"]) > 1]
        assert retried and retried[0]["attempts"][0]["host"] == victim_name
        assert retried[0]["host"] != victim_name
    finally:
        c.stop()


def test_a_share_that_does_not_lock_is_refused(tmp_path: Path) -> None:
    # Server 2 mounts the location somewhere else, kept in step by a copying
    # thread: a synced folder. It sees every file, but not the locks on them.
    mirror = tmp_path / "mirror"
    (mirror / "proj").mkdir(parents=True)
    c = make_cluster(tmp_path, 2, mounts={2: mirror})
    stop = threading.Event()

    def sync() -> None:
        while not stop.is_set():
            for path in c.project.glob(".rayfront-probe-*"):
                target = mirror / "proj" / path.name
                if not target.exists():
                    with contextlib.suppress(OSError):
                        shutil.copy(path, target)
            time.sleep(0.02)

    syncer = threading.Thread(target=sync, daemon=True)
    try:
        write_scene(c.project)
        # Without the copying, server 2 does not even see the project's files.
        proc = c.rayfront(
            "run",
            "--hosts",
            "all",
            "--stdout",
            "p.hdr",
            "--",
            "rpict",
            "-vf",
            "room.vf",
            "-x",
            "64",
            "-y",
            "64",
            "scene.oct",
        )
        assert proc.returncode == 1
        assert "not every server sees this project directory" in proc.stderr
        assert str(mirror / "proj") in proc.stderr
        syncer.start()
        proc = c.rayfront(
            "run",
            "--hosts",
            "all",
            "--stdout",
            "p.hdr",
            "--",
            "rpict",
            "-vf",
            "room.vf",
            "-x",
            "64",
            "-y",
            "64",
            "scene.oct",
        )
        assert proc.returncode == 1, proc.stderr
        assert "the share does not lock files between 127.0.0.1:" in proc.stderr
        assert "refusing to split" in proc.stderr
        assert all(not jobs_of(s) for s in c.servers)  # nothing was started
        assert not (c.project / "p.hdr").exists()
    finally:
        stop.set()
        if syncer.is_alive():
            syncer.join(2)
        c.stop()


def test_a_ctrl_c_during_a_submit_is_acted_on_after_its_answer() -> None:
    """Interrupted mid-submit, a part could be queued with its id never learnt (not cancelled)."""
    from rayserver.client.splitrun import signals_deferred

    def on_term(signum: int, frame: object) -> None:  # as SplitRun.run has it
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
            reached = []
            with pytest.raises(KeyboardInterrupt), signals_deferred():
                os.kill(os.getpid(), sig)
                time.sleep(0.05)  # delivered here, to the deferring handler
                reached.append("the answer is recorded")
            assert reached == ["the answer is recorded"], sig
            assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    finally:
        signal.signal(signal.SIGTERM, old_term)
