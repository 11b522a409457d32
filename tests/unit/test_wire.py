"""The framing of wire messages: round trips and every way a frame can be bad."""

import random

import msgspec
import pytest

from common.wire import PROTOCOL_VERSION, EncodeError, ProtocolError, decode, encode, framing
from common.wire.client_messages import ChatMessage, GenerateRequest, HealthReply, TokenDelta
from common.wire.internal_messages import Chunk, Hello, SampleSpec, StepPlan


def test_round_trip_public_and_internal_messages():
    req = GenerateRequest(id=7, prompt="hi", params={"max_tokens": 3}, stream=False)
    plan = StepPlan(3, [Chunk(1, 0, 2, [5, 6], [0], SampleSpec(0.0, 1.0, 0, None, 0))], [9])
    for msg in (req, plan, TokenDelta(7, "é", [1, 2])):
        assert decode(encode(msg)) == msg


def test_public_messages_are_maps_internal_are_arrays():
    body = encode(GenerateRequest(id=1, prompt="x"))[1]
    assert isinstance(msgspec.msgpack.decode(body), dict)
    assert isinstance(msgspec.msgpack.decode(encode(StepPlan(1, [], []))[1]), list)


@pytest.mark.parametrize("frames, expected", [
    ([b"only one"], "expected a header and a body frame"),
    (encode(TokenDelta(1, "", [])) + [b"extra"], "expected a header and a body frame, got 3"),
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


def test_a_reply_with_a_field_this_sdk_does_not_know_is_read_without_it():
    """A newer ingress's HealthReply may carry a field added since: the SDK reads the rest."""
    header, _ = encode(HealthReply(id=3, ready=True, model="m", stages=2, instances=1,
                                   policy="throttle", max_model_len=2048))
    newer = msgspec.msgpack.encode({"id": 3, "ready": True, "model": "m", "stages": 2,
                                    "instances": 1, "policy": "throttle",
                                    "max_model_len": 2048, "added_later": [1, 2]})
    reply = decode([header, newer])
    assert isinstance(reply, HealthReply) and reply.ready and reply.max_model_len == 2048


# ---- nothing a frame holds gets past decode() as anything but ProtocolError ----------------

def _nested(depth: int, leaf: bytes = b"\x00") -> bytes:
    return b"\x91" * depth + leaf  # fixarray of one element, `depth` times


@pytest.mark.parametrize("depth", [5_000, 1_000_000])
def test_deeply_nested_bodies_are_refused(depth):
    # params is a map of anything, so nesting reaches msgspec's recursion (a RecursionError
    # took the whole ingress down before); one byte per level makes it cheap to send.
    header = encode(GenerateRequest(id=1))[0]
    body = b"\x82\xa2id\x01\xa6params\x81\xa1x" + _nested(depth)
    with pytest.raises(ProtocolError, match="GenerateRequest body is nested too deeply"):
        decode([header, body])
    hello = encode(Hello("stage"))
    # Hello.detail (an Any map, the array's fifth element, `{}`) nested, `again` after it.
    assert hello[1][-2:] == b"\x80\xc2"
    deep_detail = hello[1][:-2] + b"\x81\xa1x" + _nested(depth) + b"\xc2"
    with pytest.raises(ProtocolError, match="Hello body is nested too deeply"):
        decode([hello[0], deep_detail])
    with pytest.raises(ProtocolError, match="malformed header frame"):
        decode([_nested(depth), body])


def test_sizes_claimed_beyond_the_frame_are_refused_without_allocating():
    header = encode(GenerateRequest(id=1))[0]
    for claim in (b"\xdd\xff\xff\xff\xff",      # array of 2**32 - 1 items
                  b"\xdb\xff\xff\xff\xff",      # string of 4 GiB
                  b"\x82\xa2id\x01\xa6params\x81\xa1x\xc6\xff\xff\xff\xff"):  # 4 GiB binary
        with pytest.raises(ProtocolError, match="GenerateRequest"):
            decode([header, claim])


@pytest.mark.parametrize("body, expected", [
    (msgspec.msgpack.encode(5), "invalid GenerateRequest message: Expected `object`, got `int`"),
    (msgspec.msgpack.encode({"id": 1, "prompt": 3}), "Expected `str | null`, got `int`"),
    (msgspec.msgpack.encode({"id": 1, "prompt_token_ids": [1, "2"]}),
     r"Expected `int`, got `str` - at `\$.prompt_token_ids\[1\]`"),
    (msgspec.msgpack.encode({"id": 1}) + b"\x00", "malformed or truncated GenerateRequest body"),
    (b"\x82\xa2id\x01\xa6prompt\xa3\xed\xa0\x80", "Invalid UTF-8"),  # a surrogate in WTF-8
])
def test_wrongly_typed_bodies_are_explained(body, expected):
    with pytest.raises(ProtocolError, match=expected):
        decode([encode(GenerateRequest(id=1))[0], body])


def test_header_of_the_wrong_shape():
    for header in ([1], ["1", 1], [1, 1, 1], {"v": 1}):
        with pytest.raises(ProtocolError, match="malformed header frame"):
            decode([msgspec.msgpack.encode(header), b"\x80"])


def test_any_other_decoder_failure_is_a_protocol_error(monkeypatch):
    class Exhausted:
        def decode(self, data):
            raise MemoryError("no room for it")

    monkeypatch.setitem(framing._REGISTRY, GenerateRequest.TYPE_ID, (GenerateRequest, Exhausted()))
    with pytest.raises(ProtocolError, match="undecodable GenerateRequest body: MemoryError: no "
                                            "room for it"):
        decode(encode(GenerateRequest(id=1)))


def test_random_frames_raise_only_protocol_errors():
    rng = random.Random(7)
    valid = [encode(m) for m in (GenerateRequest(id=3, prompt="hi", params={"top_k": 4}),
                                 StepPlan(1, [Chunk(1, 0, 1, [5], [0], None)], []),
                                 Hello("stage", 0, 1, 8, {"pid": 3}))]
    for _ in range(3000):
        header, body = (bytearray(f) for f in rng.choice(valid))
        target = rng.choice((header, body))
        for _ in range(rng.randint(1, 4)):
            if target:
                target[rng.randrange(len(target))] = rng.randrange(256)
        if rng.random() < 0.3:
            del body[rng.randrange(len(body) + 1):]
        try:
            decode([bytes(header), bytes(body)])
        except ProtocolError:
            pass


# ---- values the wire cannot carry are refused when encoding, naming the field -------------

@pytest.mark.parametrize("msg, expected", [
    (GenerateRequest(id=1, prompt="hi", params={"max_tokens": 2**70}),
     r"params.max_tokens = 1180591620717411303424 is outside the integers the wire carries"),
    (GenerateRequest(id=1, prompt="hi", params={"stop": ["ok", "a\ud800"]}),
     r"params.stop\[1\] contains a lone surrogate U\+D800 at character 1"),
    (GenerateRequest(id=1, messages=[ChatMessage("user", "\udfff")]),
     r"messages\[0\].content contains a lone surrogate U\+DFFF at character 0"),
    (GenerateRequest(id=-2**64), r"id = -18446744073709551616 is outside"),
])
def test_unencodable_values_are_named(msg, expected):
    with pytest.raises(EncodeError, match="GenerateRequest cannot be encoded: " + expected):
        encode(msg)


def test_a_public_body_with_a_bad_field_still_names_its_request():
    header = encode(GenerateRequest(id=1))[0]
    with pytest.raises(ProtocolError) as bad_field:
        decode([header, msgspec.msgpack.encode({"id": 42, "prompt": ["not", "text"]})])
    assert bad_field.value.request_id == 42 and "$.prompt" in str(bad_field.value)
    with pytest.raises(ProtocolError) as truncated:
        decode([header, encode(GenerateRequest(id=42, prompt="a prompt"))[1][:-3]])
    assert truncated.value.request_id is None
    internal = encode(StepPlan(1, [], []))
    with pytest.raises(ProtocolError) as inner:
        decode([internal[0], msgspec.msgpack.encode({"id": 3})])
    assert inner.value.request_id is None  # internal peers' errors are never attributed


def test_a_health_reply_without_a_frame_limit_gets_the_default():
    """An ingress older than HealthReply.max_frame_bytes does not send it: the SDK then assumes
    the ingress default, which every such ingress had unless configured otherwise."""
    older = msgspec.msgpack.encode({"id": 3, "ready": True, "model": "m", "stages": 2,
                                    "instances": 1, "policy": "fcfs", "max_model_len": 2048})
    reply = decode([msgspec.msgpack.encode([PROTOCOL_VERSION, HealthReply.TYPE_ID]), older])
    assert isinstance(reply, HealthReply) and reply.max_frame_bytes == 16 * 2**20
    assert decode(encode(msgspec.structs.replace(reply, max_frame_bytes=0))).max_frame_bytes == 0
