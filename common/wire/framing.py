"""Framing of every Conveyor message on ZeroMQ: a versioned header frame, then a typed body.

    frame 0  header  msgpack [PROTOCOL_VERSION, message type id]
    frame 1  body    msgpack of the message struct (arrays of fields, see each struct)
    frame 2+ buffers optional raw byte payloads (zero-copy), referenced by the body

The header is decoded first and on its own, so a peer speaking another version gets a precise
error ("protocol version 2, this server speaks 1") instead of a confusing schema mismatch.
Bodies are decoded by msgspec against the struct registered for the type id, so a missing field,
a wrong type or an unknown field is reported with its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import msgspec

PROTOCOL_VERSION = 1

_header_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(tuple[int, int])
_body_encoder = msgspec.msgpack.Encoder()


class ProtocolError(ValueError):
    """A frame could not be decoded: wrong version, unknown type, malformed or truncated body."""


class Message(msgspec.Struct, forbid_unknown_fields=True):
    """Base of every wire message. Subclasses set TYPE_ID, unique across the protocol.

    Public messages (client SDK <-> ingress) are msgpack maps keyed by field name, readable by
    any msgpack client and explicit about unknown fields."""

    TYPE_ID: ClassVar[int] = -1


class InternalMessage(Message, array_like=True):
    """Messages between Conveyor's own processes: msgpack arrays, smaller and faster to code."""


_REGISTRY: dict[int, tuple[type[Message], msgspec.msgpack.Decoder]] = {}

M = TypeVar("M", bound=type[Message])


def register(cls: M) -> M:
    """Class decorator: makes `cls` decodable by its TYPE_ID."""
    tid = cls.TYPE_ID
    if tid < 0 or tid in _REGISTRY:
        raise RuntimeError(f"{cls.__name__}: TYPE_ID {tid} is invalid or already taken")
    _REGISTRY[tid] = (cls, msgspec.msgpack.Decoder(cls))
    return cls


def encode(msg: Message, buffers: Sequence[bytes | memoryview] = ()) -> list[Any]:
    """The frames of one message (identity frames, if any, are the caller's business)."""
    header = _header_encoder.encode((PROTOCOL_VERSION, msg.TYPE_ID))
    return [header, _body_encoder.encode(msg), *buffers]


def decode(frames: Sequence[bytes | memoryview]) -> tuple[Message, list[bytes | memoryview]]:
    """Decodes [header, body, *buffers]; raises ProtocolError with a readable reason."""
    if len(frames) < 2:
        raise ProtocolError(f"expected a header and a body frame, got {len(frames)} frame(s)")
    try:
        version, type_id = _header_decoder.decode(frames[0])
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"malformed header frame: {e}") from None
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {version}; this peer speaks version {PROTOCOL_VERSION}")
    entry = _REGISTRY.get(type_id)
    if entry is None:
        raise ProtocolError(f"unknown message type {type_id}")
    cls, decoder = entry
    try:
        return decoder.decode(frames[1]), list(frames[2:])
    except msgspec.ValidationError as e:
        raise ProtocolError(f"invalid {cls.__name__} message: {e}") from None
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed or truncated {cls.__name__} body: {e}") from None


def type_name(type_id: int) -> str:
    entry = _REGISTRY.get(type_id)
    return entry[0].__name__ if entry else f"type {type_id}"
