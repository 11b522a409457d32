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
                 "context", "keys", "longest", "stages_done", "deadline", "stage_ends",
                 "dispatched")

    def __init__(self, mb_id: int, sampling: list, partial: list,
                 chunks: list | None, decode: int, prefill: int, context: int, keys: int,
                 longest: int, deadline: float = float("inf"), dispatched: float = 0.0):
        self.mb_id = mb_id
        self.dispatched = dispatched
        """When the core committed it (the driver's clock)."""
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
        self.stages_done = 0
        """Stages that have reported it done (common/instance/feedback.py)."""
        self.deadline = deadline
        """The plan's deadline (MicroBatchPlan.deadline)."""
        self.stage_ends: list[tuple[float, float, float]] | None = None
        """The simulator's: (end, compute, wait) of each stage, logged at dispatch and
        reported to the feedback once its clock passes each end (conveyor/sim/state.py)."""
        self.iview = make_inflight(decode, prefill, 0, deadline)
        """What a policy sees of it while it is in flight."""

    def stage_reported(self, stage: int) -> None:
        """Stage `stage` is done with it (so every stage before it is too: a report may
        overtake an earlier stage's on its way to the controller)."""
        if stage >= self.stages_done:
            self.stages_done = stage + 1
            self.iview = make_inflight(self.decode, self.prefill, stage + 1, self.deadline)

    @property
    def requests(self) -> list[CoreRequest]:
        return self.sampling + self.partial
