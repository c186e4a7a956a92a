"""A job's receipt: ``receipt.json`` in its folder, written by the procwrap when the job ends.

It says what was run and on what: each step's command line as run (argv,
or the shell text / script), the epoch second each step was started at
(Radiance seeds ``-u+`` sampling with it), exit statuses, the sha256 and
version of each binary, the sha256 and size of every input (files the
arguments name, stdin, ``@`` options files, what an octree's header says it
was built from, rad's rif and the files its commands name) hashed just
before the step that reads them, the outputs' sha256 and size, the
environment, host and cpu model. The shape is in docs/api-contract.md.

Inputs are hashed before their step starts: a file a step overwrites is
recorded as it was read. A file an earlier step of the job wrote is not an
input but an intermediate (left out: it is an output). Binary hashes and
Radiance's version are cached in ``<jobs folder>/.hashes.json``, keyed by
the binary's real path, size and mtime, and so are the hashes of inputs of
1 MiB or more (by inode, size, mtime and ctime too): see :class:`HashCache`.

Nothing here may change a job's result: :func:`write_safely` turns any
failure into a job warning and a log line.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rayserver.common import receipt as rc
from rayserver.common.paths import hostname
from rayserver.jobs.procwrap.confine import ConfinementError, open_confined

if TYPE_CHECKING:
    from rayserver.jobs.procwrap.job import Job
    from rayserver.jobs.rows import StepSpec

HASH_CACHE = ".hashes.json"
CACHE_VERSION = 3  # entries of another version are made anew
CACHE_ENTRIES = 4000
CACHED_INPUT_BYTES = 1 << 20
# Beyond this an input is listed with its size only: hashing it would hold the step back for
# minutes (a sparse file can claim any size).
HASH_LIMIT_BYTES = 64 << 30


class Receipt:
    """What a job's steps ran on, collected while they run (one per procwrap)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.inputs: dict[str, dict[str, Any]] = {}  # project path -> record, first read
        self.ambient: dict[str, dict[str, Any]] = {}
        self.binaries: dict[str, dict[str, Any]] = {}  # resolved path -> record
        self.errors: list[str] = []
        self.rad_variables: dict[str, str] = {}  # rad's, from its dry run (Job.prepare_rad)
        self._cache: HashCache | None = None
        self.next_step: int | None = None  # the index of the step about to start (scan_before)

    def cache(self, job: Job) -> HashCache:
        if self._cache is None:
            folder = job.job_dir.parent if job.job_dir is not None else None
            self._cache = HashCache(folder / HASH_CACHE if folder is not None else None)
        return self._cache

    def input_hash(self, job: Job, path: str) -> dict[str, Any]:
        """sha256 and size of an input; a large one's from the cache while it is unchanged."""
        try:
            st = os.stat(path)
        except OSError as exc:
            return {"error": f"cannot read it: {exc.strerror or exc}"}
        if st.st_size > HASH_LIMIT_BYTES:
            return {"size": st.st_size, "error": f"not hashed: over {HASH_LIMIT_BYTES >> 30} GiB"}
        if st.st_size < CACHED_INPUT_BYTES:
            return _project_hash(job.outputs.root, path)
        key = (
            f"{CACHE_VERSION}|file|{os.path.realpath(path)}|{st.st_ino}|{st.st_size}|"
            f"{st.st_mtime_ns}|{st.st_ctime_ns}"
        )
        cached = self.cache(job).get(key)
        if cached is None:
            cached = _project_hash(job.outputs.root, path)
            self.cache(job).put(key, cached)
        return cached

    def step_starting(self, job: Job, step: StepSpec, args: list[str]) -> None:
        """Just before the job's next step starts: its command, binaries, inputs (never raises)."""
        idx = self.next_step if self.next_step is not None else len(self.steps)
        self.next_step = None
        record: dict[str, Any] = {"step": idx + 1, "program": step["program"]}
        self.steps.append(record)
        try:
            if job.term_signal is None:  # (cancelled meanwhile: no hashing, it will not run)
                self._describe(job, idx, step, args, record)
        except Exception as exc:  # noqa: BLE001 - a receipt never fails a job
            self.errors.append(f"step {idx + 1}: {exc}")
        now = time.time()
        record["started_at"] = round(now, 3)
        record["seed_second"] = int(now)

    def step_ended(self, code: int | None, sig: int | None) -> None:
        """The step started last has ended with this exit status or signal."""
        if self.steps and "exit_status" not in self.steps[-1]:
            self.steps[-1].update(exit_status=code, signal=sig, ended_at=round(time.time(), 3))

    def _describe(
        self, job: Job, idx: int, step: StepSpec, args: list[str], record: dict[str, Any]
    ) -> None:
        argv = [step["path"], *args]
        record["argv"] = argv
        for key in ("sh", "script", "stdin", "stdout"):
            if key in step:
                record[key] = step[key]  # type: ignore[literal-required]
        commands = _commands(job, step, argv)
        if step["program"] == "rad":
            record["commands"] = [" ".join(c) for c in commands[1:]]
        record["binaries"] = [self._binary(job, c[0]) for c in _unique_programs(commands)]
        reasons = [r for c in commands for r in rc.sampling_reasons(c, self._defaults(job, c))]
        record["deterministic"] = not reasons
        if reasons:
            record["nondeterministic_because"] = sorted(set(reasons))
        self._inputs(job, idx, step, commands)

    def _defaults(self, job: Job, command: list[str]) -> dict[str, str] | None:
        """The sampling options' defaults of the command's binary (its -defaults), if known."""
        if os.path.basename(command[0]) not in rc.SAMPLING_PROGRAMS:
            return None
        record = self.binaries.get(self._binary(job, command[0]), {})
        return record.get("defaults")

    def _binary(self, job: Job, program: str) -> str:
        """The binary's resolved path (recorded with its sha256 once)."""
        import shutil  # here: the fork server, which imports this module, never resolves

        found = program if "/" in program else shutil.which(program, path=job.env.get("PATH"))
        if not found:
            return program  # a shell word that is no program on PATH (a builtin, a keyword)
        resolved = os.path.realpath(found)
        if resolved not in self.binaries:
            self.binaries[resolved] = _binary_record(job, self.cache(job), program, resolved)
        return resolved

    def _inputs(self, job: Job, idx: int, step: StepSpec, commands: list[list[str]]) -> None:
        written = set(job.outputs.found)  # what earlier steps wrote: intermediates
        made_here = (
            {c.output for c in job.rad_plan if c.output} if step["program"] == "rad" else set()
        )
        names: list[tuple[str, str]] = []
        if isinstance(step.get("stdin"), str):
            names.append((str(step["stdin"]), "stdin"))
        if "script" in step:
            names.append((str(step["script"]), "script"))
        for command in commands:
            names += rc.named_files(command)
        if step["program"] == "rad":
            names += [(n, "named in the rif") for n in rc.rif_files(self.rad_variables)]
        for name, role in names:
            if name in made_here:
                continue
            self._add_input(job, idx, name, role, written)

    def _add_input(self, job: Job, idx: int, name: str, role: str, written: set[str]) -> None:
        rel = _inside(job, name)
        if rel is None or rel in written or rel in self.inputs or rel in self.ambient:
            return
        path = os.path.join(job.outputs.root, rel)
        entry: dict[str, Any] = {"path": rel, "role": role, "step": idx + 1}
        ambient = role == "ambient"
        entry.update(
            _project_hash(job.outputs.root, path) if ambient else self.input_hash(job, path)
        )
        (self.ambient if role == "ambient" else self.inputs)[rel] = entry
        if role != "ambient" and rel.endswith(".oct"):
            self._octree_sources(job, idx, rel, path, written)

    def _octree_sources(self, job: Job, idx: int, rel: str, path: str, written: set[str]) -> None:
        """The files the octree's header names (oconv ran in the steps' folder or the octree's)."""
        for name in rc.octree_sources(path):
            for base in (job.workdir, os.path.dirname(path)):
                candidate = os.path.join(base, name)
                if os.path.isfile(candidate):
                    source = _inside(job, candidate)
                    if source and source not in written and source not in self.inputs:
                        entry = {"path": source, "role": f"built into {rel}", "step": idx + 1}
                        entry.update(self.input_hash(job, candidate))
                        self.inputs[source] = entry
                    break

    def _all_steps(self, job: Job) -> list[dict[str, Any]]:
        skipped = _skipped(job, {s["step"] for s in self.steps})
        return sorted([*skipped, *self.steps], key=lambda s: s["step"])

    def document(self, job: Job, state: str, reason: str | None) -> dict[str, Any]:
        """The receipt as written (the outputs hashed now)."""
        steps_deterministic = all(s.get("deterministic", False) for s in self.steps)
        reasons = sorted({r for s in self.steps for r in s.get("nondeterministic_because", [])})
        return {
            "receipt_version": rc.RECEIPT_VERSION,
            "job": _job_part(job, state, reason),
            "request": request_of(job),
            "host": host_info(),
            "radiance": _radiance_part(job, self.binaries),
            "environment": dict(job.env),
            "steps": self._all_steps(job),
            "binaries": list(self.binaries.values()),
            "inputs": list(self.inputs.values()),
            "ambient_files": list(self.ambient.values()),
            "outputs": _outputs(job),
            "deterministic": bool(self.steps) and steps_deterministic,
            "nondeterministic_because": reasons,
            "written_at": round(time.time(), 3),
        }


