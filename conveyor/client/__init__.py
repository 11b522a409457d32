"""Conveyor's TCP client SDK (ZeroMQ): `Client` (blocking) and `AsyncClient` (asyncio)."""

from conveyor.client.async_client import DEFAULT_ADDRESS, AsyncClient, AsyncStream
from conveyor.client.errors import (AuthenticationError, ConnectionFailed, ConveyorError, InvalidRequestError,
                                    NotReadyError, OverloadedError, ProtocolError,
                                    RequestTimeout, ServerError)
from conveyor.client.sync_client import Client, Stream
from conveyor.client.types import GenerationResult, Health, StreamDelta

__all__ = ["DEFAULT_ADDRESS", "AsyncClient", "AuthenticationError", "AsyncStream", "Client", "ConnectionFailed",
           "ConveyorError", "GenerationResult", "Health", "InvalidRequestError",
           "NotReadyError", "OverloadedError", "ProtocolError", "RequestTimeout", "ServerError",
           "Stream", "StreamDelta"]
