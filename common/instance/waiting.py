"""The head of an instance's waiting queue that its policy is shown (SchedulingPolicy
.waiting_need): rebuilt only when the queue's front changed or the seats it was sized for ran
out, so that under overload a snapshot costs O(seats), not O(queue)."""

from __future__ import annotations

from collections.abc import Sequence

from common.scheduling.types import WaitingNeed


class WaitingHead:
    __slots__ = ("need", "views", "valid", "whole")

    def __init__(self, need: WaitingNeed):
        self.need = need
        self.views: tuple = ()
        self.valid = False
        self.whole = True
        """The cached head is the whole queue."""

    def queued_at(self, pos: int) -> None:
        """A request entered the queue at `pos`."""
        if self.whole or pos < len(self.views):
            self.valid = False

    def views_of(self, waiting: Sequence, num_running: int) -> tuple:
        """The head the policy needs, as its requests (which are their own RequestViews),
        cached until the queue's front or the seats change."""
        need = self.need
        if self.valid:
            if need.max_num_seqs is None or self.whole:
                return self.views
            if len(self.views) > need.max_num_seqs - num_running:  # still enough seats
                return self.views
        if need.whole:
            seats = tokens_needed = 1 << 62
        else:
            seats = need.min_requests
            if need.max_num_seqs is not None:
                seats = max(need.max_num_seqs - num_running + 1, seats)
            tokens_needed = need.tokens
        views = []
        add = views.append
        tokens = 0
        whole = True
        for r in waiting:
            add(r)
            tokens += r.num_tokens - r.computed
            if len(views) >= seats and tokens >= tokens_needed:
                whole = len(views) == len(waiting)
                break
        head = self.views = tuple(views)
        self.valid = True
        self.whole = whole
        return head
