"""Endpoint over real ZeroMQ sockets: non-blocking sends must never leave a waiting recv()
asleep (regression: sends through a synchronous shadow socket ate the edge-triggered readable
notification, and the ingress stopped reading for minutes under load)."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq

from common.ports import free_port
from common.wire import decode, encode
from common.wire.client_messages import (ErrorReply, GenerateRequest, HealthRequest,
                                         StatsRequest)
from common.zmq_io import Endpoint, make_context, stop_tasks


@pytest.fixture
def ctx():
    """A context per test, destroyed after it (the services' rule, make_context)."""
    context = make_context()
    yield context
    context.destroy(linger=0)


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


async def _worst_ack_latency(ctx, address: str, requests: int) -> float:
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    worst = 0.0
    try:
        for i in range(requests):
            start = time.perf_counter()
            await sock.send_multipart(encode(HealthRequest(1000 + i)))
            while True:
                msg = decode(await sock.recv_multipart())
                if msg.id == 1000 + i and msg.message == "ack":
                    break
            worst = max(worst, time.perf_counter() - start)
            await asyncio.sleep((i % 7) * 0.001)
    finally:
        sock.close(linger=0)
    return worst


async def test_requests_are_read_promptly_while_replies_stream_out(ctx):
    address = f"tcp://127.0.0.1:{free_port()}"
    ep = Endpoint(ctx, zmq.ROUTER, bind=address, router_mandatory=True)
    server = asyncio.create_task(_serve(ep))
    try:
        worst = await asyncio.wait_for(_worst_ack_latency(ctx, address, 2000), timeout=45)
    finally:
        await stop_tasks([server])
        ep.close()
    assert worst < 1.0, f"a request waited {worst:.2f}s to be read"


async def test_frames_over_the_size_limit_are_dropped_and_others_still_arrive(ctx):
    address = f"tcp://127.0.0.1:{free_port()}"
    ep = Endpoint(ctx, zmq.ROUTER, bind=address, max_frame_bytes=4096)
    big, small = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        for sock in (big, small):
            sock.connect(address)
        header = encode(HealthRequest(1))[0]
        await big.send_multipart([header, b"\xc4\xff" + b"x" * 10_000])  # one 10 kB frame
        await asyncio.sleep(0.2)  # let ZeroMQ read (and drop) it first
        await small.send_multipart(encode(HealthRequest(2)))
        inc = await asyncio.wait_for(ep.recv(), timeout=5)
        assert inc.message == HealthRequest(2)
    finally:
        big.close(linger=0)
        small.close(linger=0)
        ep.close()


async def test_an_undecodable_frame_is_received_as_its_reason(ctx):
    address = f"tcp://127.0.0.1:{free_port()}"
    ep = Endpoint(ctx, zmq.ROUTER, bind=address)
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.connect(address)
        header = encode(GenerateRequest(1))[0]
        params_nested = b"\x82\xa2id\x01\xa6params\x81\xa1x" + b"\x91" * 100_000 + b"\x00"
        await sock.send_multipart([header, params_nested])
        await sock.send_multipart(encode(StatsRequest(2)))
        bad = await asyncio.wait_for(ep.recv(), timeout=5)
        assert bad.message is None and "GenerateRequest body is nested too deeply" in bad.error
        assert (await asyncio.wait_for(ep.recv(), timeout=5)).message == StatsRequest(2)
    finally:
        sock.close(linger=0)
        ep.close()


async def test_a_call_in_flight_fails_at_once_when_its_peer_goes_away(ctx):
    """A dead kv-cache manager used to show as a 30 s timeout in the controller."""
    from common.wire.internal_messages import PoolStatsQuery
    from common.zmq_io import PeerDisconnected, RpcClient

    address = f"tcp://127.0.0.1:{free_port()}"
    server = ctx.socket(zmq.ROUTER)
    server.bind(address)
    client = Endpoint(ctx, zmq.DEALER, connect=address)
    rpc = RpcClient(client)
    watcher = asyncio.create_task(rpc.fail_on_disconnect("test peer"))
    try:
        call = asyncio.create_task(rpc.call(lambda cid: PoolStatsQuery(cid), timeout=30))
        await asyncio.wait_for(server.recv_multipart(), 5)  # arrived: the peer is connected
        start = time.monotonic()
        server.close(linger=0)  # the peer dies without answering
        try:
            await call
            raise AssertionError("the call should have failed")
        except PeerDisconnected as e:
            assert "test peer disconnected" in str(e)
        assert time.monotonic() - start < 2.0
    finally:
        await stop_tasks([watcher])
        client.close()
