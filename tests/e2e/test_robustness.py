"""Bad input gets a clear error and loses nothing: each case is followed (or accompanied) by a
good request that must still be served. Runs against one real 2-stage deployment."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import msgspec
import pytest
import zmq

from common.wire import PROTOCOL_VERSION, encode
from common.wire.client_messages import GenerateRequest
from conveyor.client import InvalidRequestError, RequestTimeout

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
    ({"top_k": -3}, r"top_k must be >= 0"),
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


@pytest.mark.parametrize("frames, message", [
    ([b"\x00\x01garbage"], "expected a header and a body frame"),
    ([msgspec.msgpack.encode([PROTOCOL_VERSION + 8, 1]), b"\x80"],
     f"unsupported protocol version {PROTOCOL_VERSION + 8}"),
    ([encode(GenerateRequest(id=5, prompt="x"))[0],
      encode(GenerateRequest(id=5, prompt="a long enough prompt"))[1][:-6]],
     "malformed or truncated GenerateRequest body"),
    ([encode(GenerateRequest(id=5))[0], msgspec.msgpack.encode({"id": 5, "promt": "x"})],
     "unknown field `promt`"),
])
def test_malformed_frames_get_a_protocol_error(deployment, frames, message):
    (version, type_id), body = _raw_exchange(deployment.address, frames)
    assert version == PROTOCOL_VERSION and body["code"] == 2 and body["id"] == -1
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