def _skipped(job: Job, done: set[int]) -> list[dict[str, Any]]:
    """The steps a resumed run did not run again (an earlier run of the job did them)."""
    if not getattr(job, "resuming", False):
        return []
    return [
        {"step": i + 1, "program": step["program"], "done_in_an_earlier_run": True}
        for i, step in enumerate(job.steps)
        if i + 1 not in done and i + 1 < min(done, default=len(job.steps) + 1)
    ]


def _commands(job: Job, step: StepSpec, argv: list[str]) -> list[list[str]]:
    """The step's command lines: itself, and what runs inside it (rad's plan, sh's commands)."""
    commands = [argv]
    if step["program"] == "rad":
        commands += [list(c.argv) for c in job.rad_plan]
    elif "sh" in step:
        commands += rc.shell_words(str(step["sh"]))
    elif "script" in step:
        with contextlib.suppress(OSError):
            path = os.path.join(job.workdir, str(step["script"]))
            with open(path, encoding="utf-8", errors="replace") as fh:
                commands += rc.shell_words(fh.read(1 << 20))
    return commands


def _unique_programs(commands: list[list[str]]) -> list[list[str]]:
    seen: set[str] = set()
    out = []
    for command in commands:
        if command and command[0] not in seen and command[0] not in ("rm", "cd", "echo"):
            seen.add(command[0])
            out.append(command)
    return out


