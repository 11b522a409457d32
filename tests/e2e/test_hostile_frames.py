"""Hostile input at scale: 10,000 malformed and fuzzed frames sent to the ingress of a real
deployment (tiny dummy model, 2 stages), interleaved with valid greedy requests. Each bad frame
gets its refusal, the valid requests' tokens are exactly those of the same requests run before
the flood, a 50 MB frame only loses its own connection, every process is alive at the end, and
the ingress's memory stays where it was (within 100 MB)."""

from __future__ import annotations

import random
import threading
import time

import msgspec
import pytest
import zmq

from common.wire import PROTOCOL_VERSION, decode, encode
from common.wire.client_messages import ErrorCode, ErrorReply, GenerateRequest
from common.wire.internal_messages import StepDone
from conveyor.local_deployment import start_deployment, stop_deployment

FRAMES = 10_000
SENDERS = 4
PROMPTS = ["Tell me about the sea.", "Count to five.", "What is a river?"]
GREEDY = dict(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def deployment():
    dep = start_deployment(sets=("model.source=tiny", "model.load_format=dummy"))
    yield dep
    assert stop_deployment(dep) == 0, dep.log_tail()


def _header(type_id: int = GenerateRequest.TYPE_ID, version: int = PROTOCOL_VERSION) -> bytes:
    return msgspec.msgpack.encode((version, type_id))


def hostile_frames(rng: random.Random) -> list[bytes]:
    """One bad multipart message, of a kind drawn at random."""
    good = encode(GenerateRequest(id=rng.randrange(2**31), prompt="Hi " * rng.randrange(1, 20),
                                  params={"max_tokens": 4}))
    kind = rng.randrange(10)
    if kind == 0:  # random bytes, one to four frames
        return [rng.randbytes(rng.randrange(1, 64)) for _ in range(rng.randrange(1, 5))]
    if kind == 1:  # truncated msgpack body
        return [good[0], good[1][:rng.randrange(len(good[1]))]]
    if kind == 2:  # wrong protocol version
        return [_header(version=rng.choice([0, 1, 3, 2**31, -1])), good[1]]
    if kind == 3:  # wrong field types
        field, value = rng.choice([("prompt", 5), ("stream", "yes"), ("params", [1]),
                                   ("prompt_token_ids", "abc"), ("id", "seven")])
        return [good[0], msgspec.msgpack.encode({"id": 3, "prompt": "x", field: value})]
    if kind == 4:  # huge declared lengths: str32, bin32, array32, map32 with no payload
        return [good[0], rng.choice([b"\xdb", b"\xc6", b"\xdd", b"\xdf"]) + b"\xff\xff\xff\xf0"]
    if kind == 5:  # extra frames
        return good + [rng.randbytes(8)] * rng.randrange(1, 3)
    if kind == 6:  # a header alone (the body frame missing)
        return [good[0]]
    if kind == 7:  # nested deeper than the decoder recurses
        return [good[0], b"\x81\xa6params" + b"\x91" * rng.randrange(2_000, 50_000) + b"\xc0"]
    if kind == 8:  # unknown message types, and an internal message on the client port
        if rng.random() < 0.5:
            return [_header(type_id=rng.randrange(1000, 2**31)), good[1]]
        return encode(StepDone(1, 0, 1, 0.0, 0.0, [7]))
    return [good[0], rng.randbytes(rng.randrange(1, 200))]  # random body under a good header


def _flood(address: str, seed: int, count: int, results: dict) -> None:
    """Sends `count` bad messages from one socket and reads every reply."""
    rng = random.Random(seed)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    replies, codes = 0, set()
    try:
        for i in range(count):
            sock.send_multipart(hostile_frames(rng))
            while sock.poll(0):
                reply = decode(sock.recv_multipart())
                assert isinstance(reply, ErrorReply), reply
                replies, codes = replies + 1, codes | {reply.code}
        deadline = time.monotonic() + 30
        while replies < count and time.monotonic() < deadline:
            if sock.poll(1000):
                reply = decode(sock.recv_multipart())
                assert isinstance(reply, ErrorReply), reply
                replies, codes = replies + 1, codes | {reply.code}
    finally:
        sock.close()
        ctx.term()
    results[seed] = (replies, codes)


def _rss_mib(pid: int) -> float:
    return int(open(f"/proc/{pid}/status").read().split("VmRSS:")[1].split()[0]) / 1024


def test_ten_thousand_hostile_frames_leave_every_request_and_process_unharmed(deployment):
    with deployment.client(timeout=60) as client:
        reference = {p: client.generate(p, **GREEDY).token_ids for p in PROMPTS}
    pids = {role: deployment.process_pid(role) for role in ("ingress", "controller", "kvcache")}
    pids |= {f"stage {s}": deployment.process_pid("stage", 0, s) for s in (0, 1)}
    rss_before = _rss_mib(pids["ingress"])
    results: dict = {}
    valid: list = []
    done = threading.Event()

    def serve_valid_requests():
        with deployment.client(timeout=60) as client:
            while not done.is_set():
                for p in PROMPTS:
                    valid.append((p, client.generate(p, **GREEDY).token_ids))

    start = time.monotonic()
    worker = threading.Thread(target=serve_valid_requests)
    worker.start()
    flooders = [threading.Thread(target=_flood, args=(deployment.address, seed,
                                                      FRAMES // SENDERS, results))
                for seed in range(SENDERS)]
    for t in flooders:
        t.start()
    # One 50 MB frame, beyond ingress.max_frame_bytes: ZeroMQ drops it unread and disconnects
    # its sender, which gets no reply; nobody else notices.
    ctx = zmq.Context()
    big = ctx.socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(deployment.address)
    big.send_multipart([_header(), b"\xdb" + (50 * 2**20).to_bytes(4, "big") + b"x" * 50 * 2**20])
    assert not big.poll(3000)
    big.close()
    ctx.term()
    for t in flooders:
        t.join(timeout=60)
    done.set()
    worker.join(timeout=60)
    elapsed = time.monotonic() - start
    assert elapsed < 60, f"the flood took {elapsed:.1f}s"
    assert sum(r for r, _ in results.values()) == FRAMES, results  # every bad frame answered
    assert set().union(*(c for _, c in results.values())) <= {ErrorCode.PROTOCOL,
                                                              ErrorCode.INVALID_REQUEST}
    assert len(valid) >= len(PROMPTS)
    for prompt, tokens in valid:
        assert tokens == reference[prompt], prompt
    assert deployment.alive()
    assert {role: deployment.process_pid(*(("stage", 0, int(role[-1])) if role.startswith(
        "stage") else (role,))) for role in pids} == pids  # the same processes, none restarted
    with deployment.client(timeout=30) as client:
        assert client.health().ready
        assert client.generate(PROMPTS[0], **GREEDY).token_ids == reference[PROMPTS[0]]
    grown = _rss_mib(pids["ingress"]) - rss_before
    assert grown < 100, f"the ingress grew by {grown:.0f} MiB"
    assert all(p.free_blocks == p.total_blocks for p in deployment.wait_kv_free())
