"""Validation of a submitted job: from request JSON to the resolved job stored in the queue.

Order of checks, each failing with a :class:`JobSpecError` that carries the
HTTP status and a message naming the field and what was expected:

1. shape against ``components/schemas/JobRequest`` of ``rayserver/server/openapi.yaml``
   (422), then the limits of the settings (``max_steps``, ``max_args``,
   ``max_arg_length``; 422);
2. the location, translated with this server's own host record (404 when
   unknown, after one reload of the configuration);
3. the project directory (403 when it leaves the location, 404 when missing);
4. every program must be a Radiance program of the configured bin directory
   (422), run without a shell;
5. stdin, stdout and the rif must stay inside the project directory after
   resolving symlinks (403), and every argument is checked by
   :mod:`rayserver.server.argcheck` as the program will read it: paths,
   ``~``, ``!commands``, ``@options`` files (read and checked), and for rad
   every value from the rif and its ``VAR=value`` arguments as the shell rad
   hands them to will read them (403).

The result, :class:`ResolvedJob`, is what ``JobDB.submit`` stores.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import referencing
import yaml
from jsonschema.exceptions import ValidationError, best_match

from rayserver.common import radiance
from rayserver.common.hosts import HostRecord, HostsConfig
from rayserver.common.settings import Settings
from rayserver.server import argcheck
from rayserver.server.argcheck import confine as _confine
from rayserver.server.specerror import JobSpecError

log = logging.getLogger("rayserver.server.jobspec")

_SCHEMA_URI = "urn:rayserver:openapi"
__all__ = ["JobSpecError", "ResolvedJob", "check_shape", "resolve_job", "resolve_project"]


@dataclass(frozen=True)
class ResolvedJob:
    """A checked job, ready for ``JobDB.submit``."""

    name: str | None
    priority: int
    location: str
    project: str
    workdir: str
    steps: list[dict[str, Any]]
    env: dict[str, str]
    libraries: list[str] = field(default_factory=list)
    project_dir: str = ""
    cpus: int = 1


@functools.lru_cache(maxsize=1)
def openapi_document() -> dict[str, Any]:
    """The API description shipped as package data (parsed once)."""
    text = resources.files("rayserver.server").joinpath("openapi.yaml").read_text(encoding="utf-8")
    # libyaml's loader where PyYAML has it: 0.011 s instead of 0.14 s, on every worker start.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader either way


@functools.lru_cache(maxsize=16)
def schema_validator(name: str) -> jsonschema.Draft202012Validator:
    """A validator for ``components/schemas/<name>`` with the document's $refs resolvable."""
    doc = openapi_document()
    if name not in doc["components"]["schemas"]:
        raise KeyError(f"no schema {name!r} in openapi.yaml")
    resource = referencing.Resource.from_contents(
        doc, default_specification=referencing.jsonschema.DRAFT202012
    )
    registry = referencing.Registry().with_resource(_SCHEMA_URI, resource)
    # $refs inside are document-relative ("#/components/..."); they resolve
    # against the URI the document is registered under.
    root = {"$ref": f"{_SCHEMA_URI}#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(root, registry=registry)


# ---------------------------------------------------------------- shape


def _field_name(path: Any) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


_TYPE_WORDS = {
    "string": "a string",
    "integer": "a whole number",
    "number": "a number",
    "object": "an object",
    "array": "a list",
    "boolean": "true or false",
    "null": "null",
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_error(error: ValidationError) -> tuple[str, str]:
    """(field, message) for one schema violation, in words a person understands."""
    where = _field_name(error.absolute_path)
    prefix = f"{where}: " if where else ""
    kind = error.validator
    value = error.validator_value
    inst = error.instance
    if kind == "required":
        missing = [k for k in value if isinstance(inst, dict) and k not in inst]
        name = missing[0] if missing else "?"
        full = f"{where}.{name}" if where else name
        return full, f"missing required field {full!r}"
    if kind == "additionalProperties" and isinstance(inst, dict):
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(k for k in inst if k not in allowed)
        full = f"{where}.{extra[0]}" if where and extra else (extra[0] if extra else where)
        return full, (f"unknown field {full!r}; expected only: {', '.join(allowed)}")
    if kind == "type":
        types = value if isinstance(value, list) else [value]
        wanted = " or ".join(_TYPE_WORDS.get(t, t) for t in types)
        return where, f"{prefix}expected {wanted}, got {_json_type(inst)} {_short(inst)}"
    if kind == "minLength":
        return (
            where,
            f"{prefix}must not be empty"
            if value == 1
            else f"{prefix}must be at least {value} characters long",
        )
    if kind == "maxLength":
        return where, f"{prefix}is longer than {value} characters"
    if kind == "minimum":
        return where, f"{prefix}must be at least {value}, got {_short(inst)}"
    if kind == "maximum":
        return where, f"{prefix}must be at most {value}, got {_short(inst)}"
    if kind == "minItems":
        return where, f"{prefix}needs at least {value} entr{'y' if value == 1 else 'ies'}"
    if kind == "maxItems":
        return where, f"{prefix}has more than {value} entries"
    if kind == "enum":
        return where, f"{prefix}must be one of {', '.join(map(str, value))}, got {_short(inst)}"
    return where, f"{prefix}{error.message}"


def check_shape(data: Any, settings: Settings) -> dict[str, Any]:
    """The request body checked against the JobRequest schema and the settings' limits."""
    if not isinstance(data, dict):
        raise JobSpecError(
            422,
            f"the job must be a JSON object with location, project and steps or rad; "
            f"got {_json_type(data)}",
        )
    has_steps, has_rad = "steps" in data, "rad" in data
    if has_steps == has_rad:
        raise JobSpecError(
            422,
            "give exactly one of 'steps' (a list of programs to run) and 'rad' "
            '({"rif": ..., "options": [...]}); got ' + ("both" if has_steps else "neither"),
            "steps",
        )
    _check_kinds(data)
    error = best_match(schema_validator("JobRequest").iter_errors(data))
    if error is not None:
        where, message = describe_error(error)
        raise JobSpecError(422, message, where or None)
    _check_limits(data, settings)
    _check_streams(data, settings)
    _check_shell_allowed(data, settings)
    return data


STEP_KINDS = ("program", "sh", "script")


def _check_kinds(data: dict[str, Any]) -> None:
    """Each step names exactly one of program, sh and script (clearer than the schema's oneOf)."""
    steps = data.get("steps")
    for i, step in enumerate(steps if isinstance(steps, list) else []):
        if not isinstance(step, dict):
            continue
        kinds = [k for k in STEP_KINDS if k in step]
        if not kinds:
            raise JobSpecError(
                422,
                f"missing required field 'steps[{i}].program' (or 'sh', a command line, or "
                "'script', a sh script in the project)",
                f"steps[{i}].program",
            )
        if len(kinds) != 1:
            got = " and ".join(kinds)
            raise JobSpecError(
                422,
                f"steps[{i}]: give exactly one of program (a Radiance program), sh (a command "
                f"line) and script (a sh script in the project); got {got}",
                f"steps[{i}]",
            )
        if kinds == ["sh"] and step.get("args"):
            raise JobSpecError(
                422,
                f"steps[{i}].args: a sh step takes no args; write them into its command line",
                f"steps[{i}].args",
            )


def _check_shell_allowed(data: dict[str, Any], settings: Settings) -> None:
    """sh command lines and scripts only run inside the job's sandbox: 403 without one."""
    for i, step in enumerate(data.get("steps") or []):
        kind = "sh" if "sh" in step else "script" if "script" in step else None
        if kind and settings.sandbox != "on":
            raise JobSpecError(
                403,
                f"steps[{i}].{kind}: shell command lines and scripts run only inside the job "
                'sandbox, and this server runs with sandbox = "off"; ask its administrator, or '
                "run the Radiance programs as separate steps",
                f"steps[{i}].{kind}",
            )


def _check_streams(data: dict[str, Any], settings: Settings) -> None:
    """``{"stream": true}`` on one step's stdin and one step's stdout at most; local jobs only."""
    for key in ("stdin", "stdout"):
        steps = [i for i, s in enumerate(data.get("steps") or []) if isinstance(s.get(key), dict)]
        if len(steps) > 1:
            raise JobSpecError(
                422,
                f"steps[{steps[1]}].{key}: only one step of a job may have a streamed {key} "
                f"(steps {', '.join(map(str, steps))} have one)",
                f"steps[{steps[1]}].{key}",
            )
        if steps and settings.executor != "local":
            raise JobSpecError(
                422,
                f'steps[{steps[0]}].{key}: a streamed {key} needs executor = "local"; this '
                f"server runs jobs through {settings.executor} (name a file in the project instead)",
                f"steps[{steps[0]}].{key}",
            )


def _check_limits(data: dict[str, Any], settings: Settings) -> None:
    steps = data.get("steps") or []
    if len(steps) > settings.max_steps:
        raise JobSpecError(
            422,
            f"steps: {len(steps)} steps given, this server accepts at most "
            f"{settings.max_steps} (setting max_steps)",
            "steps",
        )
    lists: list[tuple[str, list[str]]] = [
        (f"steps[{i}].args", s.get("args") or []) for i, s in enumerate(steps)
    ]
    if "rad" in data:
        lists.append(("rad.options", data["rad"].get("options") or []))
    for where, args in lists:
        if len(args) > settings.max_args:
            raise JobSpecError(
                422,
                f"{where}: {len(args)} arguments given, this server accepts at most "
                f"{settings.max_args} (setting max_args)",
                where,
            )
        for i, arg in enumerate(args):
            if len(arg) > settings.max_arg_length:
                raise JobSpecError(
                    422,
                    f"{where}[{i}]: argument is {len(arg)} characters long, this server "
                    f"accepts at most {settings.max_arg_length} (setting max_arg_length)",
                    f"{where}[{i}]",
                )
            if "\x00" in arg:
                raise JobSpecError(422, f"{where}[{i}]: NUL character in argument", f"{where}[{i}]")


# ---------------------------------------------------------------- location


def translate_location(
    location: str,
    *,
    record: Callable[[], HostRecord | None],
    reload: Callable[[], object],
    client: str,
) -> Path:
    """The local root of ``location`` from this server's host record.

    An unknown name makes the server re-read its configuration once (the
    hosts file may have been edited a moment ago) before refusing with 404.
    """
    for attempt in (1, 2):
        rec = record()
        if rec is not None and location in rec.locations:
            return Path(rec.locations[location])
        if attempt == 1:
            reload()
    rec = record()
    known = ", ".join(sorted(rec.locations)) if rec and rec.locations else "none"
    log.warning("client %s asked for unknown location %r (known here: %s)", client, location, known)
    host = rec.name if rec else "this server"
    raise JobSpecError(
        404,
        f"location {location!r} is not known on {host}; its hosts record has: {known}",
        "location",
    )


# ---------------------------------------------------------------- whole job


def resolve_project(
    location: str,
    project: str,
    *,
    record: Callable[[], HostRecord | None],
    reload: Callable[[], object],
    client: str,
) -> tuple[Path, Path]:
    """(location root as configured, resolved project directory), checked as for a job.

    Shared by job submission and the share probe (rayserver.server.shareprobe), so
    both translate, confine and refuse in the same words.
    """
    loc_root_raw = translate_location(location, record=record, reload=reload, client=client)
    loc_root = Path(os.path.realpath(loc_root_raw))
    if not loc_root.is_dir():
        raise JobSpecError(
            404,
            f"location {location!r} is {loc_root_raw} on this server, which is not a "
            "directory (is the volume mounted?)",
            "location",
        )
    project_dir = _confine(project, loc_root, loc_root, "project")
    if not project_dir.is_dir():
        raise JobSpecError(
            404,
            f"project {project!r} does not exist in location {location!r} on this "
            f"server (looked for {project_dir})",
            "project",
        )
    return loc_root_raw, project_dir


def resolve_job(
    data: dict[str, Any],
    *,
    settings: Settings,
    hosts: HostsConfig,
    record: Callable[[], HostRecord | None],
    reload: Callable[[], object],
    client: str,
) -> ResolvedJob:
    """Check a shaped request (see :func:`check_shape`) and resolve it for the queue."""
    location, project = data["location"], data["project"]
    loc_root_raw, project_dir = resolve_project(
        location, project, record=record, reload=reload, client=client
    )

    if "rad" in data:
        steps_in, workdir = _rad_steps(data["rad"], project_dir)
    else:
        steps_in, workdir = data["steps"], project_dir

    from_steps = "steps" in data
    steps = [
        _resolve_step(step, i, from_steps, settings, workdir, project_dir)
        for i, step in enumerate(steps_in)
    ]

    cpus = job_cpus(steps_in, rad="rad" in data, record=record())
    libs = [str(p) for p in hosts.library_dirs(loc_root_raw) if p.is_dir()]
    return ResolvedJob(
        name=data.get("name"),
        priority=int(data.get("priority", 0)),
        location=location,
        project=project,
        workdir=str(workdir),
        steps=steps,
        env=job_env(settings, libs),
        libraries=libs,
        project_dir=str(project_dir),
        cpus=cpus,
    )


def _resolve_step(
    step: dict[str, Any],
    i: int,
    from_steps: bool,
    settings: Settings,
    workdir: Path,
    project_dir: Path,
) -> dict[str, Any]:
    """One step with its program's absolute path; every path in it checked to stay inside.

    ``from_steps``: the request gave ``steps`` (else the step is the ``rad`` shortcut's,
    and errors name ``rad.options`` and ``rad.rif``).
    """
    where = f"steps[{i}]" if from_steps else "rad"
    if "sh" in step or "script" in step:
        return _shell_step(step, where, workdir, project_dir)
    program = step["program"]
    path = radiance.program_path(settings, program)
    if path is None:
        raise JobSpecError(
            422,
            f"{where}.program: {program!r} is not a Radiance program on this server "
            f"(programs come from {radiance.bin_dir(settings)}, given by name only)",
            f"{where}.program",
        )
    args = list(step.get("args") or [])
    argcheck.check_step(program, args, workdir, project_dir, _arg_fields(from_steps, where, args))
    for key in ("stdin", "stdout"):
        if isinstance(step.get(key), str):  # (not {"stream": true})
            _confine(step[key], workdir, project_dir, f"{where}.{key}")
    return {
        "program": program,
        "path": str(path),
        "args": args,
        "stdin": step.get("stdin"),
        "stdout": step.get("stdout"),
    }


SHELL = "/bin/sh"


def _shell_step(
    step: dict[str, Any], where: str, workdir: Path, project_dir: Path
) -> dict[str, Any]:
    """A sh command line or script as a step of program sh.

    No argument check applies (a shell can do anything the box lets it): the
    sandbox is what confines it (see _check_shell_allowed). A script must be
    a regular file in the project; its path, the stdin and stdout files are
    confined like any other.
    """
    for key in ("stdin", "stdout"):
        if isinstance(step.get(key), str):
            _confine(step[key], workdir, project_dir, f"{where}.{key}")
    resolved: dict[str, Any] = {
        "program": "sh",
        "path": SHELL,
        "stdin": step.get("stdin"),
        "stdout": step.get("stdout"),
    }
    if "sh" in step:
        if "\x00" in step["sh"]:
            raise JobSpecError(422, f"{where}.sh: NUL character in the command line", f"{where}.sh")
        return {**resolved, "args": ["-c", step["sh"]], "sh": step["sh"]}
    script = step["script"]
    real = _confine(script, workdir, project_dir, f"{where}.script")
    if not real.is_file():
        raise JobSpecError(
            422,
            f"{where}.script: {script!r} is not a file in the project directory",
            f"{where}.script",
        )
    args = list(step.get("args") or [])
    return {**resolved, "args": [script, *args], "script": script}


def _arg_fields(from_steps: bool, where: str, args: list[str]) -> list[str]:
    """The request field each argument came from, for messages."""
    if from_steps:
        return [f"{where}.args[{j}]" for j in range(len(args))]
    return [*(f"rad.options[{j}]" for j in range(len(args) - 1)), "rad.rif"]


def job_env(settings: Settings, libs: list[str]) -> dict[str, str]:
    """RAYPATH and PATH of a job; the procwrap builds the rest of a step's environment
    from scratch (docs/security.md): nothing of the server's own reaches a job."""
    return {
        "RAYPATH": radiance.raypath(settings, libs),
        "PATH": f"{radiance.bin_dir(settings)}:/usr/bin:/bin",
    }


# Programs whose option "-n N" runs N processes at once (rfluxmtx hands it to rcontrib);
# rad's "-N N" runs N renders at once (its "-n" is a dry run).
_PARALLEL_OPTION = {"rtrace": "-n", "rcontrib": "-n", "rfluxmtx": "-n", "rad": "-N"}


def job_cpus(steps: list[dict[str, Any]], *, rad: bool, record: HostRecord | None) -> int:
    """The cpus a job takes (its largest -n / rad -N); 422 when the host has fewer."""
    cpus, where, shown = 1, "", ""
    for i, step in enumerate(steps):
        option = _PARALLEL_OPTION.get(step.get("program") or "")
        args = list(step.get("args") or [])
        for j, arg in enumerate(args[:-1]):
            if option and arg == option and args[j + 1].isdigit() and int(args[j + 1]) > cpus:
                cpus = int(args[j + 1])
                where = "rad.options" if rad else f"steps[{i}].args"
                shown = f"{step['program']} {option} {args[j + 1]}"
    host_cpus = int(getattr(record, "cpus", 0) or 0)
    if record is not None and cpus > max(1, host_cpus):
        raise JobSpecError(
            422,
            f"{where}: {shown} asks for {cpus} cpus at once, but this host ({record.name}) "
            f"has {host_cpus} in its hosts record (the limit of a job's -n / rad -N); "
            f"ask for at most {max(1, host_cpus)}",
            where,
        )
    return cpus


def _rad_steps(rad: dict[str, Any], project_dir: Path) -> tuple[list[dict[str, Any]], Path]:
    """The rad shortcut as one step; rad runs in the rif's folder (it resolves paths from cwd)."""
    rif = rad["rif"]
    rif_path = _confine(rif, project_dir, project_dir, "rad.rif")
    if not rif_path.is_file():
        raise JobSpecError(
            422, f"rad.rif: {rif!r} is not a file in the project directory", "rad.rif"
        )
    workdir = rif_path.parent
    args = [*list(rad.get("options") or []), rif_path.name]
    return [{"program": "rad", "args": args, "stdin": None, "stdout": None}], workdir
