"""The base of every configuration section (the deployment's config, the placement settings,
a cluster file's own tables): a msgspec struct that refuses unknown keys, so that a misspelled
setting is an error rather than a silent default; and the one way sections collect the checks
that single fields cannot express."""

from __future__ import annotations

import msgspec


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


def failed(checks: list[tuple[bool, str]]) -> list[str]:
    """The messages of the checks that did not hold."""
    return [message for ok, message in checks if not ok]
