"""The files a job created or changed in its project, found by a scan before and after each step.

Whatever writes them (a step's stdout file, ``-o`` patterns of rcontrib and
dctimestep, rad's pictures and octrees, a script's files), a file counts
when a scan after a step finds it new or changed since the scan before it:
another inode, size or modification time (``st_mtime_ns``). The scan is
``os.scandir`` over the project, regular files only, symbolic links never
followed, hidden rayfront folders (``.rayfront*``: split parts, probes)
skipped. A project with more than :data:`SCAN_LIMIT` files is not tracked
(the log says so): a step's stdout files are still recorded, by a stat.

Jobs running at once in one project see each other's files change: a file
that another job of the same folder names as its stdout is left to that
job; any other file written meanwhile by a neighbour (a script's, rad's) is
listed for both, as the scan cannot tell who wrote it.

Measured (bench/outputs.py): about 10 ms per scan of a 5,000-file project.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass, field

SCAN_LIMIT = 100_000  # files in the project; beyond, outputs are not tracked by scans
SKIP_PREFIX = ".rayfront"

Snapshot = dict[str, tuple[int, int, int]]  # relative path -> (inode, size, mtime_ns)


class TooManyFiles(Exception):
    """The project holds more than SCAN_LIMIT files."""


def _walk(root: str, rel: str, out: Snapshot, limit: int) -> None:
    try:
        it = os.scandir(os.path.join(root, rel) if rel else root)
    except OSError:
        return  # vanished or unreadable meanwhile: nothing of ours in it
    with it:
        for entry in it:
            if entry.name.startswith(SKIP_PREFIX):
                continue
            path = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    _walk(root, path, out, limit)
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
                if len(out) > limit:
                    raise TooManyFiles


def snapshot(root: str, limit: int = SCAN_LIMIT) -> Snapshot:
    """Every regular file below ``root`` (relative path -> inode, size, mtime)."""
    out: Snapshot = {}
    _walk(root, "", out, limit)
    return out


@dataclass
class OutputTracker:
    """The outputs of one job across its steps: :meth:`before` and :meth:`after` each step."""

    root: str
    limit: int = SCAN_LIMIT
    found: dict[str, int] = field(default_factory=dict)  # path -> size, in order found
    untracked: str | None = None  # why scans are off (too many files)
    _before: Snapshot | None = None

    def before(self) -> None:
        if self.untracked is not None:
            return
        try:
            self._before = snapshot(self.root, self.limit)
        except TooManyFiles:
            self.untracked = (
                f"the project has more than {self.limit} files: only the steps' "
                "stdout files are listed as outputs"
            )
            self._before = None

    def after(self, named: list[str], exclude: set[str] | frozenset[str] = frozenset()) -> None:
        """After a step: what changed, plus the files it named (its stdout file).

        ``exclude``: files that changed but belong to jobs that ran beside it.
        """
        if self._before is not None:
            try:
                now = snapshot(self.root, self.limit)
            except TooManyFiles:
                now = None
            if now is not None:
                before = self._before
                for path in sorted(p for p, sig in now.items() if before.get(p) != sig):
                    if path not in exclude:
                        self.found[path] = now[path][1]
                for path in [p for p in self.found if p not in now]:
                    del self.found[path]  # a later step removed it
        for path in named:
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(self.root, path), follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    self.found[path] = st.st_size
        self._before = None

    def outputs(self) -> list[dict[str, object]]:
        """The API's ``outputs``: [{path, size}], step by step, by path within a step."""
        return [{"path": path, "size": size} for path, size in self.found.items()]
