"""Tokenizing off the event loop: other streams keep their pace, submission keeps arrival
order, and a request cancelled (or failing) while it is tokenized ends alone. A real Ingress
with the real tokenizer, slowed on demand, against a fake controller socket."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq
import zmq.asyncio

from common.config import load_config
from common.ports import free_port
from common.wire import decode, encode
from common.wire.client_messages import (CancelRequest, ErrorReply, Finished, GenerateRequest,
                                         Ping, TokenDelta)
from common.wire.internal_messages import Hello, RequestOutput, RequestOutputs, SubmitRequest
from common.zmq_io import make_context, stop_tasks
from services.ingress import service
from services.ingress.admission import Admission

SLOW_S = 1.0
_load_tokenizer = service.load_tokenizer
_tokenizers: list = []


def real_tokenizer(src=None):
    if not _tokenizers:  # loaded once for the module: it takes a second
        _tokenizers.append(_load_tokenizer(src))
    return _tokenizers[0]


def token_ids(text: str) -> list[int]:
    return real_tokenizer()(text, add_special_tokens=True)["input_ids"]


class Slowed:
    """The real tokenizer, sleeping SLOW_S on texts that say SLOW and failing on BOOM."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, text, **kw):
        if "BOOM" in text:
            raise RuntimeError("tokenizer exploded")
        if "SLOW" in text:
            time.sleep(SLOW_S)
        return self._inner(text, **kw)


@pytest.fixture
async def setup(monkeypatch):
    monkeypatch.setattr(service, "load_tokenizer", lambda src: Slowed(real_tokenizer(src)))
    cfg = load_config(None, {"model.source": "tiny", "model.load_format": "dummy",
                             "endpoints.ingress": f"tcp://127.0.0.1:{free_port()}",
                             "endpoints.controller": f"tcp://127.0.0.1:{free_port()}",
                             "http.port": free_port()})
    ctx = make_context()
    ctrl = ctx.socket(zmq.ROUTER)
    ctrl.bind(cfg.endpoints.controller)
    ingress = service.Ingress(cfg)
    serving = asyncio.create_task(ingress.serve())
    assert isinstance((await recv(ctrl))[1], Hello)
    clients = []

    def client():
        sock = ctx.socket(zmq.DEALER)
        sock.connect(cfg.endpoints.ingress)
        clients.append(sock)
        return sock
    yield ctrl, client
    await stop_tasks([serving])  # the ingress closes its sockets before the loop goes
    ctx.destroy(linger=0)


async def recv(sock, timeout: float = 5.0):
    """The next message (and the sender's identity on the ROUTER), Pings skipped."""
    while True:
        frames = await asyncio.wait_for(sock.recv_multipart(), timeout)
        if sock.socket_type == zmq.ROUTER:
            return frames[0], decode(frames[1:])
        msg = decode(frames)
        if not isinstance(msg, Ping):
            return None, msg


async def send(sock, msg) -> None:
    await sock.send_multipart(encode(msg))


def generate(rid: int, prompt: str, **params) -> GenerateRequest:
    return GenerateRequest(id=rid, prompt=prompt, raw=True, params=params)


async def test_other_streams_keep_their_pace_while_a_prompt_is_tokenized(setup):
    ctrl, client = setup
    a, b = client(), client()
    await send(a, generate(1, "Stream me."))
    identity, sub = await recv(ctrl)
    assert isinstance(sub, SubmitRequest)

    async def stream_tokens():  # one token every 10 ms, like a fast pipeline
        for _ in range(80):
            await ctrl.send_multipart([identity, *encode(RequestOutputs(
                [RequestOutput(sub.req_id, [1000])]))])
            await asyncio.sleep(0.01)
    streamer = asyncio.create_task(stream_tokens())
    await asyncio.sleep(0.05)
    await send(b, generate(2, "SLOW " * 100))
    await send(b, generate(3, "queued behind it"))
    arrivals = []
    while len(arrivals) < 70:
        _, msg = await recv(a)
        assert isinstance(msg, TokenDelta) and msg.token_ids == [1000]
        arrivals.append(time.monotonic())
    await streamer
    worst = max(later - earlier for earlier, later in zip(arrivals, arrivals[1:]))
    assert worst < SLOW_S / 2, f"a stream stalled {worst:.2f}s while a prompt was tokenized"
    # Both of b's requests reach the controller, in the order they arrived.
    subs = [(await recv(ctrl))[1] for _ in range(2)]
    assert [type(m) for m in subs] == [SubmitRequest, SubmitRequest]
    assert subs[0].req_id < subs[1].req_id and subs[0].arrival <= subs[1].arrival
    assert subs[0].prompt_token_ids == token_ids("SLOW " * 100)
    assert subs[1].prompt_token_ids == token_ids("queued behind it")


