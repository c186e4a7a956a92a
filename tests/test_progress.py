"""Progress parsers, on lines captured from Radiance 6.0a (radiance-facts.md)."""

from __future__ import annotations

import pytest

from rayserver.jobs.procwrap import progress as prog

REPORT = "rpict: 982530 rays, 26.91% after 0.000u 0.000s 0.001r hours on HOST (PID 22721)"


def test_rpict_report() -> None:
    rep = prog.parse_rpict_report(REPORT + "\n")
    assert rep == prog.RpictReport(982530, 26.91, 0.0, 0.0, 0.001, "HOST", 22721)
    assert (
        prog.parse_rpict_report(
            "rpict: 3324 rays, 100.00% after 0.000u 0.000s 0.000r hours on vm (PID 13203)"
        ).percent
        == 100.0
    )
    # Photon-map bias statistics in the %s slot before the percentage.
    rep = prog.parse_rpict_report(
        "rpict: 10 rays, bias 0.5/1.2, 5.00% after 1.000u 0.500s 2.000r hours on h.x (PID 7)"
    )
    assert rep is not None and rep.percent == 5.0 and rep.pid == 7


@pytest.mark.parametrize(
    "line",
    [
        "rpict: signal - Terminate",
        "rpict: fatal - (scene.oct): not an octree",
        "rtrace: 10 rays, 5.00% after 0.000u 0.000s 0.000r hours on h (PID 1)",
        "rpict: 10 rays, 105.00% after 0.000u 0.000s 0.000r hours on h (PID 1)",
        "",
    ],
)
def test_not_reports(line: str) -> None:
    assert prog.parse_rpict_report(line) is None


def test_rad_command_lines() -> None:
    cmd = prog.parse_rad_command("\trpict -t 3 -vp 0 0 0 room.oct > room_a.unf")
    assert cmd is not None and cmd.program == "rpict" and cmd.output == "room_a.unf"
    assert cmd.is_render and not cmd.is_overture
    over = prog.parse_rad_command("\trpict -x 64 -y 64 -ps 1 room.oct > /dev/null")
    assert over is not None and over.is_overture and not over.is_render
    pf = prog.parse_rad_command("\tpfilt room_a.unf >room_a.hdr")
    assert pf is not None and pf.output == "room_a.hdr" and pf.argv == ("pfilt", "room_a.unf")
    assert prog.parse_rad_command("rpict: 1 rays, 0.00% after ...") is None
    assert prog.parse_rad_command("\t") is None


DRY = """\
AMBFILE=s.amb
REPORT= 0.1
view= v1 -vp 0 0 0 -vd 0 1 0
\toconv scene.rad > s.oct
\trpict -t 6 -vp 0 0 0 -vd 0 1 0 -x 32 -y 32 s.oct > /dev/null
\trpict -t 6 -vp 0 0 0 -vd 0 1 0 -x 32 -y 32 s.oct > s_v1.unf
\tpfilt s_v1.unf > s_v1.hdr
\trm -f s_v1.unf
\trpict -t 6 -vp 0 0 0 -vd 1 0 0 -x 32 -y 32 s.oct > s_v2.unf
\tpfilt s_v2.unf > s_v2.hdr
"""


def test_rad_plan_and_variables() -> None:
    plan = prog.parse_rad_plan(DRY)
    assert [c.program for c in plan] == ["oconv", "rpict", "rpict", "pfilt", "rm", "rpict", "pfilt"]
    assert sum(c.is_render for c in plan) == 2
    variables = prog.rad_variables(DRY)
    assert variables["REPORT"] == "0.1" and variables["AMBFILE"] == "s.amb"
    assert prog.has_report_variable([], variables)
    assert not prog.has_report_variable(["room.rif"], {"AMBFILE": "x"})
    assert prog.has_report_variable(["room.rif", "REP=1"], {})
    assert prog.has_report_variable(["room.rif", "report=1"], {})
    assert not prog.has_report_variable(["room.rif", "RE=1"], {})


def test_rad_dry_run_args() -> None:
    assert prog.rad_dry_run_args(["-N", "2", "-v", "v1", "room.rif"]) == [
        "-n",
        "-e",
        "-v",
        "v1",
        "room.rif",
    ]
    assert prog.rad_dry_run_args(["-n", "-s", "room.rif", "QUAL=H"]) == [
        "-n",
        "-e",
        "room.rif",
        "QUAL=H",
    ]
    assert prog.rad_dry_run_args(["-N4", "room.rif"]) == ["-n", "-e", "room.rif"]


def test_rad_progress_overall() -> None:
    tracker = prog.RadProgress(renders=2)
    lines = DRY.splitlines()[3:]
    seen = []
    report = "rpict: 1 rays, {}% after 0.000u 0.000s 0.000r hours on h (PID 9)"
    feed = [
        lines[0],
        lines[1],
        report.format("50.00"),  # overture: ignored
        lines[2],
        report.format("0.00"),
        report.format("50.00"),
        report.format("100.00"),
        lines[3],
        lines[4],
        lines[5],
        report.format("50.00"),
        lines[6],
    ]
    for line in feed:
        value = tracker.feed(line)
        if value is not None:
            seen.append(round(value, 3))
    assert seen == [0.25, 0.5, 0.75, 1.0]
    assert seen == sorted(seen), "progress must never go backwards"


def test_overall_percent() -> None:
    assert prog.overall_percent(0, 2, 0.5) == 25.0
    assert prog.overall_percent(1, 2, 1.0) == 99.9  # 100 only when the job is really done
    assert prog.overall_percent(0, 0, 0.5) == 0.0
    assert prog.overall_percent(0, 4, -1) == 0.0


def test_line_counter_skips_header() -> None:
    counter = prog.LineCounter(header=True)
    assert counter.feed(b"#?RADIANCE\nrtrace -h\n") == 0
    assert counter.feed(b"FORMAT=ascii\n") == 0
    assert counter.feed(b"\n1 2 3\n4 5") == 1
    assert counter.feed(b" 6\n") == 2
    plain = prog.LineCounter(header=False)
    assert plain.feed(b"1\n2\n") == 2
    assert prog.count_lines(b"0 0 0 0 0 1\n\n0 0 0 1 0 0\n") == 2
