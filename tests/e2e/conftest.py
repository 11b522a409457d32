"""Fixtures that start real deployments and the transformers reference."""

from __future__ import annotations

import pytest

from conveyor.local_deployment import Deployment, start_deployment, stop_deployment


@pytest.fixture(scope="module")
def deployment(request) -> Deployment:
    """A 2-stage deployment of the default model for the module; a module may parametrize it
    indirectly with a dict of start_deployment arguments."""
    kwargs = getattr(request, "param", None) or {}
    dep = start_deployment(**kwargs)
    yield dep
    code = stop_deployment(dep)
    assert code == 0, f"deployment did not stop cleanly (exit {code}):\n{dep.log_tail()}"
