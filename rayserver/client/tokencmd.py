"""``rayfront token new --user NAME``, ``token list`` and ``token revoke NAME``.

Named tokens live in ``<home>/config/tokens`` (see :mod:`rayserver.common.tokens`);
the command writes the file directly, like ``rayfront token new`` writes the
shared token, so it needs write access to ``<home>/config``. A running server
notices the change at its next request.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from rayserver.client.connection import EXIT_USAGE, ClientError
from rayserver.client.context import Context
from rayserver.common import tokens
from rayserver.common.tokens import SHARED_USER, TokensFileError


def named_token_command(
    ctx: Context, opts: argparse.Namespace, print_json: Callable[[Any], None]
) -> int:
    """The named-token actions; ``opts`` as parsed by rayfront's ``token`` sub-command."""
    path = ctx.layout.tokens_file
    try:
        if opts.action == "new":
            _usage(opts.name is None, "'token new' takes no user name word; use --user NAME")
            role = opts.role or "user"
            token = tokens.add(path, opts.user, role)
            if opts.json:
                print_json({"user": opts.user, "token": token})
            else:
                print(token)
                print(
                    f"(token of {opts.user}, role {role}, stored as its sha256 in {path}: "
                    "this is the only time it is shown; give it to the user for "
                    "RAYFRONT_TOKEN. Any earlier token of this user no longer works.)"
                )
            return 0
        _usage(
            opts.user is None and opts.role is None, f"'token {opts.action}' takes no --user/--role"
        )
        if opts.action == "list":
            _usage(opts.name is None, "'token list' takes no name")
            return _list(ctx, path, opts.json, print_json)
        _usage(opts.name is not None, "expected the user name: rayfront token revoke NAME")
        removed = tokens.revoke(path, opts.name)
    except TokensFileError as exc:
        raise ClientError(str(exc), exit_code=EXIT_USAGE) from exc
    if opts.json:
        print_json({"user": removed.user, "role": removed.role, "revoked": True})
    else:
        print(f"revoked the token of {removed.user} (role {removed.role}); it no longer works")
    return 0


def _usage(ok: bool, message: str) -> None:
    if not ok:
        raise ClientError(message, exit_code=EXIT_USAGE)


def _list(ctx: Context, path: Any, as_json: bool, print_json: Callable[[Any], None]) -> int:
    entries = tokens.load(path)
    shared = ctx.settings.token_path(ctx.layout.default_token_file)
    rows = []
    if shared is not None:
        try:
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(shared.stat().st_mtime))
        except OSError:
            created = None
        rows.append({"user": SHARED_USER, "role": "admin", "created": created, "shared": True})
    rows += [
        {"user": e.user, "role": e.role, "created": e.created, "shared": False}
        for e in sorted(entries.values(), key=lambda e: e.user)
    ]
    if as_json:
        print_json({"tokens": rows, "tokens_file": str(path)})
        return 0
    width = max(len(r["user"]) for r in rows) if rows else 4
    print(f"{'USER':<{width}}  ROLE   CREATED               TOKEN")
    for r in rows:
        where = "shared (" + str(shared) + ")" if r["shared"] else "named"
        print(f"{r['user']:<{width}}  {r['role']:<5}  {r['created'] or '-':<20}  {where}")
    return 0
