"""Conveyor's wire protocol: framing (versioned header + typed body) and the message types.

Importing this package registers every message type with the decoder."""

from common.wire import client_messages, internal_messages  # noqa: F401  (registration)
from common.wire.framing import (PROTOCOL_VERSION, EncodeError, InternalMessage, Message,
                                 ProtocolError, decode, encode)

__all__ = ["PROTOCOL_VERSION", "EncodeError", "InternalMessage", "Message", "ProtocolError",
           "decode", "encode"]
