"""Endpoint over real ZeroMQ sockets: non-blocking sends must never leave a waiting recv()
asleep (regression: sends through a synchronous shadow socket ate the edge-triggered readable
notification, and the ingress stopped reading for minutes under load)."""

from __future__ import annotations

import asyncio
import time

import zmq
import zmq.asyncio

from common.config import free_port
from common.wire import decode, encode
from common.wire.client_messages import ErrorReply, HealthRequest
from common.zmq_io import Endpoint, make_context


async def _serve(ep: Endpoint) -> None:
    """Acks every request and keeps streaming to every client seen, all with send_nowait."""
    streams: dict[bytes, int] = {}

    async def stream() -> None:
        while True:
            for identity, rid in list(streams.items()):
                ep.send_nowait(ErrorReply(rid, 1, "tick"), identity)
            await asyncio.sleep(0.002)

    streamer = asyncio.create_task(stream())
    try:
        while True:
            inc = await ep.recv()
            ep.send_nowait(ErrorReply(inc.message.id, 0, "ack"), inc.identity)
            streams[inc.identity] = inc.message.id
    finally:
        streamer.cancel()


async def _worst_ack_latency(address: str, requests: int) -> float:
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.connect(address)
    worst = 0.0
    try:
        for i in range(requests):
            start = time.perf_counter()
            await sock.send_multipart(encode(HealthRequest(1000 + i)))
            while True:
                msg, _ = decode(await sock.recv_multipart())
                if msg.id == 1000 + i and msg.message == "ack":
                    break
            worst = max(worst, time.perf_counter() - start)
            await asyncio.sleep((i % 7) * 0.001)
    finally:
        sock.close(linger=0)
    return worst


async def test_requests_are_read_promptly_while_replies_stream_out():
    address = f"tcp://127.0.0.1:{free_port()}"
    ep = Endpoint(make_context(), zmq.ROUTER, bind=address, router_mandatory=True)
    server = asyncio.create_task(_serve(ep))
    try:
        worst = await asyncio.wait_for(_worst_ack_latency(address, 2000), timeout=45)
    finally:
        server.cancel()
        ep.close()
    assert worst < 1.0, f"a request waited {worst:.2f}s to be read"
