"""``rayfront run --hosts`` for contribution matrices and rad views, on three real servers.

rcontrib and rfluxmtx (sensor rays on stdin) are cut into runs of matrix rows;
the merged matrix must be the single run's, byte for byte, header included
(apart from its CAPDATE/GMT time stamps): direct light only from ``light``
sources (``-ab 0``) with ``-dj 0`` uses no random numbers, so the values of
every row do not depend on which part computed it (checked: two direct runs
a second apart agree to the byte). rmtxop must read what the merge wrote.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from splittools import (
    RADIANCE_ENV,
    Cluster,
    as_json,
    jobs_of,
    picture_values,
    run_local,
    write_points,
    write_scene,
)

from rayserver.client import splitmatrix
from rayserver.client.connection import ClientError

DIRECT = ["-ab", "0", "-dj", "0", "-I+"]


# One xdist worker runs the split modules, in order: consecutive tests share three_servers.
pytestmark = pytest.mark.xdist_group("split")


@pytest.fixture
def cluster(three_servers: Cluster) -> Iterator[Cluster]:
    """Three servers with one cpu each; the lamp room of splittools, lamps as receivers."""
    c = three_servers
    if (c.project / "two.oct").exists():  # made by an earlier test on these servers
        yield c
        return
    write_scene(c.project)
    write_points(c.project / "grid.pts", 60)
    scene = (c.project / "scene.rad").read_text().splitlines()
    (c.project / "room.rad").write_text(
        "\n".join(line for line in scene if not line.startswith("lamp polygon")) + "\n"
    )
    lamps = [line for line in scene if line.startswith(("void light", "lamp polygon"))]
    # h=u: one uniform bin per receiver modifier.
    (c.project / "lamps.rad").write_text("#@rfluxmtx h=u\n" + "\n".join(lamps) + "\n")
    # Two lamp materials, for outputs per modifier.
    two = ["void light lamp2 0 0 3 20 30 40"] + [
        line.replace("lamp polygon", "lamp2 polygon", 1)
        if line.startswith("lamp polygon") and int(line.split()[2][4:]) % 2
        else line
        for line in scene
    ]
    (c.project / "two.rad").write_text("\n".join(two) + "\n")
    run_local(["oconv", "two.rad"], c.project, None, c.project / "two.oct")
    yield c


def stable(data: bytes) -> bytes:
    """A Radiance output without the header lines that carry the time of day."""
    return b"\n".join(
        line for line in data.split(b"\n") if not line.startswith((b"CAPDATE=", b"GMT="))
    )


def split(cluster: Cluster, command: list[str], *extra: str, out: str = "split.mtx") -> dict:
    proc = cluster.rayfront(
        "run", "--json", "--hosts", "all", "--stdin", "grid.pts", "--stdout", out, *extra,
        "--", *command,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return as_json(proc)


def direct(cluster: Cluster, command: list[str], out: str = "one.mtx") -> bytes:
    run_local(command, cluster.project, cluster.project / "grid.pts", cluster.project / out)
    return (cluster.project / out).read_bytes()


def rmtxop_rows(cluster: Cluster, name: str) -> int:
    """Rows rmtxop reads from a matrix file (it needs NROWS in the header)."""
    done = subprocess.run(
        ["rmtxop", "-fa", name], cwd=cluster.project, env=RADIANCE_ENV, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    return int(text.split("NROWS=")[1].split()[0])


# The planner alone first (no servers), so the servers run for the tests in a row below.
@pytest.mark.parametrize(
    ("args", "sender"),
    [
        (["-", "r.rad", "s.rad"], 0),
        (["-v", "-I+", "-y", "4", "-c", "3", "-", "r.rad"], 6),
        (["-ff", "-ab", "2", "-ad", "100", "-lw", "1e-4", "-x", "3", "-", "r.rad"], 9),
        (["-av", "0", "0", "0", "-me", "1", "1", "1", "-ld-", "-dv", "-", "r.rad"], 10),
        (["-e", "-", "-o", "-", "-", "r.rad", "s.rad"], 4),  # values that look like senders
        (["-n", "2", "win.rad", "sky.rad", "room.rad"], 2),
    ],
)
def test_rfluxmtx_sender_is_found_after_its_options(args: list[str], sender: int) -> None:
    # rfluxmtx's own option screening: how many words each option takes.
    assert splitmatrix.rfluxmtx_sender(args) == sender


@pytest.mark.parametrize(
    ("word", "written"),
    [
        ("plain", "plain"),
        ("if(Dx,1,0)", "if(Dx,1,0)"),
        ("two words", '"two words"'),
        ("", '""'),
        ("it's", '"it\'s"'),
        ('say"x"', "'say\"x\"'"),
    ],
)
def test_header_words_are_quoted_as_radiance_does(word: str, written: str) -> None:
    assert splitmatrix.fputword(word) == written


def test_a_smaller_y_reads_the_first_rays_as_a_single_run_does() -> None:
    data = b"".join(b"%d 0 1 0 0 1\n" % k for k in range(10))
    args = ["-y", "3", "-c", "2", "-m", "m", "x.oct"]
    spec = splitmatrix.parse_contrib("rcontrib", args)
    parts, records, note = splitmatrix.plan_contrib(spec, args, data, 2, "grid.pts")
    assert records == 3
    assert (
        note == "rcontrib -y 3 reads the first 6 of the 10 rays in grid.pts, as a single run does"
    )
    assert [p.label for p in parts] == ["rays 1-2 of 10", "rays 3-6 of 10"]
    assert [p.args[1] for p in parts] == ["1", "2"]  # each part's own -y
    assert parts[-1].input_range == (data.index(b"2 0"), data.index(b"6 0"))


@pytest.mark.parametrize(
    "options",
    [
        ["-y", "30", "-c", "2"],  # -c: two rays per row, groups never cut
        ["-y", "60", "-fad"],  # binary doubles
        ["-y", "60", "-faf", "-h-"],  # no header at all
        ["-x", "6", "-y", "10"],  # a 6x10 picture of one value: resolution string
        ["-x", "10", "-y", "6", "-ffc"],  # a Radiance picture (RGBE, run-length scanlines)
    ],
)
def test_rcontrib_rows_merge_to_the_single_run(cluster: Cluster, options: list[str]) -> None:
    command = ["rcontrib", *DIRECT, *options, "-m", "lamp", "scene.oct"]
    one = direct(cluster, command)
    summary = split(cluster, command)
    merged = (cluster.project / "split.mtx").read_bytes()
    assert stable(merged) == stable(one)
    assert len(summary["parts"]) == 3
    if "-h-" not in options:
        assert f" -y {options[options.index('-y') + 1]} ".encode() in merged
    if "-x" not in options and "-h-" not in options:
        assert rmtxop_rows(cluster, "split.mtx") == int(options[1])


def test_without_y_the_merged_matrix_gets_its_row_count(cluster: Cluster) -> None:
    # The single run writes no NROWS (rmtxop: "Cannot allocate 0 MByte matrix
    # array"); the merge knows the rows and adds the line, nothing else changes.
    command = ["rcontrib", *DIRECT, "-m", "lamp", "scene.oct"]
    one = direct(cluster, command)
    assert b"NROWS=" not in one
    split(cluster, command)
    merged = (cluster.project / "split.mtx").read_bytes()
    assert stable(merged).replace(b"NROWS=60\n", b"") == stable(one)
    assert rmtxop_rows(cluster, "split.mtx") == 60


def test_rfluxmtx_sensor_rays_merge_to_the_single_run(cluster: Cluster) -> None:
    # The rays come on rayfront's standard input here, as they would in a pipe.
    command = ["rfluxmtx", *DIRECT, "-y", "60", "-", "lamps.rad", "room.rad"]
    one = direct(cluster, command)
    proc = cluster.rayfront(
        "run", "--json", "--hosts", "all", "--stdout", "split.mtx", "--", *command,
        stdin=(cluster.project / "grid.pts").read_text(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = as_json(proc)
    merged = (cluster.project / "split.mtx").read_bytes()
    assert stable(merged) == stable(one)
    assert b"NROWS=60\n" in merged and b"oconv -f room.rad lamps.rad" in merged
    assert [p["label"] for p in summary["parts"]][0] == "rays 1-20 of 60"
    assert rmtxop_rows(cluster, "split.mtx") == 60


def test_o_pattern_files_are_merged_per_file(cluster: Cluster) -> None:
    # One file per modifier (%s) and one per bin (%03d): every file is merged
    # from its parts in input order, each with the single run's header.
    (cluster.project / "one").mkdir()
    (cluster.project / "two").mkdir()

    def command(folder: str) -> list[str]:
        return [
            "rcontrib", *DIRECT, "-y", "60", "-o", f"{folder}/all_%s.mtx", "-m", "lamp",
            "-bn", "3", "-b", "if(Dx,floor(2*Dy+1),0)", "-o", f"{folder}/bin_%s_%03d.mtx",
            "-m", "lamp2", "two.oct",
        ]  # fmt: skip

    direct(cluster, command("one"), out="one/stdout")
    summary = split(cluster, command("two"), out="two/stdout")
    names = sorted(p.name for p in (cluster.project / "one").iterdir())
    assert names == ["all_lamp.mtx", "bin_lamp2_000.mtx", "bin_lamp2_001.mtx",
                     "bin_lamp2_002.mtx", "stdout"]  # fmt: skip
    assert sorted(p.name for p in (cluster.project / "two").iterdir()) == names
    for name in names:
        one = (cluster.project / "one" / name).read_bytes()
        two = (cluster.project / "two" / name).read_bytes()
        assert stable(two).replace(b"two/", b"one/") == stable(one), name
    assert sorted(summary["files"]) == [f"two/{n}" for n in names if n != "stdout"]
    assert not (cluster.project / ".rayfront-split").exists()


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["rfluxmtx", "-y", "1", "lamps.rad", "lamps.rad", "room.rad"], "sender lamps.rad"),
        (["rcontrib", "-c", "0", "-m", "lamp", "scene.oct"], "adds every ray into one record"),
        (["rcontrib", "-y", "61", "-m", "lamp", "scene.oct"], "needs 61 records"),
        (["rcontrib", "-c", "7", "-m", "lamp", "scene.oct"], "not a multiple of rcontrib -c 7"),
        (["rcontrib", "-o", "!cat", "-m", "lamp", "scene.oct"], "output to a command"),
        (["rcontrib", "-o", "nodir/%s", "-m", "lamp", "scene.oct"], "nodir does not exist"),
        (["rcontrib", "-o", "scene.%s", "-m", "lamp", "scene.oct"], "scene.oct, scene.rad exist"),
        (["rcontrib", "-o", "x/%d/%s", "-m", "lamp", "scene.oct"], "no % in 'x/%d'"),
        (["rcontrib", "@opts", "-m", "lamp", "scene.oct"], "options from a file"),
        (["rcontrib", "-r", "-m", "lamp", "scene.oct"], "recovers the output"),
        (["rcontrib", "-y", "x", "-m", "lamp", "scene.oct"], "-y 'x': expected a whole number"),
        (["rcontrib", "-m", "lamp", "-V+"], "octree as its last argument"),
    ],
)
def test_what_a_matrix_split_refuses(cluster: Cluster, command: list[str], expected: str) -> None:
    # The planner alone (no servers): what rayfront run --hosts checks before it starts.
    program, args = command[0], command[1:]
    data = (cluster.project / "grid.pts").read_bytes()
    with pytest.raises(ClientError) as caught:
        spec = splitmatrix.parse_contrib(program, args)
        splitmatrix.check_outputs(spec, args, cluster.project)
        splitmatrix.plan_contrib(spec, args, data, 3, "grid.pts")
    assert expected in str(caught.value)
    assert caught.value.exit_code == 2


def test_a_refusal_reaches_the_user_before_anything_runs(cluster: Cluster) -> None:
    proc = cluster.rayfront(
        "run", "--hosts", "all", "--stdin", "grid.pts", "--stdout", "x.mtx", "--",
        "rcontrib", "-y", "61", "-m", "lamp", "scene.oct",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "rcontrib -y 61 needs 61 records (61 rays with -c 1)" in proc.stderr
    assert "has 60 rays" in proc.stderr
    assert not (cluster.project / "x.mtx").exists()
    assert all(not jobs_of(s) or "-y 61" not in str(jobs_of(s)) for s in cluster.servers)


def test_receiver_output_files_are_merged_per_file(cluster: Cluster) -> None:
    # Two receivers naming their own files (o= in #@rfluxmtx): every part gets
    # a copy of the receiver writing into its own folder; the files are merged
    # with the single run's header (its o= names, its oconv line).
    two = (cluster.project / "two.rad").read_text().splitlines()
    receivers = []
    for mod in ("lamp", "lamp2"):
        receivers.append(f"#@rfluxmtx h=u o=rx/{mod}.mtx")
        receivers += [line for line in two if line.startswith((f"void light {mod} ", f"{mod} "))]
    (cluster.project / "rx.rad").write_text("\n".join(receivers) + "\n")
    (cluster.project / "rx").mkdir()
    command = ["rfluxmtx", *DIRECT, "-y", "60", "-", "rx.rad", "room.rad"]
    direct(cluster, command, out="rx.out")
    (cluster.project / "rx").rename(cluster.project / "rx-one")
    (cluster.project / "rx").mkdir()
    summary = split(cluster, command, out="rx.out")
    assert sorted(summary["files"]) == ["rx/lamp.mtx", "rx/lamp2.mtx"]
    for name in ("lamp.mtx", "lamp2.mtx"):
        one = (cluster.project / "rx-one" / name).read_bytes()
        merged = (cluster.project / "rx" / name).read_bytes()
        assert stable(merged) == stable(one), name
        assert b"oconv -f room.rad rx.rad\n" in merged and b"-o rx/lamp" in merged


def test_rad_views_render_on_different_hosts_after_one_octree(cluster: Cluster) -> None:
    # Three views of one rif, one per server; the octree first, by one job.
    # With -ab 0, -dt 0 and no pixel jitter (-pj 0) rad's renders use no random
    # numbers, so every picture equals the one a direct rad run makes.
    rif = (
        "scene= scene.rad\nZONE= I 0 6 0 5 0 3\nQUALITY= L\nRESOLUTION= 48\nINDIRECT= 0\n"
        "render= -pj 0 -dt 0\nview= corner -vf room.vf\n"
        "view= down -vp 3 2.5 2.9 -vd 0 0 -1 -vu 0 1 0 -vh 90 -vv 90\nview= xZl\n"
    )
    (cluster.project / "views.rif").write_text(rif)
    here = cluster.project / "direct"
    here.mkdir()
    for name in ("scene.rad", "room.vf", "views.rif"):
        (here / name).write_bytes((cluster.project / name).read_bytes())
    run_local(["rad", "views.rif"], here)
    proc = cluster.rayfront("run", "--json", "--hosts", "all", "--", "rad", "views.rif")
    summary = as_json(proc)
    assert proc.returncode == 0, proc.stderr
    assert [p["label"] for p in summary["parts"]] == ["view corner", "view down", "view xZl"]
    assert sorted(p["host"] for p in summary["parts"]) == sorted(cluster.names)
    assert summary["files"] == ["views_corner.hdr", "views_down.hdr", "views_xZl.hdr"]
    for name in summary["files"]:
        assert picture_values(cluster.project / name) == picture_values(here / name), name
    jobs = [j for s in cluster.servers for j in jobs_of(s) if "views.rif" in j["name"]]
    octree = [j for j in jobs if "octree" in j["name"]]
    assert len(octree) == 1 and octree[0]["state"] == "done"
    # Each view's job started after the octree's ended.
    assert all(j["started_at"] >= octree[0]["ended_at"] for j in jobs if j not in octree)
    assert (cluster.project / "views.oct").exists()
    assert summary["prelude"]["job"] == octree[0]["id"]
    assert summary["prelude"]["label"] == "octree and shared files"
