"""The asyncio client SDK: many concurrent requests over one ZeroMQ connection.

    async with AsyncClient("tcp://127.0.0.1:7600") as client:
        result = await client.generate("Name three rivers.", max_tokens=64)
        async with client.stream("Tell me a story.") as stream:
            async for delta in stream:
                print(delta.text, end="")
        print(stream.result.finish_reason)
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from common.config import DEFAULT_INGRESS_PORT
from common.wire import EncodeError, decode, encode
from common.zmq_io import make_context
from common.wire.client_messages import (DEFAULT_MAX_FRAME_BYTES, NO_REQUEST_ID, CancelRequest,
                                         ChatMessage, ErrorReply, Finished, GenerateRequest,
                                         HealthReply, HealthRequest, StatsReply, StatsRequest,
                                         TokenDelta)
from conveyor.client.errors import (ConnectionFailed, InvalidRequestError, ProtocolError,
                                    RequestTimeout, error_from_reply)
from conveyor.client.types import GenerationResult, Health, StreamDelta

DEFAULT_ADDRESS = f"tcp://127.0.0.1:{DEFAULT_INGRESS_PORT}"
HEARTBEAT_MS = 1000
"""ZMTP heartbeat interval to the ingress; 3 missed ones count as a lost connection."""


class _Replies(asyncio.Queue):
    """The replies to one call, as they come."""

    heard = False
    """The server has answered this call (so it read it)."""


class AsyncClient:
    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float | None = None,
                 connect_timeout: float = 10.0, api_key: str | None = None):
        """`timeout` bounds every request (None: no bound) unless a call sets its own;
        `connect_timeout` bounds the first contact with the ingress; `api_key` (default:
        CONVEYOR_API_KEY's first key) goes with every generation."""
        self.address = address
        env_keys = os.environ.get("CONVEYOR_API_KEY", "").split(",")
        self.api_key = api_key if api_key is not None else (env_keys[0].strip() or None)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        # A context of its own (make_context), not the process-wide Context.instance(): a
        # client lives inside someone else's process, beside other clients and sockets.
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._ids = itertools.count(1)
        self._queues: dict[int, _Replies] = {}
        self._reader: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._connected = False
        self._connecting: asyncio.Lock | None = None
        self._max_frame_bytes = DEFAULT_MAX_FRAME_BYTES
        """The ingress's frame limit, as its last health reply said (0: none)."""

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- requests -----------------------------------------------------------------------

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                       **kwargs: Any) -> GenerationResult:
        """Generates a completion and returns it whole. Keyword arguments: messages,
        prompt_token_ids, raw, and the sampling parameters (max_tokens, temperature, top_p,
        top_k, seed, stop, stop_token_ids, ignore_eos); unknown ones are sent as they are and
        the server refuses them with InvalidRequestError."""
        stream = self.stream(prompt, timeout=timeout, _deltas=False, **kwargs)
        async with stream:
            async for _ in stream:
                pass
        return stream.result

    def stream(self, prompt: str | None = None, *, timeout: float | None = None,
               _deltas: bool = True, **kwargs: Any) -> "AsyncStream":
        """Starts a generation and returns an async iterator of StreamDelta; `stream.result`
        holds the GenerationResult once it is exhausted. Leaving an `async with` block early
        cancels the request on the server."""
        req = _build_request(next(self._ids), prompt, kwargs, stream=_deltas,
                             api_key=self.api_key)
        return AsyncStream(self, req, self.timeout if timeout is None else timeout)

    async def health(self, timeout: float = 10.0) -> Health:
        reply = await self._simple(HealthRequest, HealthReply, timeout)
        self._max_frame_bytes = reply.max_frame_bytes
        return Health(reply.ready, reply.model, reply.stages, reply.instances, reply.policy,
                      reply.max_model_len, reply.detail, reply.max_frame_bytes)

    async def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        return (await self._simple(StatsRequest, StatsReply, timeout)).stats

    async def wait_ready(self, timeout: float = 300.0, poll_s: float = 0.5) -> Health:
        """Waits until every stage of the deployment has registered."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            health = await self.health()
            if health.ready:
                return health
            if asyncio.get_running_loop().time() > deadline:
                raise ConnectionFailed(f"deployment not ready after {timeout:g}s: "
                                       f"{health.detail}")
            await asyncio.sleep(poll_s)

    async def close(self) -> None:
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._reader = self._watcher = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None
        self._connected = False

    # ---- plumbing -----------------------------------------------------------------------

    async def _simple(self, request_cls, reply_cls, timeout: float):
        msg = request_cls(next(self._ids))
        queue = await self._open(msg, check_connection=False)
        try:
            reply = await asyncio.wait_for(queue.get(), timeout)
        except asyncio.TimeoutError:
            raise ConnectionFailed(f"no Conveyor ingress answered at {self.address} "
                                   f"within {timeout:g}s") from None
        finally:
            self._queues.pop(msg.id, None)
        if isinstance(reply, ConnectionFailed):
            raise reply
        if isinstance(reply, ErrorReply):
            raise error_from_reply(reply.code, reply.message)
        if not isinstance(reply, reply_cls):
            raise ProtocolError(f"expected {reply_cls.__name__}, got {type(reply).__name__}")
        return reply

    async def _open(self, msg, check_connection: bool = True) -> _Replies:
        """Registers a reply queue for `msg.id` and sends it."""
        try:
            frames = encode(msg)
        except EncodeError as e:
            # An integer beyond 64 bits or a lone surrogate cannot even be put on the wire, so
            # the server never sees it: refuse it here, as the server refuses what it can see.
            raise InvalidRequestError(str(e)) from None
        if self._sock is None:
            self._ctx = self._ctx or make_context()
            self._sock = self._ctx.socket(zmq.DEALER)
            self._sock.setsockopt(zmq.LINGER, 0)
            # A stable identity across reconnects keeps the server's view of our requests.
            self._sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
            # ZMTP heartbeats: an ingress whose host vanished without closing the connection
            # is noticed within seconds too, not only one whose process died.
            self._sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
            self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_MS)
            self._sock.connect(self.address)
            self._reader = asyncio.create_task(self._read_loop())
            self._watcher = asyncio.create_task(self._watch_connection(self._sock))
        if check_connection and not self._connected:
            await self._ensure_connected()  # (its health reply tells the frame limit)
        self._check_frame_size(msg, frames)
        queue = _Replies()
        self._queues[msg.id] = queue
        await self._sock.send_multipart(frames)
        return queue

    def _check_frame_size(self, msg, frames) -> None:
        """ZeroMQ at the ingress drops a frame over its limit together with this client's
        connection, failing every other request in flight on it: refuse such a request here
        instead, so that it fails alone."""
        size = max(len(frame) for frame in frames)
        if 0 < self._max_frame_bytes < size:
            raise InvalidRequestError(
                f"{type(msg).__name__} is {size} bytes on the wire; the ingress reads frames of "
                f"at most {self._max_frame_bytes} bytes (ingress.max_frame_bytes), so it was not "
                "sent")

    async def _ensure_connected(self) -> None:
        self._connecting = self._connecting or asyncio.Lock()
        async with self._connecting:
            if not self._connected:
                await self.health(self.connect_timeout)
                self._connected = True

    async def _watch_connection(self, sock: zmq.asyncio.Socket) -> None:
        """Whenever the connection to the ingress drops, every request in flight fails at once
        with ConnectionFailed (it is lost with the ingress's state); ZeroMQ reconnects by itself,
        and the next request checks the ingress again before it is sent."""
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED,
                                          addr=f"inproc://conveyor-client-{uuid.uuid4().hex}")
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] != zmq.EVENT_DISCONNECTED:
                    continue
                self._connected = False
                lost = ConnectionFailed(f"the connection to the ingress at {self.address} was "
                                        "lost; requests in flight were lost with it")
                for queue in self._queues.values():
                    queue.put_nowait(lost)
        finally:
            if not sock.closed:
                sock.disable_monitor()
            monitor.close(linger=0)

    async def _read_loop(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                msg = decode(frames)
            except ValueError:  # a frame from an incompatible server: nothing to route it to
                continue
            rid = getattr(msg, "id", None)
            if rid == NO_REQUEST_ID:
                # The server could not read something we sent, not even its id: it is one of
                # the calls it has not answered yet (one it answered, it read), so only those
                # learn why; a stream under way goes on.
                for queue in self._queues.values():
                    if not queue.heard:
                        queue.put_nowait(msg)
            elif rid in self._queues:
                self._queues[rid].heard = True
                self._queues[rid].put_nowait(msg)

    async def _cancel(self, rid: int) -> None:
        if self._sock is not None:
            await self._sock.send_multipart(encode(CancelRequest(rid)))


class AsyncStream:
    """One streaming generation; see AsyncClient.stream."""

    def __init__(self, client: AsyncClient, req: GenerateRequest, timeout: float | None):
        self._client = client
        self._req = req
        self._timeout = timeout
        self._queue: asyncio.Queue | None = None
        self._deadline: float | None = None
        self.result: GenerationResult | None = None

    @property
    def request_id(self) -> int:
        return self._req.id

    async def __aenter__(self) -> "AsyncStream":
        await self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.result is None:
            await self.cancel()

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> StreamDelta:
        await self._start()
        while self.result is None:
            msg = await self._next_message()
            if isinstance(msg, TokenDelta):
                return StreamDelta(msg.text, list(msg.token_ids))
            self._close_queue()
            if isinstance(msg, Finished):
                self.result = GenerationResult(msg.text, list(msg.token_ids), msg.finish_reason,
                                               msg.prompt_tokens, msg.completion_tokens,
                                               msg.ttft_s, msg.e2e_s)
            elif isinstance(msg, ErrorReply):
                raise error_from_reply(msg.code, msg.message)
            elif isinstance(msg, ConnectionFailed):
                raise msg
            else:
                raise ProtocolError(f"unexpected reply {type(msg).__name__}")
        raise StopAsyncIteration

    async def cancel(self) -> None:
        """Cancels the request on the server (its KV is freed); a no-op once finished."""
        if self._queue is not None and self.result is None:
            self._close_queue()
            await self._client._cancel(self._req.id)

    async def _start(self) -> None:
        if self._queue is None:
            loop = asyncio.get_running_loop()
            self._deadline = None if self._timeout is None else loop.time() + self._timeout
            self._queue = await self._client._open(self._req)

    async def _next_message(self):
        if self._deadline is None:
            return await self._queue.get()
        left = self._deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(self._queue.get(), max(left, 0))
        except asyncio.TimeoutError:
            await self.cancel()
            raise RequestTimeout(f"request {self._req.id} did not finish within "
                                 f"{self._timeout:g}s; it was cancelled") from None

    def _close_queue(self) -> None:
        self._client._queues.pop(self._req.id, None)


def _build_request(request_id: int, prompt: str | None, kwargs: dict[str, Any], stream: bool,
                   api_key: str | None = None) -> GenerateRequest:
    messages = kwargs.pop("messages", None)
    prompt_token_ids = kwargs.pop("prompt_token_ids", None)
    raw = bool(kwargs.pop("raw", False))
    params = {k: v for k, v in kwargs.items() if v is not None}
    if messages is not None:
        messages = [m if isinstance(m, ChatMessage) else ChatMessage(m["role"], m["content"])
                    for m in messages]
    return GenerateRequest(id=request_id, prompt=prompt, messages=messages,
                           prompt_token_ids=prompt_token_ids, raw=raw, params=params,
                           stream=stream, api_key=api_key)
