"""Bad input gets a clear error and loses nothing: each case is followed (or accompanied) by a
good request that must still be served. Runs against one real 2-stage deployment."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import threading
import time

import msgspec
import pytest
import zmq

from common.wire import PROTOCOL_VERSION, decode, encode
from common.wire.client_messages import ErrorReply, GenerateRequest
from common.wire.internal_messages import PoolInit, PoolReply
from conveyor.client import InvalidRequestError, ProtocolError, RequestTimeout
from conveyor.client import async_client

GOOD = dict(max_tokens=8, temperature=0)


def assert_still_serving(dep) -> None:
    with dep.client(timeout=60) as client:
        result = client.generate("Say hello.", **GOOD)
    assert result.completion_tokens >= 1 and result.finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def client(deployment):
    with deployment.client(timeout=120) as c:
        yield c


def test_prompt_longer_than_the_context(client, deployment):
    with pytest.raises(InvalidRequestError, match=r"prompt has 2100 tokens but the model's "
                                                  r"context is 2048 tokens"):
        client.generate(prompt_token_ids=[42] * 2100, max_tokens=4)
    assert_still_serving(deployment)


@pytest.mark.parametrize("params, message", [
    ({"max_tokens": 0}, r"max_tokens must be >= 1, got 0"),
    ({"max_tokens": 5000}, r"max_tokens=5000 is out of range: the prompt uses \d+ of the "
                           r"2048-token context, so at most \d+"),
    ({"temperature": -1}, r"temperature must be in \[0, 100\], got -1"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -3}, r"top_k must be in \[0, 9223372036854775807\] \(0 disables it\), got -3"),
    ({"temperature": "hot"}, r"invalid parameter: Expected `float`, got `str` - at `temperature`"),
    ({"frobnicate": 1}, r"unknown parameter 'frobnicate' \(known parameters: max_tokens, "),
])
def test_bad_parameters(client, params, message):
    with pytest.raises(InvalidRequestError, match=message):
        client.generate("Hi", **params)


def test_bad_prompts(client):
    with pytest.raises(InvalidRequestError, match="give exactly one of prompt, messages, "
                                                  "prompt_token_ids"):
        client.generate("Hi", prompt_token_ids=[1, 2])
    with pytest.raises(InvalidRequestError, match=r"outside the vocabulary \[0, 49152\)"):
        client.generate(prompt_token_ids=[1, 10**6])


def _raw_exchange(address: str, frames: list[bytes], timeout_ms: int = 10_000):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), "no reply to a bad frame"
        header, body = sock.recv_multipart()
        return msgspec.msgpack.decode(header), msgspec.msgpack.decode(body)
    finally:
        sock.close()


@pytest.mark.parametrize("frames, message, code, rid", [
    ([b"\x00\x01garbage"], "expected a header and a body frame", 2, -1),
    ([msgspec.msgpack.encode([PROTOCOL_VERSION + 8, 1]), b"\x80"],
     f"unsupported protocol version {PROTOCOL_VERSION + 8}", 2, -1),
    ([encode(GenerateRequest(id=5, prompt="x"))[0],
      encode(GenerateRequest(id=5, prompt="a long enough prompt"))[1][:-6]],
     "malformed or truncated GenerateRequest body", 2, -1),
    # The id is still readable: the refusal goes to that request alone, as an invalid request.
    ([encode(GenerateRequest(id=5))[0], msgspec.msgpack.encode({"id": 5, "promt": "x"})],
     "unknown field `promt`", 1, 5),
    ([encode(GenerateRequest(id=5))[0], msgspec.msgpack.encode({"id": 6, "prompt": 3})],
     "Expected `str | null`, got `int`", 1, 6),
])
def test_malformed_frames_get_a_protocol_error(deployment, frames, message, code, rid):
    (version, type_id), body = _raw_exchange(deployment.address, frames)
    assert version == PROTOCOL_VERSION and body["code"] == code and body["id"] == rid
    assert message in body["message"]
    assert_still_serving(deployment)


def test_cancel_frees_the_kv_blocks(client, deployment):
    before = deployment.wait_kv_free()
    with client.stream("Count from one to one thousand.", max_tokens=1000, temperature=0,
                       ignore_eos=True) as stream:
        for i, _ in enumerate(stream):
            if i == 5:
                during = deployment.kv_pools()
                assert during[0].free_blocks < before[0].total_blocks
                break
    after = deployment.wait_kv_free()
    assert after[0].free_blocks == after[0].total_blocks == before[0].total_blocks
    assert after[0].requests == 0


def test_timeout_cancels_on_the_server(deployment):
    with deployment.client() as client:
        with pytest.raises(RequestTimeout, match="did not finish within 0.5s; it was cancelled"):
            client.generate("Write a long essay.", max_tokens=1000, ignore_eos=True, timeout=0.5)
    pools = deployment.wait_kv_free()
    assert pools[0].free_blocks == pools[0].total_blocks


def test_a_vanished_client_is_aborted_and_others_are_served(deployment):
    """A client process killed mid-stream: its request is aborted (KV freed) while another
    client's stream, running at the same time, completes untouched."""
    script = textwrap.dedent(f"""
        from conveyor.client import Client
        with Client({deployment.address!r}) as c:
            for i, d in enumerate(c.stream("Tell me everything about rivers.", max_tokens=1500,
                                            ignore_eos=True)):
                if i == 3:
                    print("streaming", flush=True)
    """)
    victim = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    with deployment.client(timeout=120) as other:
        stream = other.stream("Name three colours.", max_tokens=40, temperature=0)
        assert victim.stdout.readline().strip() == "streaming"
        victim.kill()
        victim.wait()
        text = "".join(d.text for d in stream)
        assert stream.result.finish_reason in ("stop", "length") and text == stream.result.text
    pools = deployment.wait_kv_free(timeout_s=15)
    assert pools[0].free_blocks == pools[0].total_blocks and pools[0].requests == 0
    assert "aborting requests of a lost client" in deployment.log_tail(400)


