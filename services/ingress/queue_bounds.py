"""Admission control: bounds on the requests a deployment holds queued, beyond which a new one
is refused at once (ErrorCode.OVERLOADED; HTTP 503 with Retry-After) rather than waiting
behind more work than it could ever get through in time.

A request is *queued* from its receipt until its first token: waiting for tokenization, at
the controller's waiting queues, or in its prefill. Those are the requests a new one would
wait behind. Two bounds: their number, and their prompt tokens (known once tokenized). A
request alone in the queue is always let in, so no prompt is refused for its size alone.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class Overloaded(Exception):
    pass


@dataclass
class QueueBounds:
    max_requests: int
    max_prompt_tokens: int
    requests: int = 0
    prompt_tokens: int = 0
    rejected: Counter = field(default_factory=Counter)
    """Refusals by reason (overloaded, invalid, unauthorized, draining): a metric."""

    def enter(self) -> None:
        """A request arrives; raises Overloaded when the queue is full."""
        if self.requests >= self.max_requests:
            raise Overloaded(f"the server is overloaded: {self.requests} requests are queued "
                             f"(ingress.max_queued_requests = {self.max_requests}); retry later")
        self.requests += 1

    def add_prompt(self, tokens: int) -> None:
        """A queued request's prompt is tokenized; raises Overloaded (the caller then calls
        `leave(0)`) when its tokens would pass the bound and others are queued."""
        if self.requests > 1 and self.prompt_tokens + tokens > self.max_prompt_tokens:
            raise Overloaded(f"the server is overloaded: {self.prompt_tokens} prompt tokens "
                             f"are queued and this request adds {tokens} "
                             f"(ingress.max_queued_prompt_tokens = {self.max_prompt_tokens}); "
                             f"retry later")
        self.prompt_tokens += tokens

    def leave(self, tokens: int) -> None:
        """A queued request got its first token, or ended before it."""
        self.requests -= 1
        self.prompt_tokens -= tokens
