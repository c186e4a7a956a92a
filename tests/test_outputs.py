"""Outputs: every file a job created or changed in its project, with its size.

The scan itself on real files in a temporary folder; then real jobs through a real
server on 127.0.0.1 with real Radiance (rcontrib -o patterns, a multi-step job) and
`rayfront status ID`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import RayHome
from jobtools import make_project, rayfront, rayfront_json, submit, wait_final

from rayserver.jobs.procwrap.outputs import OutputTracker

pytestmark = pytest.mark.shared_server


def test_the_scan_finds_created_and_changed_files_only(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    (root / "sub").mkdir(parents=True)
    (root / "kept.txt").write_text("same")
    (root / "changed.txt").write_text("old")
    (root / "gone.txt").write_text("x")
    (root / ".rayfront-split").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    tracker = OutputTracker(str(root))
    tracker.before()
    (root / "sub" / "new.dat").write_bytes(b"12345")
    (root / "changed.txt").write_text("newer and longer")
    (root / "gone.txt").unlink()
    (root / ".rayfront-split" / "part.dat").write_text("a split part's")
    (outside / "far.txt").write_text("not ours")
    tracker.after([])
    assert tracker.outputs() == [
        {"path": "changed.txt", "size": 16},
        {"path": "sub/new.dat", "size": 5},
    ]
    # A second step: one file rewritten with the same size, one removed, one named.
    tracker.before()
    stamp = time.time() + 5
    os.utime(root / "kept.txt", (stamp, stamp))
    (root / "sub" / "new.dat").unlink()
    tracker.after(["kept.txt"], exclude={"kept.txt"})
    assert {o["path"] for o in tracker.outputs()} == {"changed.txt", "kept.txt"}


def test_a_project_with_too_many_files_lists_only_named_outputs(tmp_path: Path) -> None:
    for i in range(30):
        (tmp_path / f"f{i}").write_text("x")
    tracker = OutputTracker(str(tmp_path), limit=20)
    tracker.before()
    assert tracker.untracked and "more than 20 files" in tracker.untracked
    (tmp_path / "out.hdr").write_text("picture")
    (tmp_path / "f0").write_text("changed")
    tracker.after(["out.hdr"])
    assert tracker.outputs() == [{"path": "out.hdr", "size": 7}]


SCENE2 = """\
void light bright 0 0 3 100 100 100
bright sphere lamp 0 0 4 2 2 2.5 0.3
void light dim 0 0 3 10 10 10
dim sphere lamp2 0 0 4 3 1 2.5 0.2
void plastic grey 0 0 5 .6 .6 .6 0 0
grey polygon floor 0 0 12 0 0 0  4 0 0  4 4 0  0 4 0
"""


def test_o_pattern_files_are_outputs_with_sizes(server: Any, rayhome: RayHome) -> None:
    proj = make_project(rayhome)
    (proj / "two.rad").write_text(SCENE2)
    (proj / "pts.txt").write_text("1 1 0.1 0 0 1\n2 2 0.1 0 0 1\n3 3 0.1 0 0 1\n")
    (proj / "results").mkdir()
    job = submit(
        server,
        [
            {"program": "oconv", "args": ["two.rad"], "stdout": "two.oct"},
            {
                "program": "rcontrib",
                "args": [
                    "-h",
                    "-ab",
                    "0",
                    "-o",
                    "results/c_%s.dat",
                    "-m",
                    "bright",
                    "-m",
                    "dim",
                    "two.oct",
                ],
                "stdin": "pts.txt",
            },
        ],
    )
    done = wait_final(server, job["id"])
    assert done["state"] == "done", done
    sizes = {o["path"]: o["size"] for o in done["outputs"]}
    expected = ["two.oct", "results/c_bright.dat", "results/c_dim.dat"]
    assert sorted(sizes) == sorted(expected), done["outputs"]
    for name in expected:
        assert sizes[name] == (proj / name).stat().st_size > 0
    assert done["outputs_count"] == 3
    shown = rayfront(rayhome, "status", str(job["id"]), cwd=proj).stdout
    assert "outputs: 3 files" in shown, shown
    assert f"results/c_dim.dat  ({sizes['results/c_dim.dat']} B)" in shown, shown
    listed = rayfront_json(rayhome, "status", cwd=proj)["jobs"][0]
    assert listed["id"] == job["id"] and listed["outputs_count"] == 3
