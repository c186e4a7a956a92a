"""The POST /v1/jobs body for a command line run in a project (``rayfront submit/run``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rayserver.client.connection import EXIT_USAGE, ClientError
from rayserver.client.context import Project

# rad options that take a value (rad [-s][-n|-N npr][-t][-e][-V][-w][-v view][-o dev] rfile [VAR=val ..])
_RAD_VALUE_OPTIONS = {"-N", "-v", "-o"}


def project_file(project: Project, text: str, what: str) -> str:
    """A file named on the command line, as a path relative to the project directory."""
    path = Path(text)
    absolute = path if path.is_absolute() else project.local_dir / path
    # Compare without resolving symlinks of the file itself: it may not exist yet (stdout).
    parent = absolute.parent.resolve()
    base = project.local_dir.resolve()
    if parent != base and base not in parent.parents:
        raise ClientError(
            f"{what} {text!r} is outside the project directory {project.local_dir}; "
            "expected a file inside it",
            exit_code=EXIT_USAGE,
        )
    return (parent / absolute.name).relative_to(base).as_posix()


def rad_request(args: list[str]) -> dict[str, Any] | None:
    """rad's arguments as the API's rad shortcut {rif, options}; None if it cannot say them.

    The shortcut runs ``rad <options> <rif>``, so VAR=value overrides (which rad
    only takes after the rif) cannot go through it: those return None and the
    command is sent as a plain step, run in the project directory like here.
    """
    rif = None
    options: list[str] = []
    overrides = False
    i = 0
    while i < len(args):
        word = args[i]
        if word in _RAD_VALUE_OPTIONS:
            if i + 1 >= len(args):
                raise ClientError(f"rad option {word} needs a value", exit_code=EXIT_USAGE)
            options += [word, args[i + 1]]
            i += 2
            continue
        if word.startswith("-"):
            options.append(word)
        elif rif is None:
            rif = word
        else:
            overrides = True
        i += 1
    if rif is None:
        raise ClientError(
            "rad needs a rif file, e.g. rayfront run -- rad scene.rif", exit_code=EXIT_USAGE
        )
    return None if overrides else {"rif": rif, "options": options}


def build_job(
    project: Project,
    command: list[str],
    name: str | None = None,
    priority: int = 0,
    stdin: str | None = None,
    stdout: str | None = None,
    after: list[int] | None = None,
) -> dict[str, Any]:
    """The POST /v1/jobs body for ``command`` run in ``project``."""
    if not command:
        raise ClientError(
            "no command: give the Radiance program and its arguments after '--', "
            "e.g. rayfront submit -- rad scene.rif",
            exit_code=EXIT_USAGE,
        )
    program = command[0]
    if "/" in program or not program:
        raise ClientError(
            f"program {program!r}: give a Radiance program's name (e.g. rpict), "
            "not a path; the server runs its own Radiance",
            exit_code=EXIT_USAGE,
        )
    job: dict[str, Any] = {
        "location": project.location,
        "project": project.path,
        "priority": priority,
        "name": name or " ".join(command)[:200],
    }
    if after:
        job["after"] = sorted(set(after))
    if program == "rad":
        if (stdin and stdin != "-") or stdout:
            raise ClientError(
                "--stdin/--stdout do not apply to rad (it names its own files)",
                exit_code=EXIT_USAGE,
            )
        rad = rad_request(command[1:])
        if rad is not None:
            job["rad"] = rad
            return job
    job["steps"] = [
        {
            "program": program,
            "args": command[1:],
            "stdin": redirect(project, stdin, "--stdin"),
            "stdout": redirect(project, stdout, "--stdout"),
        }
    ]
    return job


STREAM = {"stream": True}


def redirect(project: Project, given: str | None, what: str) -> str | dict[str, bool] | None:
    """``--stdin``/``--stdout``: a project file, ``-`` (streamed by rayfront run), or None."""
    if given == "-":
        return dict(STREAM)
    return project_file(project, given, what) if given else None


def build_shell_job(
    project: Project,
    shell: tuple[str, str],
    args: list[str],
    *,
    name: str | None = None,
    priority: int = 0,
    stdin: str | None = None,
    stdout: str | None = None,
    after: list[int] | None = None,
) -> dict[str, Any]:
    """The POST /v1/jobs body of ``--sh 'COMMAND LINE'`` or ``--script FILE [-- ARGS]``.

    ``shell`` is ("sh", the command line) or ("script", the file as given).
    """
    kind, text = shell
    step: dict[str, Any] = {
        "stdin": redirect(project, stdin, "--stdin"),
        "stdout": redirect(project, stdout, "--stdout"),
    }
    if kind == "sh":
        if args:
            raise ClientError(
                "--sh takes its whole command line as one argument; nothing goes after '--'",
                exit_code=EXIT_USAGE,
            )
        if not text.strip():
            raise ClientError("--sh: the command line is empty", exit_code=EXIT_USAGE)
        step["sh"] = text
        shown = text
    else:
        script = project_file(project, text, "--script")
        if not (project.local_dir / script).is_file():
            raise ClientError(
                f"--script {text!r}: no such file in the project directory {project.local_dir}",
                exit_code=EXIT_USAGE,
            )
        step.update(script=script, args=list(args))
        shown = " ".join(["sh", script, *args])
    job: dict[str, Any] = {
        "location": project.location,
        "project": project.path,
        "priority": priority,
        "name": name or shown[:200],
        "steps": [step],
    }
    if after:
        job["after"] = sorted(set(after))
    return job
