"""Admission: prepares requests off the event loop and hands them on in arrival order.

Tokenizing (with the chat template) is the ingress's one slow step, about a microsecond per
byte of prompt; on the event loop it stalls every other client's stream for as long. So
requests wait in one queue and are prepared one at a time in a worker thread while the loop
goes on streaming: the fast tokenizers release the GIL while they encode, and the chat template
(Python) gives it up every switch interval. The tokenizer is shared with the loop's incremental
detokenizers safely: encoding and decoding only read it (no padding or truncation is ever set,
which is the one thing that would change it).

One queue and one worker keep submission in arrival order, which the controller's waiting
queues (and FCFS-style policies) take for arrival order. An item closed while it waits or is
being prepared (its request cancelled, or its client gone) is dropped when its turn comes or
when its preparation ends: it was never submitted, so there is nothing else to undo.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, Protocol, TypeVar


class Closable(Protocol):
    closed: bool


T = TypeVar("T", bound=Closable)
R = TypeVar("R")


class Admission(Generic[T, R]):
    """`prepare(item)` runs in the worker thread; then, on the loop, `admit(item, result)`, or
    `refuse(item, error)` when prepare or admit raised. Neither is called for a closed item."""

    def __init__(self, prepare: Callable[[T], R], admit: Callable[[T, R], None],
                 refuse: Callable[[T, Exception], None]):
        self._prepare, self._admit, self._refuse = prepare, admit, refuse
        self._queue: asyncio.Queue[T] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="admission")

    def put(self, item: T) -> None:
        self._queue.put_nowait(item)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                item = await self._queue.get()
                if item.closed:
                    continue
                try:
                    result = await loop.run_in_executor(self._executor, self._prepare, item)
                    if not item.closed:
                        self._admit(item, result)
                except Exception as e:  # one request's failure is that request's alone
                    if not item.closed:
                        self._refuse(item, e)
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)
