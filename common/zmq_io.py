"""Small asyncio helpers over ZeroMQ sockets carrying framed Conveyor messages.

`Endpoint` wraps one zmq.asyncio socket: send a message (to an identity, on ROUTER sockets),
receive the next one as an `Incoming` that holds either the message or the reason it could not
be decoded (common.wire.decode raises only ProtocolError, whatever the frame holds), so a
service can answer a bad frame instead of dying on it. A socket facing untrusted peers can cap
the size of one frame (`max_frame_bytes`, ZeroMQ's MAXMSGSIZE): ZeroMQ then drops a larger
frame before it is buffered whole and disconnects its sender, which gets no reply.
`RpcClient` matches replies to calls by `call_id` on a DEALER socket.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from common.addresses import bindable
from common.log import get_logger
from common.peer_wait import PeerWait, is_handshake, watch_connection
from common.run_dir import ensure_private_dir, ipc_folder
from common.runtime import StartupError
from common.security import CurveClient, CurveServer
from common.wire import Message, ProtocolError, decode, encode

# A generous high-water mark: dropping control messages is never acceptable; back-pressure is
# handled by the scheduler (bounded micro-batches in flight), not by the socket.
_HWM = 100_000


@dataclass
class Incoming:
    identity: bytes | None
    message: Message | None
    error: str | None = None
    request_id: int | None = None
    """With an undecodable public message whose `id` could still be read: that id."""
    role: str | None = None
    """On a CURVE server socket: the sender's role (common/security.py); None without CURVE."""


def make_context() -> zmq.asyncio.Context:
    """A context for one service object (or client), destroyed with it: never the process-wide
    Context.instance(), so that what one of them leaves behind (tests run several in one
    process) cannot reach the sockets of another."""
    return zmq.asyncio.Context()


async def stop_tasks(tasks: list[asyncio.Task]) -> None:
    """Cancels a service's tasks and waits until each has run its own clean-up, so that the
    sockets they use are closed after them, never under them."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def ensure_ipc_dir(address: str) -> None:
    """ipc:// endpoints live in a folder that must exist before bind, and be private: whoever
    can open the socket can speak to the service (common/run_dir.py)."""
    folder = ipc_folder(address)
    if folder is not None:
        ensure_private_dir(folder)


log = get_logger()


def _log_failed_send(future: "asyncio.Future") -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("queued non-blocking send failed", error=str(future.exception()))


class Endpoint:
    """One socket carrying framed messages. ROUTER sockets prefix an identity frame."""

    def __init__(self, ctx: zmq.asyncio.Context, kind: int, *, bind: str | None = None,
                 connect: str | None = None, identity: bytes | None = None,
                 router_mandatory: bool = False, max_frame_bytes: int = 0,
                 security: "CurveServer | CurveClient | None" = None):
        self.kind = kind
        self.sock = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, _HWM)
        self.sock.setsockopt(zmq.RCVHWM, _HWM)
        if identity is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, identity)
        if router_mandatory:
            # Sending to a peer that has gone raises EHOSTUNREACH instead of silently dropping:
            # that is how the ingress notices a vanished client.
            self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if max_frame_bytes > 0:  # before bind/connect: connections take the options of then
            self.sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        self.curve_server = isinstance(security, CurveServer)
        if security is not None:  # CURVE (common/security.py), also before bind/connect
            security.apply(self.sock)
        if bind:
            ensure_ipc_dir(bind)
            try:
                self.sock.bind(bindable(bind))  # a host name of a shared multi-host config
            except zmq.ZMQError as e:
                self.sock.close(linger=0)
                raise StartupError(f"cannot listen on {bind}: {e}") from None
        self.connection_events: zmq.asyncio.Socket | None = None
        """A connecting endpoint's handshakes and disconnections (common/peer_wait.py)."""
        if connect:
            self.connection_events = watch_connection(self.sock)  # before connect: none missed
            self.sock.connect(connect)
        self.address = bind or connect

    @property
    def is_router(self) -> bool:
        return self.kind == zmq.ROUTER

    async def send(self, msg: Message, identity: bytes | None = None) -> None:
        frames = encode(msg)
        if self.is_router:
            if identity is None:
                raise ValueError("a ROUTER socket needs the peer's identity to send")
            frames = [identity, *frames]
        await self.sock.send_multipart(frames, copy=False)

    def send_nowait(self, msg: Message, identity: bytes | None = None) -> None:
        """Non-blocking send; raises zmq.Again when the peer's queue is full and
        zmq.ZMQError(EHOSTUNREACH) on a ROUTER_MANDATORY socket when the peer is gone."""
        frames = encode(msg)
        if self.is_router:
            frames = [identity, *frames]
        # Through the asyncio socket, never a synchronous shadow of it: a send can consume the
        # edge-triggered "readable" notification of ZMQ_FD, and only zmq.asyncio knows to
        # re-check for messages afterwards; a shadow send left a waiting recv() asleep for
        # minutes under load. With NOBLOCK the future is settled at once unless earlier sends
        # are still queued, so errors are raised here, as a synchronous send would.
        future = self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
        if future.done():
            future.result()
        else:
            future.add_done_callback(_log_failed_send)

    async def recv(self) -> Incoming:
        frames = await self.sock.recv_multipart(copy=False)
        identity = None
        if self.is_router:
            identity, frames = frames[0].bytes, frames[1:]
        # The ZAP handler named the connection by its role (common/security.py).
        role = frames[-1].get("User-Id") if self.curve_server and frames else None
        try:
            msg = decode([f.buffer for f in frames])
        except ProtocolError as e:
            return Incoming(identity, None, str(e), e.request_id, role)
        return Incoming(identity, msg, None, role=role)

    def close(self) -> None:
        if self.connection_events is not None and not self.connection_events.closed:
            if not self.sock.closed:
                self.sock.disable_monitor()
            self.connection_events.close(linger=0)
        self.sock.close(linger=0)


