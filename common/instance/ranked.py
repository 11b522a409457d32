"""The waiting requests kept in a policy's own order (`WaitingNeed.rank`), so that a policy that
does not admit in arrival order (SLO-ODBS: slack and predicted length) is shown the few requests
that lead its order without the whole queue being sorted at every micro-batch.

The order is by lateness (not late first), then the key `static - drift * now`, then arrival,
then queue position, with `static`, `drift`, `late_from` and `late_until` fixed while a request
waits; a request is late while `late_from < now <= late_until` (past a deadline it goes behind
those that can still meet theirs, for a while only, so that it cannot starve; never, for a
policy with infinite bounds). A request's slack to a deadline is
`deadline - now`, so `a * slack + b * length` is `(a * deadline + b * length) - a * now`: its
static part does not change as the clock moves, and requests that share a drift keep their
places among themselves. So there is one list per drift (SLO-ODBS has two: requests with a TTFT
target drift at `a`, those without stay put), sorted by (static, arrival, queue position) and
kept so as requests come and go (O(log n) comparisons each), and `top` merges the lists' fronts
at `now`. A request that turns late moves to its drift's late list and back when that ends (a
heap of those times says who, when `top` is asked); the late lists come after all others.

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

from common.scheduling.types import is_late

if TYPE_CHECKING:
    from common.instance.request import CoreRequest
    from common.scheduling.types import RequestView

_END = float("inf")


class RankedWaiting:
    __slots__ = ("rank", "lanes", "keys", "expiry")

    def __init__(self, rank: Callable[["RequestView"], tuple[float, float, float, float]]):
        self.rank = rank
        self.lanes: dict[tuple[bool, float], list[tuple[float, float, int, CoreRequest]]] = {}
        """(late, drift) -> (static, arrival, queue order, request), sorted."""
        self.keys: dict[int, tuple[tuple[bool, float], float, float, float, float]] = {}
        """queue order -> (its lane, static, arrival, late_from, late_until)."""
        self.expiry: list[tuple[float, int]] = []
        """(time, queue order): when a request turns late or stops being so, soonest first."""

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, req: "CoreRequest") -> None:
        static, drift, late_from, late_until = self.rank(req)  # a request is its RequestView
        lane = (False, drift)
        insort(self.lanes.setdefault(lane, []), (static, req.arrival, req.order, req))
        self.keys[req.order] = (lane, static, req.arrival, late_from, late_until)
        for t in (late_from, late_until):
            if t < _END:
                heapq.heappush(self.expiry, (t, req.order))

    def remove(self, req: "CoreRequest") -> None:
        lane_id, static, arrival, _, _ = self.keys.pop(req.order)
        lane = self.lanes[lane_id]
        del lane[bisect_left(lane, (static, arrival, req.order))]  # sorts before the entry

    def _move_late(self, now: float) -> None:
        """Puts each request whose lateness changed by `now` in its drift's list of that
        lateness (the clock only moves on)."""
        while self.expiry and self.expiry[0][0] < now:
            _, order = heapq.heappop(self.expiry)
            entry = self.keys.get(order)
            if entry is None:
                continue  # it left
            (late, drift), static, arrival, late_from, late_until = entry
            if is_late(now, late_from, late_until) == late:
                continue  # already where it belongs (an entry of its earlier stay)
            lane = self.lanes[(late, drift)]
            req = lane.pop(bisect_left(lane, (static, arrival, order)))[3]
            insort(self.lanes.setdefault((not late, drift), []), (static, arrival, order, req))
            self.keys[order] = ((not late, drift), static, arrival, late_from, late_until)

    def top(self, now: float, k: int) -> list["CoreRequest"]:
        """The k requests first in the policy's order at `now`, and those tied with the k-th
        (see the module)."""
        if k <= 0:
            return []
        self._move_late(now)
        lanes = [(late, drift, lane) for (late, drift), lane in self.lanes.items() if lane]
        heap = [((late, lane[0][0] - drift * now), i, 0)
                for i, (late, drift, lane) in enumerate(lanes)]
        heapq.heapify(heap)
        out: list[CoreRequest] = []
        kth = (True, _END)
        while heap:
            key, i, pos = heap[0]
            if key > kth:
                break
            late, drift, lane = lanes[i]
            static = lane[pos][0]
            out.append(lane[pos][3])
            if len(out) == k:
                kth = key
            nxt = pos + 1
            if len(out) >= k and nxt - bisect_left(lane, (static,)) >= k:
                nxt = bisect_right(lane, (static, _END))  # k of this run taken: skip the rest
            if nxt < len(lane):
                heapq.heapreplace(heap, ((late, lane[nxt][0] - drift * now), i, nxt))
            else:
                heapq.heappop(heap)
        return out
