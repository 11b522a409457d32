"""What values the wire can carry, and where a message breaks those bounds.

msgpack holds integers in [-2**63, 2**64 - 1] and strings as UTF-8. A Python int outside that
range, or a str holding a surrogate code point (U+D800..U+DFFF: a "lone surrogate", e.g. from a
JSON "\\ud800" escape or a surrogateescape decode; UTF-8 has no encoding for it) cannot be
encoded, and msgspec then raises a bare OverflowError or UnicodeEncodeError that names no field.
`unencodable` finds the offending field so the sender gets an error it can act on. The
receiving side never sees such values: its decoder refuses invalid UTF-8.
"""

from __future__ import annotations

import re
from typing import Any

WIRE_INT_MIN = -2**63
WIRE_INT_MAX = 2**64 - 1
INT64_MIN = -2**63
INT64_MAX = 2**63 - 1
"""What the stages' tensors (torch.int64) hold: integers a stage computes with must fit."""

_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> int | None:
    """Index of the first surrogate code point in `text`, or None when it is valid text."""
    found = _SURROGATE.search(text)
    return None if found is None else found.start()


def surrogate_problem(name: str, text: str) -> str | None:
    """A readable refusal for a string with a lone surrogate, or None when it has none."""
    at = lone_surrogate(text)
    if at is None:
        return None
    return (f"{name} contains a lone surrogate U+{ord(text[at]):04X} at character {at}, which "
            f"is not valid Unicode text and cannot be encoded as UTF-8")


def unencodable(value: Any, path: str = "") -> str | None:
    """The first integer or string in a tree of builtins (msgspec.to_builtins of a message)
    that msgpack cannot carry, described with its path; None when everything fits."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if WIRE_INT_MIN <= value <= WIRE_INT_MAX:
            return None
        return (f"{path or 'value'} = {value} is outside the integers the wire carries "
                f"([-2**63, 2**64 - 1])")
    if isinstance(value, str):
        return surrogate_problem(path or "a string", value)
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            problem = unencodable(key, f"a key of {path or 'the message'}") or \
                unencodable(item, where)
            if problem:
                return problem
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            problem = unencodable(item, f"{path}[{i}]")
            if problem:
                return problem
    return None
