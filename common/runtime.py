"""Process entry helper: uvloop, signal handling and clean shutdown for asyncio services."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

from common.log import get_logger


def run_service(main: Callable[[], Awaitable[None]]) -> None:
    """Runs `main()` on uvloop (when installed). SIGINT and SIGTERM cancel it, so the service's
    `finally` blocks close sockets and the log says it stopped."""
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

    runner(_wrapper())
    get_logger().info("stopped")
