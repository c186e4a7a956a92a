"""The second line of defence at submit (issue 14, item 5), against a real ``rayserver -f``.

Every attack is submitted for real: it must get a 403 naming what was wrong
and what is expected, no job may be queued, and nothing may appear outside
the project. Legitimate uses of the same features (@options files, a rif
with an ambient file, quoted values) must still be accepted and run.

Why these are attacks is shown with the real Radiance binaries, not assumed:
rtrace writes an ambient file named in an @options file wherever it points;
rad strips the quotes of ``OCTREE='/abs'`` and pastes ``~`` into sh command
lines (``rad -n`` prints them); rad reads its variables the way
:mod:`rayserver.server.radvars` says (``rad -e`` prints them).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import RayHome
from jobtools import BIN, rad_env, wait_final

from rayserver.server import radvars

pytestmark = pytest.mark.shared_server

SCENE = "void light l 0 0 3 1 1 1\nl sphere s 0 0 4 0 0 0 0.2\n"
RIF = "scene= scene.rad\nZONE= I -1 1 -1 1 -1 1\nQUALITY= LOW\nRESOLUTION= 8\n"


@pytest.fixture
def project(rayhome: RayHome) -> Path:
    proj = rayhome.projects / "p"
    (proj / "amb").mkdir(parents=True)
    (proj / "scene.rad").write_text(SCENE)
    with open(proj / "scene.oct", "wb") as out:
        subprocess.run(
            [str(BIN / "oconv"), "scene.rad"],
            cwd=proj,
            stdout=out,
            check=True,
            env=rad_env(),
            timeout=30,
        )
    (proj / "pts.txt").write_text("0 0 5 0 0 -1\n")
    (proj / "scene.rif").write_text(RIF)
    return proj


def step(program: str, *args: str, **io: str | None) -> dict[str, Any]:
    return {"program": program, "args": list(args), "stdin": None, "stdout": None, **io}


def refused(srv: Any, body: dict[str, Any], field: str, *words: str) -> str:
    status, answer = srv.request("POST", "/v1/jobs", body)
    assert status == 403, (body, answer)
    message = answer["error"]
    assert message.startswith(field), (field, message)
    for word in words:
        assert word in message, (word, message)
    return message


def steps_job(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"location": "projects", "project": "p", "steps": list(steps)}


def rad_job(rif: str, *options: str) -> dict[str, Any]:
    return {"location": "projects", "project": "p", "rad": {"rif": rif, "options": list(options)}}


def no_jobs_and_nothing_outside(srv: Any, outside: Path) -> None:
    status, listing = srv.request("GET", "/v1/jobs")
    assert status == 200 and srv.own(listing["jobs"]) == [], listing
    assert sorted(p.name for p in outside.iterdir()) == [], "a file appeared outside"


# ------------------------------------------------------------ Radiance's own behaviour


def test_rtrace_really_writes_where_an_options_file_says(tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "scene.rad").write_text(SCENE)
    env = rad_env()
    with open(proj / "scene.oct", "wb") as out:
        subprocess.run([str(BIN / "oconv"), "scene.rad"], cwd=proj, stdout=out, env=env, check=True)
    (proj / "opts").write_text(f"-ab 1 -af {tmp_path}/stolen.amb\n")
    subprocess.run(
        [str(BIN / "rtrace"), "-h", "@opts", "scene.oct"],
        cwd=proj,
        input=b"0 0 5 0 0 -1\n",
        capture_output=True,
        env=env,
        timeout=30,
        check=True,
    )
    assert (tmp_path / "stolen.amb").exists()


def test_rad_really_pastes_unquoted_paths_and_tilde_into_sh(tmp_path: Path) -> None:
    (tmp_path / "scene.rad").write_text(SCENE)
    (tmp_path / "s.rif").write_text("scene= scene.rad\nZONE= I -1 1 -1 1 -1 1\n")
    out = subprocess.run(
        [str(BIN / "rad"), "-n", "s.rif", "OCTREE='/elsewhere/x.oct'", "AMB=~/x.amb"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=rad_env(),
        timeout=30,
    )
    assert "oconv scene.rad > /elsewhere/x.oct" in out.stdout, out
    assert "-af ~/x.amb" in out.stdout, out


# Quotes, escapes, comments, abbreviations, repeated and overridden assignments,
# a continued line and CR LF line ends: compared with what rad itself prints.
TRICKY_RIF = (
    "scene= scene.rad   # a comment\r\n"
    "materials = 'my  mat.rad'\n"
    'OCT = "x y.oct"\n'
    "AMB= first.amb\n"
    "AMBFILE= 'second.amb'\n"
    "render= -ab 1   -aa .2 \\\n   -ad 64\n"
    "render= -as 8 \\# not a comment\n"
    "PIC =pic\n"
    "ZONE= I -1 1 -1 1 -1 1\n"
    "REP= 1 'err file'\n"
)


def rad_printed(folder: Path, *overrides: str) -> dict[str, list[str]]:
    out = subprocess.run(
        [str(BIN / "rad"), "-n", "-s", "-e", "t.rif", *overrides],
        cwd=folder,
        capture_output=True,
        text=True,
        env=rad_env(),
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    printed: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            printed.setdefault(name, []).append(value.strip())
    return printed


def test_rif_values_are_parsed_as_rad_parses_them(tmp_path: Path) -> None:
    # A value's first character never opens a quote for setvariable: the two
    # spaces of 'my  mat.rad' become one, and rad looks for "my mat.rad".
    for name in ("scene.rad", "my mat.rad"):
        (tmp_path / name).write_text(SCENE)
    data = TRICKY_RIF.encode()
    (tmp_path / "t.rif").write_bytes(data)
    overrides = ["QUAL=HIGH", "render=-lr 4", "PICTURE='final'"]
    ours = radvars.rif_assignments(data, "t.rif")
    ours += [a for o in overrides if (a := radvars.parse_assignment(o, "arg")) is not None]
    mine = {a.name: a.value for a in radvars.final_values(ours)}
    theirs = rad_printed(tmp_path, *overrides)
    names = ("scene", "materials", "OCTREE", "AMBFILE", "render", "PICTURE", "REPORT", "QUALITY")
    for name in names:
        assert theirs[name] == [mine[name]], (name, theirs[name], mine[name])


# ------------------------------------------------------------ attacks refused at submit


def test_hostile_step_arguments_get_403_and_nothing_runs(
    server: Any, rayhome: RayHome, project: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (project / "evil.opt").write_text(f"-ab 1\n-af {outside}/stolen.amb\n")
    (project / "outer.opt").write_text("-ab 1 @inner.opt\n")
    (project / "inner.opt").write_text("-aa .1 -af ../../stolen.amb\n")
    (project / "loop.opt").write_text("-ab 1 @loop.opt\n")
    (project / "tilde.opt").write_text("-af ~/stolen.amb\n")
    os.mkfifo(project / "fifo.opt")  # opening it to read would wait for a writer forever
    os.mkfifo(project / "fifo.rif")
    rt = ("rtrace", "-h")
    cases = [
        (step("rcalc", "-f", "~/secret.cal"), "steps[0].args[1]", "'~'", "home folder"),
        (step(*rt, "-af", "~root/x.amb", "scene.oct"), "steps[0].args[2]", "'~'"),
        (step(*rt, "@evil.opt", "scene.oct"), "steps[0].args[1]", "'evil.opt', word 4", "absolute"),
        (step(*rt, "@outer.opt", "scene.oct"), "steps[0].args[1]", "'inner.opt', word 4", "'..'"),
        (step(*rt, "@loop.opt", "scene.oct"), "steps[0].args[1]", "nest more than 8"),
        (step(*rt, "@tilde.opt", "scene.oct"), "steps[0].args[1]", "'tilde.opt', word 2", "'~'"),
        (step(*rt, "@missing.opt", "scene.oct"), "steps[0].args[1]", "does not exist", "exist"),
        (step(*rt, "$HOME", "scene.oct"), "steps[0].args[1]", "environment variable HOME"),
        (step("rcontrib", "@evil.opt", "scene.oct"), "steps[0].args[0]", "absolute"),
        (step(*rt, "@fifo.opt", "scene.oct"), "steps[0].args[1]", "not a regular file"),
        (step("rad", "fifo.rif"), "steps[0].args[0]", "not a regular file"),
    ]
    for body, field, *words in cases:
        refused(server, steps_job(body), field, *words)
    no_jobs_and_nothing_outside(server, outside)


def test_hostile_rad_overrides_and_rif_get_403_and_nothing_runs(
    server: Any, rayhome: RayHome, project: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (project / ".?").mkdir()  # so that rad's own file check passes for the glob below
    (project / "evil.opt").write_text(f"-af {outside}/stolen.amb\n")
    (tmp_path / "secret.rad").write_text(SCENE)
    (project / "lièn.rad").symlink_to(tmp_path / "secret.rad")  # a UTF-8 name leading out
    rif = "scene.rif"
    overrides = [
        (f"OCTREE='{outside}/x.oct'", "absolute"),
        (f'AMBFILE="{outside}/x.amb"', "absolute"),
        ("AMBFILE=~/x.amb", "'~'"),
        ("AMB=~/x.amb", "'~'"),
        ("PICTURE='../../x'", "'..'"),
        ("render=-af '../../../x.amb'", "'..'"),
        ("render=@evil.opt", "'evil.opt', word 2", "absolute"),
        ("scene=scene.rad .?/.?/.?/x.rad", "matches '..'"),
        ("oconv=sh -c id", "would make rad run 'sh' in place of oconv", "options"),
        ("rpict=sh -c x", "in place of rpict"),
        ("render=-ab 1 {..,x}/y", "'{'"),
        ("view=v -vf 'un balanced", "unbalanced quote"),
    ]
    for arg, *words in overrides:
        refused(server, steps_job(step("rad", "-n", rif, arg)), "steps[0].args[2]", *words)
    lines = [
        (f"AMBFILE= {outside}/x.amb\n", "line 5: AMBFILE=", "absolute"),
        ("OCT= '~/x.oct'\n", "line 5: OCTREE=", "'~'"),
        ("render= -ab 1 ; cat ../../config/token\n", "line 5: render=", "';'"),
        ("render= -ab 1\\\ntouch x\n", "line 5: render=", "'\\n'"),
        ("oconv= bash -c 'id > x'\n", "in place of oconv"),
        ("ZF= ../../../z\n", "line 5: ZFILE=", "'..'"),
        ("RAWFILE= /tmp/raw\n", "RAWFILE=", "absolute"),
        (f"REPORT= 1 {outside}/err\n", "REPORT=", "absolute"),
        ("OPTFILE= ~/opts\n", "OPTFILE=", "'~'"),
        (f"view= v -vf {outside}/v.vf\n", "view=", "absolute"),
        ("illum= ../../../x.rad\n", "illum=", "'..'"),
        ("materials= '~/m.rad'\n", "materials=", "'~'"),
        ("objects= /etc/passwd\n", "objects=", "absolute"),
        ("PGMAP= /tmp/g.pm 1000\n", "PGMAP=", "absolute"),
        ("render= @evil.opt\n", "'evil.opt', word 2"),
        ("scene= scene.rad lièn.rad\n", "line 5: scene=", "leads outside"),
    ]
    for line, *words in lines:
        (project / "hostile.rif").write_text(RIF + line)
        refused(server, rad_job("hostile.rif"), "rad.rif", "'hostile.rif'", *words)
    no_jobs_and_nothing_outside(server, outside)


# ------------------------------------------------------------ legitimate work still runs


def test_options_files_and_rad_variables_inside_the_project_run(
    server: Any, rayhome: RayHome, project: Path
) -> None:
    (project / "good.opt").write_text("-ab 1 -ad 16 @more.opt\n")
    (project / "more.opt").write_text("-af amb/good.amb\n")
    ok = steps_job(step("rtrace", "-h", "@good.opt", "scene.oct", stdin="pts.txt", stdout="o.txt"))
    status, job = server.request("POST", "/v1/jobs", ok)
    assert status == 201, job
    assert wait_final(server, job["id"])["state"] == "done"
    assert (project / "amb" / "good.amb").stat().st_size > 0
    # A rif in a subfolder naming the project's files above it, quoted and abbreviated.
    (project / "sub").mkdir()
    (project / "sub" / "room.rif").write_text(
        "scene= '../scene.rad'\nZONE= I -1 1 -1 1 -1 1\nQUAL= LOW\nRES= 8\n"
        'AMB= "room.amb"\nPIC= room\nrender= -ab 1\n'
    )
    status, job = server.request("POST", "/v1/jobs", rad_job("sub/room.rif"))
    assert status == 201, job
    done = wait_final(server, job["id"], timeout=120)
    assert done["state"] == "done", done
    assert (project / "sub" / "room_X.hdr").stat().st_size > 0
