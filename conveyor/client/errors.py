"""Typed exceptions of the client SDK. Server-side refusals carry the server's message."""

from __future__ import annotations

from common.wire.client_messages import ErrorCode


class ConveyorError(Exception):
    """Base of every SDK error."""

    code: int | None = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequestError(ConveyorError):
    """The server refused the request as given (bad parameter, prompt too long, ...)."""

    code = ErrorCode.INVALID_REQUEST


class ProtocolError(ConveyorError):
    """The server could not decode what this client sent (version or schema mismatch)."""

    code = ErrorCode.PROTOCOL


class OverloadedError(ConveyorError):
    """The server's queue is full, or it is shutting down: retry later (or elsewhere)."""

    code = ErrorCode.OVERLOADED


class AuthenticationError(ConveyorError):
    """The deployment has API keys and the client's `api_key` is not one of them."""

    code = ErrorCode.UNAUTHORIZED


class NotReadyError(ConveyorError):
    """The deployment is still starting, or its controller did not answer."""

    code = ErrorCode.NOT_READY


class ServerError(ConveyorError):
    """The deployment failed while serving the request."""

    code = ErrorCode.INTERNAL


class ConnectionFailed(ConveyorError):
    """No ingress answered at the address."""


class RequestTimeout(ConveyorError):
    """The request did not finish within its timeout; it was cancelled on the server."""


_BY_CODE = {cls.code: cls for cls in
            (InvalidRequestError, ProtocolError, OverloadedError, NotReadyError, ServerError,
             AuthenticationError)}


def error_from_reply(code: int, message: str) -> ConveyorError:
    return _BY_CODE.get(code, ServerError)(message)
