"""The views of one rad file on several hosts: ``rayfront run --hosts ... -- rad x.rif``.

rad renders every ``view=`` of its rif, one after another; ``rad -v N`` renders
only the N-th, into the same files the full run writes (``PICTURE_name.hdr``,
the raw ``.unf`` it removes at the end, ``ZFILE_name.zbf``). So each view
becomes one part. All of them need the octree (and mkillum's, and a fresh
ambient file), which rad builds when it is out of date: parts started together
would all build it at once into the same file. A first job builds it alone:
``rad -v K x.rif`` with K one past the last view selects no view, so rad makes
the octree, runs mkillum and mkpmap, removes a stale ambient file, and renders
nothing (src/util/rad.c: getview() returns no view, the render loop is empty).
Then the views run in parallel; with ``AMBFILE`` they share it under file locks.

Which views there are and which files they write is asked from rad itself
(``rad -n -e``, a dry run that prints every variable), here on the client.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rayserver.client.splitplan import Part, run_tool, usage_error

_REFUSED = {
    "-n": "is a dry run: run it without --hosts",
    "-N": "runs processes on one host (and needs rpiece): leave it out",
    "-o": "runs rvu on a display: run it without --hosts",
    "-v": "renders one view: there is nothing to split; run it without --hosts",
}


@dataclass(frozen=True)
class RadPlan:
    """The octree job and one part per view, with the files rad will write."""

    prelude: Part
    views: list[Part]
    pictures: list[str]  # project-relative, one per view
    octree: str  # project-relative
    ambient: bool  # AMBFILE is set: the views share it under locks
    touch_only: bool  # rad -t: nothing is rendered, pictures may not appear


def split_rad_args(args: Sequence[str]) -> tuple[list[str], str, list[str]]:
    """(options, rif, VAR=value overrides) of a rad command line; refuses what cannot split."""
    options: list[str] = []
    i = 0
    while i < len(args) and args[i].startswith("-"):
        word = args[i]
        if word[:2] in _REFUSED:
            raise usage_error(f"rad {word} {_REFUSED[word[:2]]}")
        options.append(word)
        i += 1
    if i >= len(args):
        raise usage_error("rad needs a rif file, e.g. rayfront run --hosts all -- rad scene.rif")
    return options, args[i], list(args[i + 1 :])


def rad_folder(rif: str, overrides: Sequence[str]) -> str:
    """Where rad runs, relative to the project: the rif's folder, or the project with overrides.

    As rayfront run sends it: the API's rad shortcut runs in the rif's folder;
    a command with VAR=value overrides is sent as a plain step, run in the project.
    """
    return "" if overrides else os.path.dirname(rif)


def rad_variables(
    options: Sequence[str], rif: str, overrides: Sequence[str], cwd: Path, env: dict[str, str]
) -> list[tuple[str, str]]:
    """(name, value) of every variable rad sets for this rif, views one by one, from ``rad -n -e``."""
    rif_arg = os.path.relpath(rif, rad_folder(rif, overrides) or ".")
    out = run_tool(["rad", "-n", "-e", *options, rif_arg, *overrides], cwd, env)
    found = []
    for line in out.splitlines():
        if line.startswith("\t") or "=" not in line:
            continue  # the commands rad would run
        name, _, value = line.partition("=")
        found.append((name.strip(), value.strip()))
    return found


def plan_rad(args: Sequence[str], project_dir: Path, env: dict[str, str]) -> RadPlan:
    options, rif, overrides = split_rad_args(args)
    folder = rad_folder(rif, overrides)
    found = rad_variables(options, rif, overrides, project_dir / folder, env)
    values = dict(found)
    views = [value for name, value in found if name == "view"]
    if not views:
        raise usage_error(f"rad -n -e {rif} shows no view= line; nothing to split")
    names = [
        str(k) if value.startswith("-") else value.split()[0]
        for k, value in enumerate(views, start=1)
    ]
    picture = values.get("PICTURE") or os.path.splitext(os.path.basename(rif))[0]
    count = len(views)

    def part(index: int, total: int, label: str, view: int) -> Part:
        return Part(
            index=index,
            count=total,
            label=label,
            weight=1 / total,
            args=("-v", str(view), *options, rif, *overrides),
        )

    return RadPlan(
        prelude=part(0, 1, "octree and shared files", count + 1),
        views=[part(k, count, f"view {names[k]}", k + 1) for k in range(count)],
        pictures=[os.path.join(folder, f"{picture}_{name}.hdr") for name in names],
        octree=os.path.join(folder, values.get("OCTREE", "")),
        ambient=bool(values.get("AMBFILE")),
        touch_only="-t" in options,
    )
