"""Where Radiance is: the bin directory, RAYPATH and the environment for simulations.

By default the binaries and library files of the ``pyradiance`` wheel are
used; the settings ``radiance_bin`` and ``raypath`` point to a system
Radiance instead. RAYPATH always starts with ``.`` so project ``.cal`` files
are found, and ``__library__`` directories of the hosts file are added.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from rayserver.common.settings import Settings


@functools.lru_cache(maxsize=1)  # an import-system search: ~0.1 ms, on every submit
def _pyradiance_root() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("pyradiance")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def bin_dir(settings: Settings) -> Path:
    """The directory whose programs jobs may run."""
    if settings.radiance_bin:
        return Path(settings.radiance_bin).expanduser().resolve()
    root = _pyradiance_root()
    if root is None:
        raise FileNotFoundError(
            "no Radiance found: install pyradiance or set radiance_bin in rayserver.toml"
        )
    return (root / "bin").resolve()


def lib_dirs(settings: Settings) -> list[str]:
    """The library directories of RAYPATH (without '.')."""
    if settings.raypath:
        return [str(Path(p).expanduser()) for p in settings.raypath]
    root = _pyradiance_root()
    return [str(root / "lib")] if root else []


def raypath(settings: Settings, extra: list[str] | None = None) -> str:
    """RAYPATH for a simulation: '.', the __library__ dirs, then Radiance's lib."""
    parts = ["."] + [str(p) for p in (extra or [])] + lib_dirs(settings)
    return os.pathsep.join(parts)


def simulation_env(
    settings: Settings, extra_libs: list[str] | None = None, base: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment a Radiance program runs with (rad needs its siblings on PATH)."""
    env = dict(os.environ if base is None else base)
    env["RAYPATH"] = raypath(settings, extra_libs)
    env["PATH"] = os.pathsep.join([str(bin_dir(settings)), env.get("PATH", "/usr/bin:/bin")])
    return env


def program_path(settings: Settings, program: str) -> Path | None:
    """The absolute path of a Radiance program by name, or None if it is not one."""
    if not program or "/" in program or program in (".", "..") or "\x00" in program:
        return None
    candidate = bin_dir(settings) / program
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    return None


@functools.lru_cache(maxsize=4)
def version(bin_directory: str, ray_path: str = "") -> str:
    """Radiance's version line, e.g. 'RADIANCE 6.0a' (cached per bin directory)."""
    env = dict(os.environ)
    if ray_path:
        env["RAYPATH"] = ray_path
    try:
        out = subprocess.run(
            [str(Path(bin_directory) / "rpict"), "-version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            env=env,
        )
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"
