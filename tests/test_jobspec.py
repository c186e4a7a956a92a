"""Job validation (rayserver.server.jobspec): shape, limits, location, confinement, programs.

Real files and symlinks in a temporary project, the real Radiance bin
directory of pyradiance; no server needed, so these run in milliseconds.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from rayserver.common import radiance
from rayserver.common.hosts import HostRecord, parse_hosts_text
from rayserver.common.settings import Settings
from rayserver.server import jobspec
from rayserver.server.jobspec import JobSpecError

SETTINGS = Settings()


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Any]:
    root = tmp_path / "loc"
    proj = root / "proj"
    (proj / "sub").mkdir(parents=True)
    (proj / "scene.rad").write_text("void plastic m 0 0 5 .5 .5 .5 0 0\n")
    # rad runs in the rif's folder for the rad shortcut, in the project for a rad step.
    (proj / "sub" / "scene.rif").write_text("scene = ../scene.rad\n")
    (proj / "scene.rif").write_text("scene = scene.rad\n")
    (root / "radlib").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("x")
    os.symlink(outside / "secret", proj / "link.rad")  # existing file, leads out
    os.symlink(outside, proj / "outdir")  # folder leading out
    os.symlink(tmp_path / "nowhere" / "x", proj / "dangling")  # dangling, leads out
    os.symlink(proj / "scene.rad", proj / "inside.rad")  # harmless link
    hosts = parse_hosts_text(f'testhost 2 projects="{root}"\n__library__ radlib\n')
    return {"root": root, "proj": proj, "hosts": hosts, "record": hosts.records["testhost"]}


def job(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "location": "projects",
        "project": "proj",
        "steps": [{"program": "rtrace", "args": ["-h"], "stdin": None, "stdout": "out.dat"}],
    }
    data.update(over)
    return data


def resolve(
    tree: dict[str, Any], data: dict[str, Any], settings: Settings = SETTINGS, reload: Any = None
) -> jobspec.ResolvedJob:
    jobspec.check_shape(data, settings)
    return jobspec.resolve_job(
        data,
        settings=settings,
        hosts=tree["hosts"],
        record=lambda: tree["record"],
        reload=reload or (lambda: False),
        client="192.0.2.7",
    )


def refused(tree: dict[str, Any], data: dict[str, Any], **kw: Any) -> JobSpecError:
    with pytest.raises(JobSpecError) as info:
        resolve(tree, data, **kw)
    return info.value


# ------------------------------------------------------------------ shape


@pytest.mark.parametrize(
    "data, field, words",
    [
        ([1, 2], None, "must be a JSON object"),
        ({"location": "p", "project": "x"}, "steps", "exactly one of 'steps'"),
        (job(rad={"rif": "a.rif"}), "steps", "got both"),
        (
            {"project": "x", "steps": [{"program": "rtrace"}]},
            "location",
            "missing required field 'location'",
        ),
        (job(project=""), "project", "must not be empty"),
        (job(project=5), "project", "expected a string"),
        (job(priority=101), "priority", "at most 100"),
        (job(priority="high"), "priority", "expected a whole number"),
        (job(priority=True), "priority", "expected a whole number"),
        (job(steps=[]), "steps", "at least 1"),
        (
            job(steps=[{"args": []}]),
            "steps[0].program",
            "missing required field 'steps[0].program'",
        ),
        (job(steps=[{"program": "rtrace", "args": "-h"}]), "steps[0].args", "expected a list"),
        (
            job(steps=[{"program": "rtrace", "args": ["-h", 2]}]),
            "steps[0].args[1]",
            "expected a string",
        ),
        (job(steps=[{"program": "rtrace", "stdin": 3}]), "steps[0].stdin", "a string or null"),
        (job(steps=[{"program": "rtrace", "shell": True}]), "steps[0].shell", "unknown field"),
        (job(colour="red"), "colour", "unknown field 'colour'"),
        (job(steps=None, rad={"options": []}), "rad.rif", "missing required field 'rad.rif'"),
    ],
)
def test_shape_errors_name_the_field(data: Any, field: str | None, words: str) -> None:
    if isinstance(data, dict) and data.get("steps", 0) is None:
        del data["steps"]
    with pytest.raises(JobSpecError) as info:
        jobspec.check_shape(data, SETTINGS)
    assert info.value.status == 422
    assert info.value.field == field
    assert words in info.value.message
    if field:
        assert field in info.value.message


def test_limits_from_settings_name_the_setting() -> None:
    small = Settings(max_steps=2, max_args=3, max_arg_length=10)
    step = {"program": "rtrace", "args": []}
    cases = [
        (job(steps=[step] * 3), "max_steps", "steps"),
        (job(steps=[{"program": "rtrace", "args": ["a"] * 4}]), "max_args", "steps[0].args"),
        (
            job(steps=[{"program": "rtrace", "args": ["x" * 11]}]),
            "max_arg_length",
            "steps[0].args[0]",
        ),
        (job(steps=None, rad={"rif": "a.rif", "options": ["-v"] * 4}), "max_args", "rad.options"),
    ]
    for data, setting, field in cases:
        if data["steps"] is None:
            del data["steps"]
        with pytest.raises(JobSpecError) as info:
            jobspec.check_shape(data, small)
        assert info.value.status == 422
        assert setting in info.value.message and info.value.field == field
    jobspec.check_shape(job(steps=[step] * 2), small)  # at the limit is fine


# ------------------------------------------------------------------ location


def test_unknown_location_reloads_once_then_404_and_logs_client(
    tree: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    calls = []
    caplog.set_level(logging.WARNING, "rayserver.server.jobspec")
    err = refused(tree, job(location="archive"), reload=lambda: calls.append(1))
    assert err.status == 404 and err.field == "location"
    assert "'archive'" in err.message and "projects" in err.message
    assert calls == [1]
    assert "192.0.2.7" in caplog.text and "archive" in caplog.text


def test_location_found_after_reload(tree: dict[str, Any]) -> None:
    state = {"record": HostRecord("testhost", 2, {})}

    def reload() -> bool:
        state["record"] = tree["record"]
        return True

    data = job()
    jobspec.check_shape(data, SETTINGS)
    resolved = jobspec.resolve_job(
        data,
        settings=SETTINGS,
        hosts=tree["hosts"],
        record=lambda: state["record"],
        reload=reload,
        client="c",
    )
    assert resolved.workdir == str(tree["proj"].resolve())


@pytest.mark.parametrize(
    "project, status",
    [
        ("missing", 404),
        ("../proj", 403),
        ("/etc", 403),
        ("proj/outdir", 403),
        ("proj/scene.rad", 404),
    ],
)
def test_project_must_exist_inside_the_location(
    tree: dict[str, Any], project: str, status: int
) -> None:
    err = refused(tree, job(project=project))
    assert err.status == status and err.field == "project", err.message
    assert repr(project) in err.message


# ------------------------------------------------------------------ paths and programs


@pytest.mark.parametrize(
    "step, field",
    [
        ({"program": "rtrace", "stdin": "../x"}, "steps[0].stdin"),
        ({"program": "rtrace", "stdin": "/etc/passwd"}, "steps[0].stdin"),
        ({"program": "rtrace", "stdout": "outdir/stolen"}, "steps[0].stdout"),
        ({"program": "rtrace", "stdout": "dangling"}, "steps[0].stdout"),
        ({"program": "rtrace", "args": ["/etc/passwd"]}, "steps[0].args[0]"),
        ({"program": "rtrace", "args": ["-h", "../x.oct"]}, "steps[0].args[1]"),
        ({"program": "rtrace", "args": ["sub/../../x"]}, "steps[0].args[0]"),
        ({"program": "rtrace", "args": ["link.rad"]}, "steps[0].args[0]"),
        ({"program": "rtrace", "args": ["outdir/secret"]}, "steps[0].args[0]"),
        ({"program": "rtrace", "args": ["@../opts"]}, "steps[0].args[0]"),
        ({"program": "rad", "args": ["scene.rif", "OCTREE=../x.oct"]}, "steps[0].args[1]"),
        ({"program": "rad", "args": ["scene.rif", "AMBFILE=/tmp/x.amb"]}, "steps[0].args[1]"),
    ],
)
def test_paths_leaving_the_project_are_refused(
    tree: dict[str, Any], step: dict[str, Any], field: str
) -> None:
    err = refused(tree, job(steps=[step]))
    assert err.status == 403, err.message
    assert err.field == field and field in err.message
    assert "refused" in err.message


@pytest.mark.parametrize("program", ["bash", "sh", "../bin/rtrace", "/usr/bin/env", "rtrace "])
def test_only_radiance_programs(tree: dict[str, Any], program: str) -> None:
    err = refused(tree, job(steps=[{"program": program}]))
    assert err.status == 422 and err.field == "steps[0].program"
    assert "not a Radiance program" in err.message and repr(program) in err.message


def test_good_job_resolves(tree: dict[str, Any]) -> None:
    steps = [
        {"program": "oconv", "args": ["scene.rad", "inside.rad"], "stdout": "sub/scene.oct"},
        {
            "program": "rcalc",
            "args": ["-e", "$1=$2/$3", "-ab", "2"],
            "stdin": "pts.txt",
            "stdout": "out.txt",
        },
    ]
    resolved = resolve(tree, job(steps=steps, name="two", priority=-5))
    assert resolved.name == "two" and resolved.priority == -5
    assert resolved.workdir == str(tree["proj"].resolve())
    bin_dir = radiance.bin_dir(SETTINGS)
    assert [s["path"] for s in resolved.steps] == [str(bin_dir / "oconv"), str(bin_dir / "rcalc")]
    assert resolved.steps[1]["stdin"] == "pts.txt"
    assert resolved.steps[0]["args"] == ["scene.rad", "inside.rad"]
    raypath = resolved.env["RAYPATH"].split(os.pathsep)
    assert raypath[0] == "." and str(tree["root"] / "radlib") in raypath
    assert resolved.env["PATH"].split(os.pathsep)[0] == str(bin_dir)
    assert set(resolved.env) == {"RAYPATH", "PATH"}


def test_rad_shortcut_runs_in_the_rif_folder(tree: dict[str, Any]) -> None:
    data = job(rad={"rif": "sub/scene.rif", "options": ["-v", "x"]})
    del data["steps"]
    resolved = resolve(tree, data)
    assert resolved.workdir == str((tree["proj"] / "sub").resolve())
    assert resolved.steps == [
        {
            "program": "rad",
            "path": str(radiance.bin_dir(SETTINGS) / "rad"),
            "args": ["-v", "x", "scene.rif"],
            "stdin": None,
            "stdout": None,
        }
    ]


@pytest.mark.parametrize(
    "rif, status", [("missing.rif", 422), ("../x.rif", 403), ("link.rad", 403)]
)
def test_rad_rif_checked(tree: dict[str, Any], rif: str, status: int) -> None:
    data = job(rad={"rif": rif})
    del data["steps"]
    err = refused(tree, data)
    assert err.status == status and err.field == "rad.rif", err.message


# pcomb and oconv (among others) run an input "file" named "!cmd" as a shell
# command: checked for real in test_bang_argument_really_runs_a_shell.
@pytest.mark.parametrize(
    "step, field",
    [
        ({"program": "oconv", "args": ["!touch pwned"]}, "steps[0].args[0]"),
        ({"program": "pcomb", "args": ["-e", "ro=1", "!sh -c id"]}, "steps[0].args[2]"),
        ({"program": "rcontrib", "args": ["-o", "!cat >x"]}, "steps[0].args[1]"),
        ({"program": "rad", "args": ["sub/scene.rif", "OCTREE=!x"]}, "steps[0].args[1]"),
    ],
)
def test_bang_commands_are_refused(tree: dict[str, Any], step: dict[str, Any], field: str) -> None:
    err = refused(tree, job(steps=[step]))
    assert err.status == 403 and err.field == field, err.message
    assert "'!'" in err.message and "shell command" in err.message


def test_bang_argument_really_runs_a_shell(tmp_path: Path) -> None:
    # Why the rule above exists: Radiance's own behaviour, not a guess.
    marker = tmp_path / "ran"
    env = radiance.simulation_env(SETTINGS, [])
    subprocess.run(
        [str(radiance.bin_dir(SETTINGS) / "oconv"), f"!touch {marker}"],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert marker.exists()


# rad pastes its options and VAR=value overrides into sh command lines.
@pytest.mark.parametrize(
    "args, field, words",
    [
        (["scene.rif", "render=-ab 0;touch /tmp/x"], "steps[0].args[1]", "';'"),
        (["scene.rif", "render=-ab $(id)"], "steps[0].args[1]", "'$'"),
        (["scene.rif", "view=x > ../y"], "steps[0].args[1]", "'>'"),
        (["scene.rif", "render=-af /tmp/x.amb"], "steps[0].args[1]", "absolute path"),
        (["scene.rif", "render=-ab 1 -af sub/../../x"], "steps[0].args[1]", "'..'"),
        (["scene.rif", "render=-ab 1 -af outdir/x"], "steps[0].args[1]", "leads outside"),
    ],
)
def test_rad_arguments_cannot_carry_shell_syntax_or_hidden_paths(
    tree: dict[str, Any], args: list[str], field: str, words: str
) -> None:
    err = refused(tree, job(steps=[{"program": "rad", "args": args}]))
    assert err.status == 403 and err.field == field, err.message
    assert words in err.message and "refused" in err.message


def test_rad_shortcut_options_checked_like_rad_steps(tree: dict[str, Any]) -> None:
    data = job(rad={"rif": "sub/scene.rif", "options": ["-v", "x|y"]})
    del data["steps"]
    err = refused(tree, data)
    assert err.status == 403 and err.field == "rad.options[1]", err.message
    data = job(rad={"rif": "sub/scene.rif", "options": ["-n", "-v", "nice", "-o", "x11"]})
    del data["steps"]
    ok = resolve(tree, data)
    assert ok.steps[0]["args"] == ["-n", "-v", "nice", "-o", "x11", "scene.rif"]
    fine = resolve(
        tree,
        job(
            steps=[
                {
                    "program": "rad",
                    "args": [
                        "scene.rif",
                        "render=-ab 2 -ad 1024 -af sub/x.amb",
                        "QUALITY=HIGH",
                    ],
                }
            ]
        ),
    )
    assert fine.steps[0]["args"][1] == "render=-ab 2 -ad 1024 -af sub/x.amb"
