"""Process entry helper: uvloop, signal handling and clean shutdown for asyncio services, and
the rule that no long-lived task of a service dies unseen."""

from __future__ import annotations

import asyncio
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import NoReturn

from common.log import get_logger


class StartupError(RuntimeError):
    """A service cannot start (an address to listen on is taken): said in one log line, and
    the process exits with status 1, without a traceback that would hide the reason."""


class ServiceTaskEnded(RuntimeError):
    """A long-lived task of a service failed or returned: the service stops, so its process
    exits and its supervisor sees it, instead of living on with a part that serves nothing."""


async def until_one_ends(tasks: dict[str, asyncio.Task]) -> NoReturn:
    """Waits on a service's long-lived tasks (none of which should ever end); the first that
    does is logged, with its traceback when it failed, and ends the wait as ServiceTaskEnded.
    The caller's `finally` stops the others (zmq_io.stop_tasks)."""
    done, _ = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
    task = next(iter(done))
    name = next(n for n, t in tasks.items() if t is task)
    error = None if task.cancelled() else task.exception()
    if error is not None:
        get_logger().error("a service task failed", task=name, error=repr(error),
                           traceback="".join(traceback.format_exception(error)))
        raise ServiceTaskEnded(f"{name} failed: {error!r}") from error
    get_logger().error("a service task ended", task=name)
    raise ServiceTaskEnded(f"{name} ended")


def run_service(main: Callable[[], Awaitable[None]]) -> None:
    """Runs `main()` on uvloop (when installed). SIGINT and SIGTERM cancel it, so the service's
    `finally` blocks close sockets and the log says it stopped. A StartupError is logged and
    ends the process with status 1."""
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # uvloop is optional on platforms without it
        runner = asyncio.run

    async def _wrapper() -> None:
        task = asyncio.ensure_future(main())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    try:
        runner(_wrapper())
    except StartupError as e:
        get_logger().error("cannot start", error=str(e))
        sys.exit(1)
    get_logger().info("stopped")