def _inside(job: Job, name: str) -> str | None:
    """A name (relative to the steps' folder) as a path relative to the project, if it is a
    regular file whose real path is inside the project; else None (never hashed)."""
    root = os.path.realpath(job.outputs.root)
    path = os.path.realpath(os.path.join(job.workdir, name))
    if not path.startswith(root + os.sep) or not os.path.isfile(path):
        return None
    return os.path.relpath(os.path.normpath(os.path.join(job.workdir, name)), root)


def _hash(path: str) -> dict[str, Any]:
    try:
        digest, size = rc.sha256_file(path)
    except OSError as exc:
        return {"error": f"cannot read it: {exc.strerror or exc}"}
    return {"sha256": digest, "size": size}


def _project_hash(root: str, path: str) -> dict[str, Any]:
    """sha256 and size of a project file, opened as open_confined opens a step's stdin.

    Its real path is checked to be inside the project first (:func:`_inside`); opening
    that path component by component without following links means a symlink swapped
    in meanwhile (by a job beside this one) cannot make us read a file outside.
    """
    real_root = os.path.realpath(root)
    rel = os.path.relpath(os.path.realpath(path), real_root)
    try:
        fd = open_confined(real_root, rel, write=False)
    except ConfinementError as exc:
        return {"error": f"not read: {exc}"}
    except OSError as exc:
        return {"error": f"cannot read it: {exc.strerror or exc}"}
    try:
        digest, size = rc.sha256_file(fd)  # (closes fd)
    except OSError as exc:
        return {"error": f"cannot read it: {exc.strerror or exc}"}
    return {"sha256": digest, "size": size}


