"""The framing of wire messages: round trips and every way a frame can be bad."""

import msgspec
import pytest

from common.wire import PROTOCOL_VERSION, ProtocolError, decode, encode
from common.wire.client_messages import GenerateRequest, TokenDelta
from common.wire.internal_messages import Chunk, SampleSpec, StepPlan


def test_round_trip_public_and_internal_messages():
    req = GenerateRequest(id=7, prompt="hi", params={"max_tokens": 3}, stream=False)
    plan = StepPlan(3, [Chunk(1, 0, 2, [5, 6], [0], SampleSpec(0.0, 1.0, 0, None, 0))], [9])
    for msg in (req, plan, TokenDelta(7, "é", [1, 2])):
        decoded, buffers = decode(encode(msg))
        assert decoded == msg and buffers == []


def test_public_messages_are_maps_internal_are_arrays():
    body = encode(GenerateRequest(id=1, prompt="x"))[1]
    assert isinstance(msgspec.msgpack.decode(body), dict)
    assert isinstance(msgspec.msgpack.decode(encode(StepPlan(1, [], []))[1]), list)


def test_buffers_travel_beside_the_body():
    msg, buffers = decode(encode(TokenDelta(1, "", []), [b"raw"]))
    assert bytes(buffers[0]) == b"raw"


@pytest.mark.parametrize("frames, expected", [
    ([b"only one"], "expected a header and a body frame"),
    ([b"\xc1", b""], "malformed header frame"),
    ([msgspec.msgpack.encode((PROTOCOL_VERSION + 1, 1)), b""],
     f"unsupported protocol version {PROTOCOL_VERSION + 1}; this peer speaks version "
     f"{PROTOCOL_VERSION}"),
    ([msgspec.msgpack.encode((PROTOCOL_VERSION, 9999)), b""], "unknown message type 9999"),
])
def test_bad_headers_are_explained(frames, expected):
    with pytest.raises(ProtocolError, match=expected.replace("(", r"\(")):
        decode(frames)


def test_truncated_and_mistyped_bodies_are_explained():
    header, body = encode(GenerateRequest(id=1, prompt="hello there"))
    with pytest.raises(ProtocolError, match="malformed or truncated GenerateRequest body"):
        decode([header, body[:-4]])
    wrong = msgspec.msgpack.encode({"id": "one"})
    with pytest.raises(ProtocolError, match=r"invalid GenerateRequest message: Expected `int`, "
                                            r"got `str` - at `\$.id`"):
        decode([header, wrong])
    extra = msgspec.msgpack.encode({"id": 1, "bogus": True})
    with pytest.raises(ProtocolError, match="unknown field `bogus`"):
        decode([header, extra])
