"""Opening a job's files confined to its project directory (O_NOFOLLOW, component by component)."""

from __future__ import annotations

import errno
import os
import stat


class ConfinementError(Exception):
    """A stdin/stdout path that would leave the project directory (or is no plain file)."""


def open_confined(workdir: str, rel: str, *, write: bool, append: bool = False) -> int:
    """Open ``rel`` inside ``workdir`` without following any symlink; returns an fd.

    Raises ConfinementError with a message naming the path and the reason.
    Writing truncates like the shell's ``>`` (``append``: appends like ``>>``),
    but refuses a file with other hard links (one could point outside the
    project) and anything that is not a regular file.
    """
    parts = _parts(rel)
    dir_fd = _open_folder(workdir, parts[:-1], rel)
    try:
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        flags |= (os.O_WRONLY | os.O_CREAT) if write else os.O_RDONLY
        if write and append:
            flags |= os.O_APPEND
        try:
            fd = os.open(parts[-1], flags, 0o666, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfinementError(
                    f"{rel!r} is a symbolic link; refusing to follow it out of the project"
                ) from exc
            if exc.errno == errno.ENXIO:
                raise ConfinementError(f"{rel!r} is a FIFO or socket, not a file") from exc
            raise ConfinementError(f"{rel!r}: cannot open: {exc.strerror}") from exc
    finally:
        os.close(dir_fd)
    _check_opened(fd, rel, write=write, truncate=not append)
    return fd


def open_parent_confined(workdir: str, rel: str) -> tuple[int, str]:
    """(descriptor of the folder that holds ``rel``, its last name), opened as open_confined.

    The caller closes the descriptor. Raises ConfinementError like open_confined.
    """
    parts = _parts(rel)
    return _open_folder(workdir, parts[:-1], rel), parts[-1]


def _parts(rel: str) -> list[str]:
    """The components of a relative path inside the project (ConfinementError if it is none)."""
    if not rel or rel.startswith("/") or "\x00" in rel:
        raise ConfinementError(f"{rel!r}: expected a relative path inside the project")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ConfinementError(f"{rel!r}: '..' or an empty path leaves the project directory")
    return parts


def _open_folder(workdir: str, folders: list[str], rel: str) -> int:
    """An fd of ``workdir/folders...``, each component opened without following a link."""
    dir_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for comp in folders:
        try:
            nxt = os.open(
                comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
            )
        except OSError as exc:
            os.close(dir_fd)
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ConfinementError(
                    f"{rel!r}: folder {comp!r} is a symbolic link or not a folder; "
                    "refusing to follow it out of the project"
                ) from exc
            raise ConfinementError(f"{rel!r}: cannot open folder {comp!r}: {exc.strerror}") from exc
        os.close(dir_fd)
        dir_fd = nxt
    return dir_fd


def _check_opened(fd: int, rel: str, *, write: bool, truncate: bool = True) -> None:
    """Refuse (closing ``fd``) what is no regular file or, to write, has other hard links."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfinementError(f"{rel!r} is not a regular file")
        if write and st.st_nlink > 1:
            raise ConfinementError(
                f"{rel!r} has {st.st_nlink} hard links; refusing to overwrite a file that may "
                "also live outside the project"
            )
        os.set_blocking(fd, True)
        if write and truncate:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
