"""Property-based tests of the wire decoder (common/wire, hypothesis): whatever the frames hold,
decode returns a message or raises ProtocolError, nothing else; every message the encoder
writes decodes to itself; a refused public message is attributed to its `id` only when that id
is really there."""

from __future__ import annotations

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.wire import PROTOCOL_VERSION, EncodeError, ProtocolError, decode, encode
from common.wire.client_messages import CancelRequest, ChatMessage, GenerateRequest
from common.wire.internal_messages import (AbortRequests, Chunk, RequestOutput,
                                           RequestOutputs, SampleSpec, StepDone, StepPlan)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
i64 = st.integers(-2**63, 2**63 - 1)
u32 = st.integers(0, 2**32 - 1)
text = st.text(max_size=40)  # hypothesis' text never holds lone surrogates
floats = st.floats(allow_nan=False)


def outcome(frames):
    """'ok' or 'refused'; any other exception fails the test."""
    try:
        decode(frames)
        return "ok"
    except ProtocolError:
        return "refused"


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | floats | text | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(text, inner, max_size=5),
    max_leaves=30)


def _packable(v):
    try:
        return msgspec.msgpack.encode(v)
    except OverflowError:  # beyond 64 bits: not a msgpack value
        return msgspec.msgpack.encode(None)


@SETTINGS
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_random_bytes_are_decoded_or_refused(frames):
    assert outcome(frames) in ("ok", "refused")


@SETTINGS
@given(version=i64, type_id=i64, body=msgpack_values, extra=st.integers(0, 2))
def test_any_msgpack_body_under_any_header_is_decoded_or_refused(version, type_id, body, extra):
    frames = [msgspec.msgpack.encode((version, type_id)), _packable(body)] + [b"x"] * extra
    result = outcome(frames)
    if version != PROTOCOL_VERSION or extra:
        assert result == "refused"


generate = st.builds(
    GenerateRequest, id=i64,
    prompt=st.none() | text,
    messages=st.none() | st.lists(st.builds(ChatMessage, role=text, content=text), max_size=3),
    prompt_token_ids=st.none() | st.lists(i64, max_size=8),
    raw=st.booleans(),
    params=st.dictionaries(text, st.none() | i64 | floats | text, max_size=4),
    stream=st.booleans(), api_key=st.none() | text)
step_plan = st.builds(
    StepPlan, mb_id=i64, released=st.lists(i64, max_size=4), chunks=st.lists(st.builds(
        Chunk, req_id=i64, start=u32, num_new=u32, token_ids=st.lists(i64, max_size=6),
        new_blocks=st.lists(u32, max_size=4),
        sample=st.none() | st.builds(SampleSpec, temperature=floats, top_p=floats, top_k=i64,
                                     seed=st.none() | i64, step=u32)), max_size=4))
messages = st.one_of(
    generate, step_plan, st.builds(CancelRequest, id=i64),
    st.builds(AbortRequests, req_ids=st.lists(i64, max_size=5), reason=text),
    st.builds(StepDone, mb_id=i64, instance=i64, stage=i64, compute_s=floats, wait_s=floats,
              sampled=st.lists(i64, max_size=5), error=text,
              failed=st.dictionaries(i64, text, max_size=3)),
    st.builds(RequestOutputs, outputs=st.lists(st.builds(
        RequestOutput, req_id=i64, token_ids=st.lists(i64, max_size=4), finish=st.integers(0, 4),
        error=text, error_code=st.integers(0, 6)), max_size=4)))


@SETTINGS
@given(messages)
def test_every_encoded_message_decodes_to_itself(msg):
    assert decode(encode(msg)) == msg


@SETTINGS
@given(messages, st.data())
def test_truncated_or_corrupted_bodies_are_refused_or_decoded(msg, data):
    header, body = encode(msg)
    cut = data.draw(st.integers(0, max(0, len(body) - 1)))
    assert outcome([header, body[:cut]]) in ("ok", "refused")
    if body:
        at = data.draw(st.integers(0, len(body) - 1))
        flipped = body[:at] + bytes([body[at] ^ data.draw(st.integers(1, 255))]) + body[at + 1:]
        assert outcome([header, flipped]) in ("ok", "refused")


@SETTINGS
@given(depth=st.integers(1, 20_000), opener=st.sampled_from([b"\x91", b"\x81\xa1k"]))
def test_nesting_at_any_depth_is_decoded_or_refused(depth, opener):
    header = encode(GenerateRequest(id=1))[0]
    assert outcome([header, opener * depth + b"\xc0"]) in ("ok", "refused")


@SETTINGS
@given(st.sampled_from([b"\xdb", b"\xdd", b"\xdf", b"\xc6", b"\xc5", b"\xda", b"\xdc", b"\xde"]),
       st.integers(0, 2**32 - 1), st.binary(max_size=16))
def test_huge_declared_lengths_are_refused(marker, length, tail):
    size = 2 if marker in (b"\xc5", b"\xda", b"\xdc", b"\xde") else 4
    body = marker + (length % 2**(8 * size)).to_bytes(size, "big") + tail
    if len(tail) < length % 2**(8 * size):
        assert outcome([encode(GenerateRequest(id=1))[0], body]) == "refused"


@SETTINGS
@given(i64, st.dictionaries(st.sampled_from(["prompt", "stream", "raw", "zzz"]),
                            st.integers() | st.binary(max_size=4), min_size=1))
def test_a_refused_request_names_its_id_only_when_it_has_one(rid, bad):
    body = msgspec.msgpack.encode({"id": rid, **{k: _unpackable_safe(v) for k, v in bad.items()}})
    try:
        decode([encode(GenerateRequest(id=0))[0], body])
    except ProtocolError as e:
        assert e.request_id == rid
    try:
        decode([encode(GenerateRequest(id=0))[0], msgspec.msgpack.encode({"prompt": 3})])
    except ProtocolError as e:
        assert e.request_id is None


def _unpackable_safe(v):
    return v if not isinstance(v, int) or -2**63 <= v < 2**64 else 0


@SETTINGS
@given(st.integers(2**64, 2**80) | st.integers(-2**80, -2**63 - 1))
def test_integers_beyond_the_wire_are_an_encode_error(n):
    try:
        encode(CancelRequest(id=n))
    except EncodeError as e:
        assert "outside the integers the wire carries" in str(e)
    else:
        raise AssertionError("encoded an integer the wire cannot carry")
