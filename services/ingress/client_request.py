"""A client's request as the ingress holds it from receipt to its last reply, and the ways a
request is refused before it is served (each with its error code and metric reason)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.wire.client_messages import ErrorCode, TokenDelta
from common.wire.framing import Message
from services.ingress.detokenizer import IncrementalDetokenizer
from services.ingress.queue_bounds import Overloaded
from services.ingress.validation import CheckedRequest, InvalidRequest


class Unauthorized(Exception):
    pass


class Draining(Overloaded):
    """The ingress is shutting down: retry elsewhere (or once it is back)."""


class ControllerUnavailable(Exception):
    """The controller did not answer a status query (NOT_READY)."""


REFUSALS = ((InvalidRequest, ErrorCode.INVALID_REQUEST, "invalid"),
            (Unauthorized, ErrorCode.UNAUTHORIZED, "unauthorized"),
            (Draining, ErrorCode.OVERLOADED, "draining"),
            (Overloaded, ErrorCode.OVERLOADED, "overloaded"))
"""Each kind of refusal: its error code and its `rejected` metric's reason."""


def refusal(error: Exception) -> tuple[ErrorCode, str] | None:
    return next(((code, reason) for cls, code, reason in REFUSALS if isinstance(error, cls)),
                None)


@dataclass(eq=False)
class ClientRequest:
    identity: bytes
    client_id: int
    req_id: int
    stream: bool
    checked: CheckedRequest
    detok: IncrementalDetokenizer
    prompt_tokens: int = 0
    received: float = field(default_factory=time.time)
    first_token: float | None = None
    tokens_streamed: int = 0
    submitted: bool = False
    """Sent to the controller (before that, it is waiting for admission)."""
    closed: bool = False
    """Finished, cancelled or lost: admission drops it if it is still waiting."""
    sink: Callable[[Message], None] | None = None
    """Where its replies go: None for the ZeroMQ client `identity`, else the HTTP handler's."""
    queued: bool = True
    """Counted in the queue bounds (until its first token)."""
    queued_tokens: int = 0

    def stream_delta(self, final: bool = False) -> TokenDelta | None:
        """What the client has not seen yet, as one TokenDelta (None when there is nothing)."""
        text = self.detok.take_delta(final)
        tokens = self.detok.token_ids[self.tokens_streamed:]
        if not text and not tokens:
            return None
        self.tokens_streamed += len(tokens)
        return TokenDelta(self.client_id, text, tokens)