class RpcClient:
    """Calls over a DEALER endpoint: `await call(lambda call_id: Msg(call_id=call_id, ...))`.

    Run `dispatch(incoming)` from the endpoint's receive loop; it resolves the matching call
    and returns False for messages that are not replies, which the caller handles itself."""

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.connected = asyncio.Event()
        """The peer has completed its handshake and not disconnected since (kept by
        fail_on_disconnect)."""

    async def call(self, build: Callable[[int], Message], timeout: float | None = None) -> Message:
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        try:
            await self.endpoint.send(build(call_id))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(call_id, None)

    def send_call(self, build: Callable[[int], Message]) -> asyncio.Future:
        """Sends a call at once (nothing else can be sent before it) and returns the future
        of its reply, for the caller to await with its own timeout."""
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        fut.add_done_callback(lambda _: self._pending.pop(call_id, None))
        self.endpoint.send_nowait(build(call_id))
        return fut

    def dispatch(self, incoming: Incoming) -> bool:
        call_id = getattr(incoming.message, "call_id", None)
        fut = self._pending.get(call_id) if call_id is not None else None
        if fut is None:
            return False
        if not fut.done():
            fut.set_result(incoming.message)
        return True

    def fail_all(self, exc: BaseException) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)

    async def fail_on_disconnect(self, peer: str,
                                 on_disconnect: Callable[[], None] | None = None,
                                 on_connect: Callable[[], None] | None = None,
                                 on_reconnect: Callable[[], None] | None = None) -> None:
        """Runs for the endpoint's life: whenever the connection to the peer drops (its
        process died or closed the socket), every call in flight fails at once with
        PeerDisconnected instead of waiting out its timeout, and `on_disconnect` runs (to fail
        what else depended on the peer). ZeroMQ reconnects by itself; later calls go through
        once the peer is back. `on_connect` runs at every handshake, `on_reconnect` at those
        after a drop (a restarted peer knows nothing of this process: say hello again). While
        the peer is not connected (not started yet, or gone), the process says that it waits
        for it (common/peer_wait.py); `connected` is set while it is."""
        monitor = self.endpoint.connection_events
        if monitor is None:
            raise ValueError("fail_on_disconnect needs a connecting endpoint")
        wait = PeerWait(peer, self.endpoint.address)
        dropped = False
        while True:
            if not self.connected.is_set() and not await monitor.poll(wait.timeout_ms()):
                wait.overdue()
                continue
            frames = await monitor.recv_multipart()
            if is_handshake(frames):
                wait.connected()
                self.connected.set()
                for callback in (on_connect, on_reconnect if dropped else None):
                    if callback is not None:
                        callback()
                continue
            self.connected.clear()
            dropped = True
            wait = PeerWait(peer, self.endpoint.address)
            pending = sum(not f.done() for f in self._pending.values())
            log.error("peer disconnected", peer=peer, calls_failed=pending)
            self.fail_all(PeerDisconnected(f"the {peer} disconnected"))
            if on_disconnect is not None:
                on_disconnect()


class PeerDisconnected(ConnectionError):
    """The peer of an RpcClient went away while a call was in flight."""
