"""Framing of every Conveyor message on ZeroMQ: a versioned header frame, then a typed body.

    frame 0  header  msgpack [PROTOCOL_VERSION, message type id]
    frame 1  body    msgpack of the message struct (arrays of fields, see each struct)

Any other number of frames is refused. (Activations never travel here: they go stage to stage
over torch.distributed.)

The header is decoded first and on its own, so a peer speaking another version gets a precise
error ("protocol version 2, this server speaks 1") instead of a confusing schema mismatch.
Bodies are decoded by msgspec against the struct registered for the type id, so a missing field,
a wrong type or an unknown field is reported with its path.

Whatever a frame holds, decoding it raises ProtocolError and nothing else: a body nested too
deeply (msgspec recurses, and a few kilobytes of msgpack can reach Python's recursion limit),
an allocation that fails, or any other error is a refused frame, never a dead process. Every
receiver (common.zmq_io.Endpoint, the stage worker's loop) relies on that.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import msgspec

from common.wire.values import unencodable

PROTOCOL_VERSION = 2

_header_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(tuple[int, int])
_body_encoder = msgspec.msgpack.Encoder()


class ProtocolError(ValueError):
    """A frame could not be decoded: wrong version, unknown type, malformed or truncated body.
    `request_id` is the body's `id` when it could still be read (a public message with a bad
    field), so the refusal reaches that request alone; None otherwise."""

    def __init__(self, message: str, request_id: int | None = None):
        super().__init__(message)
        self.request_id = request_id


class _IdOnly(msgspec.Struct):
    """A public message's `id`, its other fields skipped."""

    id: int


_id_decoder = msgspec.msgpack.Decoder(_IdOnly)


def _request_id(body: bytes | memoryview) -> int | None:
    try:
        return _id_decoder.decode(body).id
    except Exception:  # no readable id: the refusal cannot be attributed
        return None


class EncodeError(ValueError):
    """A message holds a value the wire cannot carry (an integer beyond 64 bits, a string with
    a lone surrogate, an object msgpack has no form for); the message names the field."""


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


def encode(msg: Message) -> list[Any]:
    """The frames of one message (identity frames, if any, are the caller's business)."""
    header = _header_encoder.encode((PROTOCOL_VERSION, msg.TYPE_ID))
    try:
        body = _body_encoder.encode(msg)
    except (OverflowError, UnicodeEncodeError, TypeError) as e:
        where = unencodable(msgspec.to_builtins(msg)) if not isinstance(e, TypeError) else None
        raise EncodeError(f"{type(msg).__name__} cannot be encoded: {where or e}") from None
    return [header, body]


def decode(frames: Sequence[bytes | memoryview]) -> Message:
    """Decodes [header, body]; raises ProtocolError with a readable reason."""
    if len(frames) != 2:
        raise ProtocolError(f"expected a header and a body frame, got {len(frames)} frame(s)")
    version, type_id = _decode(_header_decoder, frames[0], "header frame",
                               "malformed header frame", "malformed header frame")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {version}; this peer speaks version {PROTOCOL_VERSION}")
    entry = _REGISTRY.get(type_id)
    if entry is None:
        raise ProtocolError(f"unknown message type {type_id}")
    cls, decoder = entry
    name = cls.__name__
    try:
        return _decode(decoder, frames[1], f"{name} body", f"invalid {name} message",
                       f"malformed or truncated {name} body")
    except ProtocolError as e:
        if issubclass(cls, InternalMessage):
            raise
        raise ProtocolError(str(e), _request_id(frames[1])) from None


def _decode(decoder: msgspec.msgpack.Decoder, data: bytes | memoryview, what: str,
            invalid: str, malformed: str) -> Any:
    """`invalid` and `malformed` prefix schema errors and msgpack syntax errors."""
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"{invalid}: {e}") from None
    except msgspec.DecodeError as e:
        raise ProtocolError(f"{malformed}: {e}") from None
    except RecursionError:
        raise ProtocolError(f"{what} is nested too deeply (more than about "
                            f"{sys.getrecursionlimit()} levels of arrays or maps)") from None
    except Exception as e:  # MemoryError, or anything else msgspec may raise: refuse the frame
        raise ProtocolError(f"undecodable {what}: {type(e).__name__}: {e}") from None


def type_name(type_id: int) -> str:
    entry = _REGISTRY.get(type_id)
    return entry[0].__name__ if entry else f"type {type_id}"
