"""The head of an instance's waiting queue that its policy is shown (SchedulingPolicy
.waiting_need): rebuilt only when the queue's front changed or the seats it was sized for ran
out, so that under overload a snapshot costs O(seats), not O(queue). A policy with an order of
its own (`WaitingNeed.rank`) is also shown the requests that lead that order (ranked.py)."""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

from common.instance.ranked import RankedWaiting
from common.scheduling.types import WaitingNeed

_order = attrgetter("order")


class WaitingHead:
    __slots__ = ("need", "views", "valid", "whole", "last_order", "ranked")

    def __init__(self, need: WaitingNeed):
        self.need = need
        self.views: tuple = ()
        self.valid = False
        self.whole = True
        """The cached head is the whole queue."""
        self.last_order = -1
        """Queue order of the cached head's last request."""
        self.ranked = RankedWaiting(need.rank) if need.rank is not None and not need.whole \
            else None

    def entered(self, req, pos: int) -> None:
        """`req` entered the queue at `pos`."""
        if self.whole or pos < len(self.views):
            self.valid = False
        if self.ranked is not None:
            self.ranked.add(req)

    def left(self, req) -> None:
        """`req` left the queue (started, finished or moved away)."""
        self.valid = False
        if self.ranked is not None:
            self.ranked.remove(req)

    def views_of(self, waiting: Sequence, num_running: int, now: float) -> tuple:
        """The requests the policy needs (each its own RequestView): the arrival-order head
        (cached until it changes) and, for a ranked need, those leading the policy's order."""
        head = self._head(waiting, num_running)
        if self.ranked is None or self.whole:
            return head
        last = self.last_order
        extra = [r for r in self.ranked.top(now, self.need.ranked) if r.order > last]
        if not extra:
            return head
        extra.sort(key=_order)
        return head + tuple(extra)

    def _head(self, waiting: Sequence, num_running: int) -> tuple:
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
        last = None
        for r in waiting:
            add(r)
            last = r
            tokens += r.num_tokens - r.computed
            if len(views) >= seats and tokens >= tokens_needed:
                whole = len(views) == len(waiting)
                break
        head = self.views = tuple(views)
        self.valid = True
        self.whole = whole
        self.last_order = last.order if last is not None else -1
        return head