def _outputs(job: Job) -> list[dict[str, Any]]:
    out = []
    for item in job.outputs.outputs():
        entry: dict[str, Any] = {"path": item["path"]}
        entry.update(
            _project_hash(job.outputs.root, os.path.join(job.outputs.root, str(item["path"])))
        )
        out.append(entry)
    return out


def _job_part(job: Job, state: str, reason: str | None) -> dict[str, Any]:
    row = job.row
    return {
        "id": job.id,
        "name": row.name if row else None,
        "user": row.owner if row else None,
        "state": str(state),
        "reason": reason,
        "location": row.location if row else None,
        "project": row.project if row else None,
        "workdir": job.workdir,
        "project_dir": job.outputs.root,
        "warnings": list(job.warnings),
    }


def request_of(job: Job) -> dict[str, Any]:
    """The POST /v1/jobs body that queues the same steps again (what reproduce sends)."""
    row = job.row
    if row is None:
        return {}
    body: dict[str, Any] = {
        "location": row.location,
        "project": row.project,
        "priority": row.priority,
    }
    if row.name:
        body["name"] = row.name
    root = os.path.realpath(job.outputs.root)
    if os.path.realpath(job.workdir) != root and len(row.steps) == 1:
        step = row.steps[0]  # the rad shortcut with its rif in a subfolder
        rif = os.path.relpath(os.path.join(job.workdir, step["args"][-1]), root)
        body["rad"] = {"rif": rif, "options": list(step["args"][:-1])}
        return body
    body["steps"] = [_request_step(s) for s in row.steps]
    return body


def _request_step(step: StepSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"stdin": step.get("stdin"), "stdout": step.get("stdout")}
    if "sh" in step:
        out["sh"] = step["sh"]
    elif "script" in step:
        out.update(script=step["script"], args=list(step["args"][1:]))
    else:
        out.update(program=step["program"], args=list(step["args"]))
    return out


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The cpu's model name (/proc/cpuinfo), else platform's processor name (read once:
    a warm procwrap writes many receipts)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("model name", "Model", "cpu model"):
                    return value.strip()
    return platform.processor() or platform.machine()


def host_info() -> dict[str, Any]:
    return {
        "name": hostname(),
        "node": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
    }


