"""``rayfront demo``: the example project rendered end to end through a real rayserver.

It builds a throw-away installation (hosts file for this machine with a
location covering a copy of the example project, which ships as package data
in ``rayserver/client/demo_project``, ``conf/demo`` in a checkout; settings
binding 127.0.0.1 on a free port), starts ``python -m rayserver -f`` in a session of its own, waits
until ``GET /v1/info`` answers, renders ``demo.rif`` with the same code as
``rayfront run``, tone-maps the picture (pcond | ra_ppm, then PNG in pure
Python) and always stops the server: SIGTERM to its process group, SIGKILL
after a grace period, and waits for it, also on Ctrl-C or an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rayserver.client.connection import Client, ClientError, Target
from rayserver.common.paths import HOME_ENV, HOSTNAME_ENV, Layout, hostname

# Package data, so a regular install (pip install ., pipx, a wheel) has it too;
# conf/demo in a checkout is a symlink to this folder.
DEMO_SOURCE = Path(__file__).resolve().parent / "demo_project"
RIF = "demo.rif"
PICTURE = "demo_room.hdr"
START_TIMEOUT = 30.0
STOP_GRACE = 10.0
# Files a previous `rad demo.rif` in the checkout may have left behind.
_GENERATED = ("*.oct", "*.amb", "*.hdr", "*.unf", "*.ppm", "*.png", "*.log")


class DemoError(ClientError):
    """The demo failed; the message says at which step and carries the server's log tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_source() -> Path:
    if not (DEMO_SOURCE / RIF).is_file():
        raise DemoError(
            f"the example project is missing: no {DEMO_SOURCE / RIF}; it ships with the "
            "rayserver package (rayserver/client/demo_project): reinstall rayserver"
        )
    return DEMO_SOURCE


def make_home(home: Path, host: str) -> tuple[Layout, Path, int]:
    """Write a fresh installation at ``home``; returns (layout, project dir, port)."""
    if home.exists() and any(home.iterdir()):
        raise DemoError(
            f"--home {home} is not empty; give a new or empty directory "
            "(the demo writes its own hosts file and settings there)"
        )
    layout = Layout(home.absolute(), host)
    layout.config_dir.mkdir(parents=True, exist_ok=True)
    projects = layout.home / "projects"
    project = projects / "demo"
    shutil.copytree(demo_source(), project, ignore=shutil.ignore_patterns(*_GENERATED))
    port = free_port()
    layout.hosts_file.write_text(
        "# written by `rayfront demo`: this machine serves 2 simulations at once\n"
        f'{host} 2 projects="{projects}"\n',
        encoding="utf-8",
    )
    layout.settings_file.write_text(
        f'# written by `rayfront demo`\nbind = "127.0.0.1"\nport = {port}\n', encoding="utf-8"
    )
    return layout, project, port


def log_tail(layout: Layout, extra: Path | None = None, lines: int = 25) -> str:
    """The last lines of the server's log file and of its terminal output."""
    parts = []
    for path in (layout.log_file, extra):
        if path is None or not path.exists():
            continue
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        if text:
            parts.append(f"--- {path} (last {len(text)} lines) ---\n" + "\n".join(text))
    return "\n".join(parts) or "(the server wrote no log)"


