"""Switching to another user and group, for good.

Order matters: supplementary groups and the group first (once the user is
switched we no longer have the right to change groups), then the user, then
a check that the way back is closed. Names or numbers are accepted; the
error messages are the manual's.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from dataclasses import dataclass

from supervisor.util import announce

log = logging.getLogger("supervisor.identity")


class IdentityError(Exception):
    """A user or group that does not exist or cannot be assumed."""


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class Group:
    name: str
    gid: int


def resolve_user(spec: str) -> User:
    """A user by name or UID; raises IdentityError with the manual's wording."""
    if spec.isascii() and spec.isdigit():
        try:
            pw = pwd.getpwuid(int(spec))
        except (KeyError, OverflowError, ValueError):
            raise IdentityError(f'User ID "{spec}" not found.') from None
    else:
        try:
            pw = pwd.getpwnam(spec)
        except (KeyError, ValueError):
            raise IdentityError(f'User name "{spec}" not found.') from None
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid)


def resolve_group(spec: str) -> Group:
    """A group by name or GID; raises IdentityError with the manual's wording."""
    if spec.isascii() and spec.isdigit():
        try:
            gr = grp.getgrgid(int(spec))
        except (KeyError, OverflowError, ValueError):
            raise IdentityError(f'group ID "{spec}" not found.') from None
    else:
        try:
            gr = grp.getgrnam(spec)
        except (KeyError, ValueError):
            raise IdentityError(f'group name "{spec}" not found.') from None
    return Group(gr.gr_name, gr.gr_gid)


def switch_identity(user: User | None, group: Group | None, *, name: str = "Server") -> None:
    """Become ``user`` in ``group`` (either may be None) irrevocably, then announce it.

    With only a user, the group is that user's primary group. Raises
    IdentityError (the manual's "Unable to run as ..." messages) when we lack
    the privilege, or when the way back turns out to be open.
    """
    if user is None and group is None:
        return
    gid = group.gid if group is not None else user.gid  # type: ignore[union-attr]
    group_label = group.name if group is not None else _group_name(gid)
    try:
        if os.geteuid() == 0:
            if user is not None:
                os.initgroups(user.name, gid)
            else:
                os.setgroups([gid])
        elif gid not in (os.getgid(), os.getegid()):
            # An unprivileged process can only "switch" to the group it already has.
            raise PermissionError
        os.setresgid(gid, gid, gid)
    except PermissionError:
        if group is None and user is not None:
            # Only -u was given: the group is implied, so it is the user we cannot become.
            raise IdentityError(f'Unable to run as user "{user.name}" ({user.uid}).') from None
        raise IdentityError(f'Unable to run as group "{group_label}" ({gid}).') from None
    if user is not None:
        try:
            os.setresuid(user.uid, user.uid, user.uid)
        except PermissionError:
            raise IdentityError(f'Unable to run as user "{user.name}" ({user.uid}).') from None
    _verify_no_way_back(user, gid)
    if user is not None:
        announce(log, f'{name} running as user "{user.name}" ({user.uid}).')
    if group is not None:
        announce(log, f'{name} running as group "{group.name}" ({group.gid}).')


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _verify_no_way_back(user: User | None, gid: int) -> None:
    """After dropping root, regaining it must fail; otherwise refuse to go on."""
    if user is None or user.uid == 0:
        return
    for attempt, target in (("setuid", 0), ("setgid", 0)):
        if attempt == "setgid" and gid == 0:
            continue
        try:
            getattr(os, attempt)(target)
        except PermissionError:
            continue
        raise IdentityError(
            f"after switching to user {user.name!r} the process could still {attempt}({target}); "
            "refusing to run with a way back to root"
        )
    if os.getresuid() != (user.uid,) * 3 or os.getresgid() != (gid,) * 3:
        raise IdentityError(
            f"identity switch incomplete: uids {os.getresuid()}, gids {os.getresgid()}"
        )
