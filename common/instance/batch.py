"""A micro-batch in an instance's pipeline, as the instance core dispatched it: who gets a
token from it, who has a prompt chunk in it, and the shape its cost depends on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.instance.views import make_inflight

if TYPE_CHECKING:
    from common.instance.request import CoreRequest


class CoreBatch:
    """A micro-batch in the pipeline and the shape its cost depends on."""

    __slots__ = ("mb_id", "sampling", "partial", "chunks", "iview", "decode", "prefill",
                 "context", "keys", "longest")

    def __init__(self, mb_id: int, sampling: list, partial: list,
                 chunks: list | None, decode: int, prefill: int, context: int, keys: int,
                 longest: int):
        self.mb_id = mb_id
        self.sampling: list[CoreRequest] = sampling
        """Requests that get a token from this micro-batch, in chunk order."""
        self.partial: list[CoreRequest] = partial
        """Requests with a non-final prefill chunk here (ready while it is in flight)."""
        self.chunks: list[tuple[CoreRequest, int, int, int]] | None = chunks
        """(request, start, tokens, new blocks) per chunk, when the core keeps details."""
        self.decode = decode
        self.prefill = prefill
        self.context = context
        """Sum of the decodes' contexts."""
        self.keys = keys
        """Query-key pairs of the prefill tokens."""
        self.longest = longest
        """Longest decode context."""
        self.iview = make_inflight(decode, prefill)
        """What a policy sees of it while it is in flight."""

    @property
    def requests(self) -> list[CoreRequest]:
        return self.sampling + self.partial