@contextlib.contextmanager
def running_server(layout: Layout, output: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m rayserver -f`` for ``layout``; stopped and reaped whatever happens."""
    env = dict(os.environ)
    env[HOME_ENV] = str(layout.home)
    env[HOSTNAME_ENV] = layout.host
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("RAYFRONT_TOKEN", None)  # the demo's server makes its own token
    with open(output, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rayserver", "-f"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(layout.home),
            start_new_session=True,
        )
    # SIGTERM to rayfront itself (a CI timeout, `kill`) must stop the server too.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield proc
    finally:
        stop_server(proc)
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(_signo: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def stop_server(proc: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> None:
    """SIGTERM to the server's process group, SIGKILL after ``grace``; always reaped."""
    # Ctrl-C pressed again while we wait must not leave the server behind.
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        else:
            # The leader is gone; kill anything left in its group (a worker, say).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    finally:
        signal.signal(signal.SIGINT, old_int)


def wait_until_answering(
    client: Client,
    proc: subprocess.Popen[bytes],
    layout: Layout,
    output: Path,
    timeout: float = START_TIMEOUT,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(
                f"rayserver exited with status {proc.returncode} while starting\n"
                + log_tail(layout, output)
            )
        try:
            return client.info(timeout=1.0)
        except ClientError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise DemoError(
        f"rayserver did not answer GET /v1/info within {timeout:.0f} s ({last})\n"
        + log_tail(layout, output)
    )


def tone_map(picture: Path, png: Path) -> None:
    """Radiance's pcond (human response) | ra_ppm, then PPM to PNG in pure Python."""
    from rayserver.common.png import ppm_to_png
    from rayserver.common.radiance import bin_dir, simulation_env
    from rayserver.common.settings import Settings

    settings = Settings()
    binaries = bin_dir(settings)
    env = simulation_env(settings)
    pcond = subprocess.run(
        [str(binaries / "pcond"), "-h", str(picture)],
        capture_output=True,
        env=env,
        check=False,
        timeout=60,
    )
    if pcond.returncode != 0:
        raise DemoError(
            f"pcond failed on {picture} (exit {pcond.returncode}): "
            f"{pcond.stderr.decode(errors='replace').strip()}"
        )
    ppm = subprocess.run(
        [str(binaries / "ra_ppm")],
        input=pcond.stdout,
        capture_output=True,
        env=env,
        check=False,
        timeout=60,
    )
    if ppm.returncode != 0:
        raise DemoError(
            f"ra_ppm failed (exit {ppm.returncode}): {ppm.stderr.decode(errors='replace').strip()}"
        )
    png.write_bytes(ppm_to_png(ppm.stdout))


def run_demo(home: Path | None, out: Path, json_mode: bool = False) -> int:
    """The whole demo; returns the exit code (raises ClientError with a clear message)."""
    started = time.monotonic()
    host = hostname()
    created = home is None
    home_dir = Path(tempfile.mkdtemp(prefix="rayfront-demo-")) if created else Path(home)
    out = out.absolute()
    ok = False
    try:
        layout, project, port = make_home(home_dir, host)
        say = (lambda _m: None) if json_mode else (lambda m: print(m, file=sys.stderr))
        say(f"rayfront demo: home {layout.home}, rayserver on 127.0.0.1:{port}")
        job = _render_on_demo_server(layout, host, port, json_mode, say, started)
        picture = project / PICTURE
        if not picture.is_file():
            raise DemoError(f"the job finished but wrote no {picture}")
        out.mkdir(parents=True, exist_ok=True)
        hdr = out / PICTURE
        shutil.copyfile(picture, hdr)
        png = hdr.with_suffix(".png")
        tone_map(hdr, png)
        total = time.monotonic() - started
        if json_mode:
            json.dump(
                {"picture": str(hdr), "png": str(png), "job": job, "seconds": round(total, 2)},
                sys.stdout,
                indent=2,
            )
            sys.stdout.write("\n")
        else:
            print(f"picture: {hdr}")
            print(f"png:     {png}")
            print(f"demo done in {total:.1f} s")
        ok = True
        return 0
    finally:
        if created and ok:
            shutil.rmtree(home_dir, ignore_errors=True)
        elif created:
            print(f"rayfront demo: kept {home_dir} for a look at what went wrong", file=sys.stderr)


def _render_on_demo_server(
    layout: Layout,
    host: str,
    port: int,
    json_mode: bool,
    say: Callable[[str], None],
    started: float,
) -> dict[str, Any]:
    """Start the demo's rayserver, render the example through it, stop it; the final job."""
    output = layout.home / "rayserver.out"
    with running_server(layout, output) as proc:
        target = Target(host, "127.0.0.1", port, None)
        info = wait_until_answering(Client(target, None, timeout=5), proc, layout, output)
        say(
            f"rayfront demo: rayserver {info.get('version', '?')} (pid {info.get('pid')}) "
            f"answers after {time.monotonic() - started:.1f} s"
        )
        from rayserver.common.credentials import read_client_token
        from rayserver.common.settings import load_settings

        token = read_client_token(layout, load_settings(layout.settings_file))
        client = Client(target, token)
        job_request = {
            "location": "projects",
            "project": "demo",
            "name": "rayfront demo",
            "priority": 0,
            "rad": {"rif": RIF, "options": []},
        }
        try:
            code, job = _render(client, job_request, json_mode)
        except ClientError as exc:
            raise DemoError(f"{exc}\n{log_tail(layout, output)}") from exc
        if code != 0:
            raise DemoError(
                f"the demo render failed (job {job.get('id')} {job.get('state')}, "
                f"exit status {job.get('exit_status')})\n"
                + log_tail(layout, output)
                + "\n--- job log ---\n"
                + client.log(int(job["id"])).decode(errors="replace")[-3000:],
                exit_code=code,
            )
    return job


def _render(
    client: Client, job_request: dict[str, Any], json_mode: bool
) -> tuple[int, dict[str, Any]]:
    from rayserver.client.runjob import run_and_follow

    # The summary goes to stderr so stdout carries only the paths (or the JSON).
    with contextlib.redirect_stdout(sys.stderr):
        # Output names stay project-relative: the temporary home is removed afterwards.
        return run_and_follow(client, job_request, None, json_mode=False, quiet=json_mode)