def test_duplicate_request_ids_on_one_connection(deployment):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(deployment.address)
    try:
        req = GenerateRequest(id=9, prompt="Hello", params={"max_tokens": 200,
                                                            "ignore_eos": True}, stream=False)
        sock.send_multipart(encode(req))
        sock.send_multipart(encode(req))
        assert sock.poll(10_000)
        _, body = (msgspec.msgpack.decode(f) for f in sock.recv_multipart())
        assert body["code"] == 1 and "request id 9 is already in flight" in body["message"]
    finally:
        sock.close()  # vanishing with a request in flight: the server aborts it
    assert deployment.wait_kv_free(timeout_s=15)[0].requests == 0


# ---- faults: no frame, parameter or message fails anything but itself ---------------------

PROMPT = "Tell me about the history of bridges."
STREAMED = dict(max_tokens=120, temperature=0, ignore_eos=True)
DEEP = b"\x82\xa2id\x05\xa6params\x81\xa1x" + b"\x91" * 200_000 + b"\x00"  # 200 kB, 200k levels


def _send_raw(address: str, frames: list[bytes], expect_reply: bool):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(address)
    try:
        sock.send_multipart(frames)
        if expect_reply:
            assert sock.poll(10_000), "no reply"
            return decode(sock.recv_multipart())
    finally:
        sock.close()