async def test_a_request_cancelled_while_tokenized_is_never_submitted(setup):
    ctrl, client = setup
    c = client()
    await send(c, generate(7, "SLOW and then cancelled"))
    await asyncio.sleep(0.1)
    cancelled_at = time.monotonic()
    await send(c, CancelRequest(7))
    _, msg = await recv(c)
    assert isinstance(msg, Finished) and msg.id == 7 and msg.finish_reason == "cancelled"
    assert msg.token_ids == [] and time.monotonic() - cancelled_at < SLOW_S / 2
    # The id is free again at once, while the cancelled one is still being tokenized.
    await send(c, generate(7, "the same id, reused"))
    _, sub = await recv(ctrl, timeout=SLOW_S * 4)
    assert isinstance(sub, SubmitRequest)
    assert sub.prompt_token_ids == token_ids("the same id, reused")
    with pytest.raises(asyncio.TimeoutError):  # no submit and no abort for the cancelled one
        await recv(ctrl, timeout=SLOW_S)
    await ctrl.send_multipart([b"ingress", *encode(RequestOutputs(
        [RequestOutput(sub.req_id, [1000], finish=2)]))])
    _, delta = await recv(c)
    _, done = await recv(c)
    assert isinstance(delta, TokenDelta) and isinstance(done, Finished)
    assert done.id == 7 and done.token_ids == [1000] and done.finish_reason == "length"


async def test_a_request_whose_preparation_fails_fails_alone(setup):
    ctrl, client = setup
    c = client()
    await send(c, generate(1, "BOOM"))
    await send(c, generate(2, "fine"))
    _, err = await recv(c)
    assert isinstance(err, ErrorReply) and err.id == 1 and err.code == 4
    assert "preparing the request failed: RuntimeError('tokenizer exploded')" == err.message
    _, sub = await recv(ctrl)
    assert isinstance(sub, SubmitRequest) and sub.prompt_token_ids == token_ids("fine")


async def test_admission_skips_closed_items_and_keeps_order():
    class Item:
        def __init__(self, name):
            self.name, self.closed = name, False

    prepared, admitted, refused = [], [], []

    def prepare(item):
        prepared.append(item.name)
        if item.name == "bad":
            raise ValueError("bad item")
        time.sleep(0.05)
        return item.name.upper()

    admission = Admission(prepare, lambda i, r: admitted.append(r),
                          lambda i, e: refused.append(str(e)))
    items = {n: Item(n) for n in ("a", "closed-early", "bad", "closed-during", "b")}
    for item in items.values():
        admission.put(item)
    items["closed-early"].closed = True
    runner = asyncio.create_task(admission.run())
    while "closed-during" not in prepared:
        await asyncio.sleep(0.005)
    items["closed-during"].closed = True
    while len(admitted) < 2:
        await asyncio.sleep(0.005)
    runner.cancel()
    assert prepared == ["a", "bad", "closed-during", "b"]
    assert admitted == ["A", "B"] and refused == ["bad item"]


async def test_a_restarted_ingress_never_reuses_a_request_id(monkeypatch):
    """A restarted ingress used to count from 1 again while the controller still held the old
    ids ("duplicate request id" for 6 of 10 requests)."""
    monkeypatch.setattr(service, "load_tokenizer", lambda src: real_tokenizer(src))
    ids = []
    for _ in range(2):
        cfg = load_config(None, {"model.source": "tiny", "model.load_format": "dummy",
                                 "endpoints.ingress": f"tcp://127.0.0.1:{free_port()}",
                                 "endpoints.controller": f"tcp://127.0.0.1:{free_port()}"})
        ingress = service.Ingress(cfg)
        try:
            ids.append([next(ingress._req_ids) for _ in range(1000)])
        finally:
            ingress.clients.close()
            ingress.ctrl.close()
        await asyncio.sleep(0.002)
    first, restarted = ids
    assert min(restarted) > max(first) and max(restarted) < 2**63


async def test_a_stopped_ingress_closes_its_sockets_and_context(monkeypatch):
    """Each service owns its ZeroMQ context and destroys it when it stops, after its own tasks
    have run their clean-up: sockets left open on the process-wide context by one in-process
    ingress, collected later, broke every later socket of that context (the CI failure of
    test_zmq_io and test_kv_lease after this module)."""
    monkeypatch.setattr(service, "load_tokenizer", lambda src: real_tokenizer(src))
    cfg = load_config(None, {"model.source": "tiny", "model.load_format": "dummy",
                             "endpoints.ingress": f"tcp://127.0.0.1:{free_port()}",
                             "endpoints.controller": f"tcp://127.0.0.1:{free_port()}",
                             "http.enabled": False})
    ingress = service.Ingress(cfg)
    serving = asyncio.create_task(ingress.serve())
    await asyncio.sleep(0.2)
    await stop_tasks([serving])
    assert ingress.clients.sock.closed and ingress.ctrl.sock.closed
    assert ingress._ctx.closed


def test_a_closed_client_releases_its_loop_and_context():
    from conveyor.client import Client
    from conveyor.client.errors import ConnectionFailed

    client = Client(f"tcp://127.0.0.1:{free_port()}", connect_timeout=0.2)
    with pytest.raises(ConnectionFailed):
        client.health(timeout=0.2)  # opens the socket (and its context)
    ctx = client._async._ctx
    client.close()
    assert ctx.closed and client._loop.is_closed()
