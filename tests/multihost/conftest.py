"""Every multi-host test needs network namespaces: skipped, with the reason, where they
cannot be made (not root, no iproute2, a container that forbids them)."""

from __future__ import annotations

import pytest

from tests.multihost.netns import unavailable_reason


def pytest_collection_modifyitems(config, items):
    reason = None
    for item in items:
        if "tests/multihost/" in item.nodeid.replace("\\", "/"):
            reason = reason or unavailable_reason() or ""
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