def _radiance_part(job: Job, binaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Radiance's version line of each bin folder a binary of the job came from."""
    out: dict[str, Any] = {}
    for record in binaries.values():
        if "radiance_version" in record:
            out[os.path.dirname(record["path"])] = record["radiance_version"]
    versions = sorted(set(out.values()))
    return {"version": versions[0] if len(versions) == 1 else versions, "by_folder": out}


def _binary_record(job: Job, cache: HashCache, program: str, resolved: str) -> dict[str, Any]:
    """sha256 and size of a binary (and Radiance's version for its folder), cached on disk."""
    entry: dict[str, Any] = {"program": os.path.basename(program), "path": resolved}
    try:
        st = os.stat(resolved)
    except OSError as exc:
        entry["error"] = f"not found: {exc.strerror or exc}"
        return entry
    key = f"{CACHE_VERSION}|{resolved}|{st.st_size}|{st.st_mtime_ns}"
    cached = cache.get(key)
    if cached is None:
        cached = _hash(resolved)
        folder = os.path.dirname(resolved)
        if os.path.isfile(os.path.join(folder, "rpict")):
            cached["radiance_version"] = _first_line(
                _run([os.path.join(folder, "rpict"), "-version"], job.env)
            )
        if os.path.basename(resolved) in rc.SAMPLING_PROGRAMS:
            defaults = rc.option_defaults(_run([resolved, "-defaults"], job.env))
            if defaults:
                cached["defaults"] = defaults
        cache.put(key, cached)
    entry.update(cached)
    return entry


def _run(argv: list[str], env: dict[str, str]) -> str:
    """A Radiance program's answer (stdout, else stderr), '' when it cannot run."""
    import subprocess  # only when not cached: once per binary

    try:
        out = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            stdin=subprocess.DEVNULL,
            env={"PATH": env.get("PATH", "/usr/bin:/bin"), "RAYPATH": env.get("RAYPATH", ".")},
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout or out.stderr


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else "unknown"


class HashCache:
    """``<jobs folder>/.hashes.json``: sha256 of binaries and large inputs by file identity.

    A binary's key is its real path, size and mtime; a large input's (at least
    :data:`CACHED_INPUT_BYTES`) adds inode and ctime, which no one can set back:
    a shim's thousand rtrace calls on one big octree hash it once. Read at the
    first use, written once when the job ends (:meth:`save`); of two jobs ending
    at once the last one's entries stay, which only costs a hash later.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        self.dirty = False
        if path is not None:
            with contextlib.suppress(OSError, ValueError):
                loaded = json.loads(path.read_text())
                if isinstance(loaded, dict):
                    self.data = loaded

    def get(self, key: str) -> dict[str, Any] | None:
        value = self.data.get(key)
        return dict(value) if isinstance(value, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        if "error" not in value:
            self.data[key] = value
            self.dirty = True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        for key in list(self.data)[: max(0, len(self.data) - CACHE_ENTRIES)]:
            del self.data[key]  # the oldest first (insertion order)
        write_atomic(self.path, self.data)


def write_atomic(path: Path, document: dict[str, Any]) -> None:
    """JSON written to a temporary file beside ``path``, then renamed over it.

    Readers see the old file or the whole new one, never a part. No fsync: a
    receipt lost to a power cut is not worth a disk flush in every job.
    """
    # (not tempfile: it pulls shutil into the fork server, which imports this module)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{time.monotonic_ns()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(document, fh, indent=1, sort_keys=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_safely(job: Job, state: str, reason: str | None) -> None:
    """Write the job's receipt; a failure is a job warning and a log line, never more."""
    receipt: Receipt = job.receipt
    for error in receipt.errors:
        job.warn(f"receipt incomplete: {error}")
    if job.job_dir is None:
        return
    path = job.job_dir / rc.RECEIPT_FILE
    try:
        document = receipt.document(job, state, reason)
        document["previous_runs"] = _previous_runs(path)
        write_atomic(path, document)
    except Exception as exc:  # noqa: BLE001 - the job's result stands without its receipt
        job.warn(f"receipt not written: {exc}")
    with contextlib.suppress(Exception):  # a cache not saved only costs a hash next time
        receipt.cache(job).save()


def _previous_runs(path: Path) -> list[dict[str, Any]]:
    """The earlier runs of a job run again (resumed after an interruption): their receipts.

    Each keeps its steps' seed seconds and its inputs as that run read them; the
    receipt of the run that finished the job is the one on top.
    """
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(earlier, dict):
        return []
    runs = earlier.pop("previous_runs", None)
    return [*(runs if isinstance(runs, list) else []), earlier]
