"""A process started before its peer says that it waits for it, and then that the peer came;
and the address helpers of a multi-host config (host names bound, the stage's own address)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import structlog
import zmq
import zmq.asyncio

from common.addresses import bindable, source_address_towards
from common.ports import free_port
from common.peer_wait import wait_connected, watch_connection
from common.zmq_io import Endpoint, RpcClient, stop_tasks

pytestmark = pytest.mark.timeout(60)


def test_bindable_resolves_host_names_and_leaves_the_rest():
    assert bindable("tcp://localhost:7601") == "tcp://127.0.0.1:7601"
    for address in ("tcp://10.1.2.3:7601", "tcp://*:7601", "ipc:///run/conveyor/controller",
                    "tcp://[::1]:7601", "tcp://no-such-host.invalid:7601"):
        assert bindable(address) == address


def test_the_source_address_towards_a_local_address_is_itself():
    assert source_address_towards("127.0.0.1") == "127.0.0.1"
    assert source_address_towards("localhost") == "127.0.0.1"


async def test_a_connecting_endpoint_says_it_waits_then_that_its_peer_came():
    ctx = zmq.asyncio.Context()
    address = f"tcp://127.0.0.1:{free_port()}"
    client = Endpoint(ctx, zmq.DEALER, connect=address)
    rpc = RpcClient(client)
    server = None
    with structlog.testing.capture_logs() as logs:
        watch = asyncio.create_task(rpc.fail_on_disconnect("test peer"))
        try:
            while not any(e["event"] == "waiting for the test peer" for e in logs):
                await asyncio.sleep(0.1)  # the pytest timeout bounds this
            assert not rpc.connected.is_set()
            server = ctx.socket(zmq.ROUTER)
            server.bind(address)
            await asyncio.wait_for(rpc.connected.wait(), 10)
            server.close(linger=0)  # gone again: waited for again
            while not any(e["event"] == "peer disconnected" for e in logs):
                await asyncio.sleep(0.05)
            assert not rpc.connected.is_set()
        finally:
            await stop_tasks([watch])
            client.close()
            ctx.destroy(linger=0)
    waiting = next(e for e in logs if e["event"] == "waiting for the test peer")
    assert waiting["address"] == address and waiting["log_level"] == "warning"
    came = next(e for e in logs if e["event"] == "test peer connected")
    assert came["waited_s"] >= waiting["waited_s"]


def test_a_synchronous_socket_waits_for_its_peer_saying_so():
    ctx = zmq.Context()
    address = f"tcp://127.0.0.1:{free_port()}"
    sock = ctx.socket(zmq.DEALER)
    monitor = watch_connection(sock)
    sock.connect(address)
    server = ctx.socket(zmq.ROUTER)
    with structlog.testing.capture_logs() as logs:
        later = threading.Timer(3.0, server.bind, (address,))
        later.start()
        try:
            wait_connected(monitor, "controller", address)
        finally:
            later.join()
            sock.disable_monitor()
            for s in (monitor, sock, server):
                s.close(linger=0)
            ctx.term()
    events = [e["event"] for e in logs]
    assert events[0] == "waiting for the controller" and events[-1] == "controller connected"
