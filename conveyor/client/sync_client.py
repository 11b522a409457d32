"""The blocking client SDK: the async client driven by an event loop on a private thread, so
one Client may be shared by several threads and stream while others generate.

    with Client() as client:
        print(client.generate("Name three rivers.", max_tokens=64).text)
        for delta in client.stream("Tell me a story."):
            print(delta.text, end="", flush=True)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

from conveyor.client.async_client import DEFAULT_ADDRESS, AsyncClient, AsyncStream
from conveyor.client.types import GenerationResult, Health, StreamDelta


class Client:
    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float | None = None,
                 connect_timeout: float = 10.0, api_key: str | None = None):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="conveyor-client",
                                        daemon=True)
        self._thread.start()
        self._async = AsyncClient(address, timeout=timeout, connect_timeout=connect_timeout,
                                  api_key=api_key)

    @property
    def address(self) -> str:
        return self._async.address

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                 **kwargs: Any) -> GenerationResult:
        """See AsyncClient.generate."""
        return self._run(self._async.generate(prompt, timeout=timeout, **kwargs))

    def stream(self, prompt: str | None = None, *, timeout: float | None = None,
               **kwargs: Any) -> "Stream":
        """See AsyncClient.stream; iterate the returned Stream for StreamDelta items."""
        return Stream(self, self._async.stream(prompt, timeout=timeout, **kwargs))

    def health(self, timeout: float = 10.0) -> Health:
        return self._run(self._async.health(timeout))

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        return self._run(self._async.stats(timeout))

    def wait_ready(self, timeout: float = 300.0) -> Health:
        return self._run(self._async.wait_ready(timeout))

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()


class Stream:
    """A blocking iterator over one streaming generation. `result` is set once it ends;
    `cancel()` (or leaving a `with` block early) cancels the request on the server."""

    def __init__(self, client: Client, inner: AsyncStream):
        self._client = client
        self._inner = inner

    @property
    def result(self) -> GenerationResult | None:
        return self._inner.result

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.result is None:
            self.cancel()

    def __iter__(self) -> Iterator[StreamDelta]:
        while True:
            try:
                yield self._client._run(self._inner.__anext__())
            except StopAsyncIteration:
                return

    def cancel(self) -> None:
        self._client._run(self._inner.cancel())