def _rss_kib(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()
    return int(status.split("VmRSS:")[1].split()[0])


def test_faults_while_a_stream_is_in_flight(deployment, client):
    """A deeply nested frame to every process that reads frames, an empty pool, numbers beyond
    64 bits and lone surrogates, all while a greedy stream runs: each is refused with its
    reason, and the stream's tokens are exactly those of the same request run alone."""
    reference = client.generate(PROMPT, **STREAMED)
    with deployment.client(timeout=120) as streaming:
        stream = streaming.stream(PROMPT, **STREAMED)
        tokens = iter(stream)
        first = next(tokens)
        header = encode(GenerateRequest(id=5))[0]
        reply = _send_raw(deployment.address, [header, DEEP], expect_reply=True)
        assert isinstance(reply, ErrorReply) and reply.code == 2 and reply.id == -1
        assert reply.message.startswith("GenerateRequest body is nested too deeply")
        for inner in (f"ipc://{deployment.run_dir}/controller", deployment.kvcache_address):
            _send_raw(inner, [header, DEEP], expect_reply=False)
        # (From a peer that is not the controller it is refused before it is read; the
        # manager's refusal of an empty pool itself is tests/unit/test_kv_pool.py's.)
        refused = _send_raw(deployment.kvcache_address, encode(PoolInit(77, 0, 0, 16)), True)
        assert isinstance(refused, PoolReply) and not refused.ok and refused.error == (
            "refused: only the controller may change the pools")
        for kwargs, message in [
            (dict(top_k=2**63), "top_k must be in [0, 9223372036854775807] (0 disables it), "
                                "got 9223372036854775808"),
            (dict(top_k=2**64 - 1), "top_k must be in [0, 9223372036854775807]"),
            (dict(seed=2**64 - 1), "seed must be in [-9223372036854775808, 9223372036854775807]"),
            (dict(stop_token_ids=[2**63]), "stop_token_ids outside the vocabulary [0, 49152): "
                                           "[9223372036854775808]"),
            (dict(prompt_token_ids=[2**64 - 1]), "prompt_token_ids outside the vocabulary"),
            (dict(max_tokens=2**70), "GenerateRequest cannot be encoded: params.max_tokens = "
                                     "1180591620717411303424 is outside the integers the wire "
                                     "carries ([-2**63, 2**64 - 1])"),
            (dict(stop=["\ud800"]), "params.stop[0] contains a lone surrogate U+D800"),
            (dict(prompt="caf\udce9"), "prompt contains a lone surrogate U+DCE9 at character 3"),
            (dict(messages=[{"role": "user", "content": "\udfff"}]),
             "messages[0].content contains a lone surrogate U+DFFF"),
        ]:
            prompt = kwargs.pop("prompt", None if {"messages", "prompt_token_ids"} & set(kwargs)
                                else "Hi")
            with pytest.raises(InvalidRequestError) as e:
                client.generate(prompt, **kwargs)
            assert message in e.value.message, (kwargs, e.value.message)
        # The largest top_k is the same as none: it shares micro-batches with the stream.
        kw = dict(temperature=1.0, seed=11, max_tokens=8)
        assert client.generate("Hi", top_k=2**63 - 1, **kw).token_ids == \
            client.generate("Hi", **kw).token_ids
        rest = list(tokens)
    assert first.token_ids + [t for d in rest for t in d.token_ids] == reference.token_ids
    assert stream.result.finish_reason == "length" and len(reference.token_ids) == 120
    log = deployment.log_tail(400)
    for role in ("controller", "kvcache"):
        assert re.search(rf"dropped undecodable frame .*GenerateRequest body is nested too "
                         rf"deeply.*role={role}", log), role
    assert_still_serving(deployment)


def test_an_error_the_ingress_cannot_attribute_reaches_only_unanswered_calls(client,
                                                                             monkeypatch):
    """A frame the ingress cannot read even the id of (here: a client speaking another
    protocol version) is answered with id -1. The SDK hands that error only to the calls the
    ingress has not answered yet: the one that caused it fails with the reason, a stream under
    way on the same connection goes on untouched (it used to fail with the same error)."""
    reference = client.generate(PROMPT, **STREAMED)
    stream = client.stream(PROMPT, **STREAMED)
    tokens = iter(stream)
    first = next(tokens)  # answered: the ingress read it
    encode_now = async_client.encode

    def another_version(msg):
        return [msgspec.msgpack.encode([PROTOCOL_VERSION + 8, msg.TYPE_ID]), encode_now(msg)[1]]

    monkeypatch.setattr(async_client, "encode", another_version)
    with pytest.raises(ProtocolError, match=f"unsupported protocol version "
                                            f"{PROTOCOL_VERSION + 8}"):
        client.health()
    monkeypatch.undo()
    rest = list(tokens)
    assert first.token_ids + [t for d in rest for t in d.token_ids] == reference.token_ids
    assert stream.result.finish_reason == "length"


def test_a_request_over_the_frame_limit_fails_alone(client):
    """ZeroMQ at the ingress drops a frame over ingress.max_frame_bytes with the client's whole
    connection, which used to fail every stream on it with ConnectionFailed: the SDK refuses
    such a request itself (the limit from the ingress's health reply), and only it fails."""
    reference = client.generate(PROMPT, **STREAMED)
    limit = client.health().max_frame_bytes
    assert limit == 16 * 2**20  # the deployment's default, as its ingress reports it
    stream = client.stream(PROMPT, **STREAMED)
    tokens = iter(stream)
    first = next(tokens)
    start = time.monotonic()
    with pytest.raises(InvalidRequestError) as refused:
        client.generate("x" * limit, max_tokens=4)
    found = re.fullmatch(rf"GenerateRequest is (\d+) bytes on the wire; the ingress reads frames "
                         rf"of at most {limit} bytes \(ingress\.max_frame_bytes\), so it was "
                         rf"not sent", refused.value.message)
    assert found and limit < int(found[1]) < limit + 200, refused.value.message
    assert time.monotonic() - start < 5.0  # refused here, not after the client's 120 s timeout
    rest = list(tokens)
    assert first.token_ids + [t for d in rest for t in d.token_ids] == reference.token_ids
    assert stream.result.finish_reason == "length"
    assert client.generate("Say hello.", **GOOD).completion_tokens >= 1


def test_a_10mb_prompt_is_refused_at_once_and_streams_keep_their_pace(deployment):
    ingress = deployment.process_pid("ingress")
    rss_before = _rss_kib(ingress)
    arrivals = []

    def consume(stream):
        for _ in stream:
            arrivals.append(time.monotonic())

    with deployment.client(timeout=120) as streaming, deployment.client(timeout=30) as other:
        stream = streaming.stream(PROMPT, max_tokens=60, temperature=0, ignore_eos=True)
        reader = threading.Thread(target=consume, args=(stream,))
        reader.start()
        while len(arrivals) < 3:
            time.sleep(0.01)
        start = time.monotonic()
        with pytest.raises(InvalidRequestError, match=r"^prompt is 10000000 bytes of UTF-8 "
                                                      r"text; the limit is 65536 bytes \(ingress"
                                                      r"\.max_prompt_bytes"):
            other.generate("x" * 10_000_000, max_tokens=4)
        refused_s = time.monotonic() - start
        reader.join(timeout=120)
    assert refused_s < 1.0, f"refusing the prompt took {refused_s:.2f}s"
    assert stream.result.completion_tokens == 60
    worst = max(b - a for a, b in zip(arrivals, arrivals[1:]))
    assert worst < 2.0, f"the stream stalled {worst:.2f}s while the prompt was refused"
    grown_mib = (_rss_kib(ingress) - rss_before) / 1024
    assert grown_mib < 100, f"the ingress kept {grown_mib:.0f} MiB more after the refusal"
