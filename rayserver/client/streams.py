"""``rayfront run`` like ssh: our standard input to the job, its standard output back to ours.

Two threads beside the log follower: :class:`Uploader` sends file
descriptor 0 as the chunked body of ``PUT /v1/jobs/<id>/stdin`` (the server
lets the program see the end of its input only when the whole body arrived),
:class:`Downloader` copies ``GET /v1/jobs/<id>/stdout`` to file descriptor 1
as it comes, byte for byte. Both move one :data:`CHUNK` at a time, so memory
stays constant for inputs and outputs of any size; a slow side holds the
other back through TCP.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import stat
import sys
import threading
from collections.abc import Iterator
from typing import Any

from rayserver.client.connection import Client, ClientError

CHUNK = 1 << 18


def stdin_has_data() -> bool:
    """True when our standard input should go to the program: not a terminal, not /dev/null."""
    try:
        if os.isatty(0):
            return False
        st = os.fstat(0)
    except OSError:
        return False  # closed
    if stat.S_ISCHR(st.st_mode):
        with contextlib.suppress(OSError):
            null = os.stat(os.devnull)
            if (st.st_rdev, st.st_ino) == (null.st_rdev, null.st_ino):
                return False
    return True


class _Transfer(threading.Thread):
    """One stream of one job; ``error`` is a message for the user when it failed."""

    def __init__(self, client: Client, job_id: int, name: str) -> None:
        super().__init__(daemon=True, name=name)
        self.client = client
        self.job_id = job_id
        self.bytes = 0
        self.error: str | None = None
        self.refused: ClientError | None = None  # the server's answer, when it refused
        self.closed_locally = False  # our stdout went away (e.g. `| head`)

    def run(self) -> None:
        try:
            self.transfer()
        except ClientError as exc:
            self.refused = exc
            self.error = str(exc)
        except BrokenPipeError:
            self.closed_locally = True
        except (OSError, http.client.HTTPException) as exc:
            self.error = f"{self.name} of job {self.job_id} broke: {exc}"

    def transfer(self) -> None:
        raise NotImplementedError


class Uploader(_Transfer):
    """Our fd 0 as the job's standard input."""

    def __init__(self, client: Client, job_id: int) -> None:
        super().__init__(client, job_id, "standard input")

    def _body(self) -> Iterator[bytes]:
        while chunk := os.read(0, CHUNK):
            self.bytes += len(chunk)
            yield chunk

    def transfer(self) -> None:
        conn, resp = self.client.open_stream(
            "PUT", f"/v1/jobs/{self.job_id}/stdin", body=self._body()
        )
        try:
            resp.read()
        finally:
            conn.close()


class Downloader(_Transfer):
    """The job's standard output to our fd 1."""

    def __init__(self, client: Client, job_id: int) -> None:
        super().__init__(client, job_id, "standard output")
        self.complete = False

    def transfer(self) -> None:
        conn, resp = self.client.open_stream("GET", f"/v1/jobs/{self.job_id}/stdout")
        try:
            while chunk := resp.read1(CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(1, view) :]
                self.bytes += len(chunk)
            # read1 raises IncompleteRead for a chunked answer cut short: here it was whole.
            self.complete = True
        finally:
            conn.close()

    def run(self) -> None:
        super().run()
        if self.error:
            # Nobody can read the job's output any more: end it rather than let it wait.
            with contextlib.suppress(ClientError):
                self.client.cancel(self.job_id)


class StreamedRun:
    """The streams of one ``rayfront run``: started after the submit, checked at the end."""

    def __init__(self, client: Client, job_id: int, *, stdin: bool, stdout: bool) -> None:
        self.up = Uploader(client, job_id) if stdin else None
        self.down = Downloader(client, job_id) if stdout else None

    def start(self) -> None:
        for t in (self.up, self.down):
            if t is not None:
                t.start()

    @property
    def output_closed(self) -> bool:
        return self.down is not None and self.down.closed_locally

    def finish(self, job: dict[str, Any]) -> list[str]:
        """After the job's end (``job``): wait for the output to be written; problems to tell."""
        problems = []
        if self.down is not None:
            self.down.join()
            if self.down.error:
                problems.append(self.down.error)
        if self.up is not None and not self.up.is_alive():
            # Still sending: the program ended without reading all its input (like head),
            # which is its own business; the job's state says whether it went well.
            refused = self.up.refused
            if self.up.error and not (refused and refused.status == 409):
                problems.append(self.up.error)
        return problems


def flush_stdout() -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
