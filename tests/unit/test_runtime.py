"""No long-lived task of a service dies unseen: the first to end stops the service with its
name and traceback in the log (common.runtime.until_one_ends), so the process exits and its
supervisor notices, instead of living on without, say, its scheduler."""

from __future__ import annotations

import asyncio

import pytest
import structlog

from common.runtime import ServiceTaskEnded, until_one_ends


async def _forever() -> None:
    await asyncio.Future()


async def _fails_soon() -> None:
    await asyncio.sleep(0.01)
    raise KeyError("lost block table")


async def test_the_first_task_to_fail_stops_the_wait_with_its_name_and_traceback():
    tasks = {"messages": asyncio.create_task(_forever()),
             "scheduler of instance 0": asyncio.create_task(_fails_soon())}
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(ServiceTaskEnded, match=r"scheduler of instance 0 failed: "
                                                   r"KeyError\('lost block table'\)"):
            await until_one_ends(tasks)
    assert not tasks["messages"].done()  # the caller stops the rest
    tasks["messages"].cancel()
    event = next(e for e in logs if e["event"] == "a service task failed")
    assert event["task"] == "scheduler of instance 0" and "_fails_soon" in event["traceback"]


async def test_a_task_that_returns_is_an_end_too():
    async def returns() -> None:
        await asyncio.sleep(0.01)

    other = asyncio.create_task(_forever())
    with pytest.raises(ServiceTaskEnded, match="keepalive ended"):
        await until_one_ends({"keepalive": asyncio.create_task(returns()), "other": other})
    other.cancel()
