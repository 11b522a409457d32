"""The waiting requests kept in a policy's own order (`WaitingNeed.rank`), so that a policy that
does not admit in arrival order (SLO-ODBS: slack and predicted length) is shown the few requests
that lead its order without the whole queue being sorted at every micro-batch.

The order is by the key `static - drift * now`, then arrival, then queue position, with
`static` and `drift` fixed while a request waits. A request's slack to a deadline is
`deadline - now`, so `a * slack + b * length` is `(a * deadline + b * length) - a * now`: its
static part does not change as the clock moves, and requests that share a drift keep their
places among themselves. So there is one list per drift (SLO-ODBS has two: requests with a TTFT
target drift at `a`, those without stay put), sorted by (static, arrival, queue position) and
kept so as requests come and go (O(log n) comparisons each), and `top` merges the lists' fronts
at `now`.

Exactly the policy's first k, float rounding included: the key is computed as the policy
computes it, and `static - c` rounds monotonically in `static`, so a list is in key order; its
requests of equal static are in the policy's order (arrival, then queue position). Ties of the
k-th key (across lists, or statics a rounding apart) may be in another order, so `top` also
returns every request whose key equals the k-th's, but no more than k of one equal-static run
(the rest of a run comes after those). The policy sorts what it is shown and takes its first k.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.instance.request import CoreRequest
    from common.scheduling.types import RequestView

_END = float("inf")


class RankedWaiting:
    __slots__ = ("rank", "lanes", "keys")

    def __init__(self, rank: Callable[["RequestView"], tuple[float, float]]):
        self.rank = rank
        self.lanes: dict[float, list[tuple[float, float, int, CoreRequest]]] = {}
        """drift -> (static, arrival, queue order, request), sorted."""
        self.keys: dict[int, tuple[float, float]] = {}
        """queue order -> (drift, static), as the request was ranked when it entered."""

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, req: "CoreRequest") -> None:
        static, drift = self.rank(req)  # a request is its own RequestView
        insort(self.lanes.setdefault(drift, []), (static, req.arrival, req.order, req))
        self.keys[req.order] = (drift, static)

    def remove(self, req: "CoreRequest") -> None:
        drift, static = self.keys.pop(req.order)
        lane = self.lanes[drift]
        del lane[bisect_left(lane, (static, req.arrival, req.order))]  # sorts before the entry

    def top(self, now: float, k: int) -> list["CoreRequest"]:
        """The k requests first in the policy's order at `now`, and those tied with the k-th
        (see the module)."""
        if k <= 0:
            return []
        lanes = [(drift, lane) for drift, lane in self.lanes.items() if lane]
        heap = [(lane[0][0] - drift * now, i, 0) for i, (drift, lane) in enumerate(lanes)]
        heapq.heapify(heap)
        out: list[CoreRequest] = []
        kth = _END
        while heap:
            key, i, pos = heap[0]
            if key > kth:
                break
            drift, lane = lanes[i]
            static = lane[pos][0]
            out.append(lane[pos][3])
            if len(out) == k:
                kth = key
            nxt = pos + 1
            if len(out) >= k and nxt - bisect_left(lane, (static,)) >= k:
                nxt = bisect_right(lane, (static, _END))  # k of this run taken: skip the rest
            if nxt < len(lane):
                heapq.heapreplace(heap, (lane[nxt][0] - drift * now, i, nxt))
            else:
                heapq.heappop(heap)
        return out
