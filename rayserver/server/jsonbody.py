"""Request bodies parsed as strict JSON (RFC 8259): every malformed body is a 400 naming the problem.

Python's ``json`` module accepts more than JSON and fails in ways that are
not a clean ``JSONDecodeError``: ``NaN`` and ``Infinity``, numbers beyond
a float (``1e999`` becomes ``inf``), integers of more than 4300 digits
(``ValueError`` from the int conversion limit), nesting deeper than the
interpreter's recursion limit (``RecursionError``), UTF-16 and UTF-32 bodies
(detected from the bytes), unpaired surrogate escapes (``"\\ud800"``, a
string no file name, log line or database row can hold) and duplicate keys
(the last one silently wins, so two readers of the same body could disagree).
:func:`parse` refuses each of these with :class:`JobSpecError` 400, so
nothing malformed reaches the handlers and no traceback reaches the log.
"""

from __future__ import annotations

import json
import math
from typing import Any

from rayserver.server.jobspec import JobSpecError

# Lists and objects inside one another: a job needs 4 (job, steps, step, args).
MAX_DEPTH = 32
# Digits of a whole number: 2**128 has 39; no field of the API needs more than 19.
MAX_INT_DIGITS = 40


class _Refused(Exception):
    """Raised from inside the parser's hooks; becomes a 400."""


def parse(raw: bytes, expected: str) -> Any:
    """The JSON value in ``raw``; ``expected`` ("a JSON job object") ends every error message."""
    if not raw:
        raise JobSpecError(400, f"empty request body; expected {expected}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobSpecError(
            400,
            f"request body is not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start} ({exc.reason}); expected {expected} in UTF-8",
        ) from None
    if text.startswith("\ufeff"):
        raise JobSpecError(
            400, f"request body starts with a byte order mark; expected {expected} without one"
        )
    try:
        data = json.loads(
            text,
            parse_int=_whole,
            parse_float=_real,
            parse_constant=_constant,
            object_pairs_hook=_object,
        )
    except json.JSONDecodeError as exc:
        raise JobSpecError(
            400,
            f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column "
            f"{exc.colno}; expected {expected}",
        ) from None
    except _Refused as exc:
        raise JobSpecError(400, f"request body: {exc}; expected {expected}") from None
    except RecursionError:
        data = None
        _too_deep(expected)
    _check_tree(data, expected)
    return data


def _too_deep(expected: str) -> None:
    raise JobSpecError(
        400,
        f"request body is nested too deeply: at most {MAX_DEPTH} levels of lists and "
        f"objects are accepted; expected {expected}",
    )


def _whole(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _Refused(
            f"a whole number of {digits} digits ({text[:12]}...); at most {MAX_INT_DIGITS} "
            "digits are accepted"
        )
    return int(text)


def _real(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 24 else text[:21] + "..."
        raise _Refused(f"the number {shown} is too large (beyond a 64-bit float)")
    return value


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON (JSON has no NaN or Infinity); send a finite number")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise _Refused(f"duplicate key {key!r} in an object; each key may appear once")
            seen.add(key)
    return obj


def _check_tree(data: Any, expected: str) -> None:
    """Nesting depth and unpaired surrogates, walked without recursion."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, expected)
        elif isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                _too_deep(expected)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key, expected)
                stack.append((item, depth + 1))


def _check_text(text: str, expected: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise JobSpecError(
            400,
            f"request body: a string holds an unpaired surrogate escape "
            f"(\\u{ord(text[exc.start]):04x}), which is not a character; expected {expected} "
            "of valid Unicode text",
        ) from None
