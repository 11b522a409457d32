"""Moving a request between instances (CascadeInfer's migrations, Llumnix's balancing): part of
the InstanceCore (core.py), apart by idea. `detach` takes a live request out of one core with
the KV it holds; `adopt` puts it into another; `reserve` holds blocks for a request whose KV is
being copied in before it is adopted.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from common.instance.request import CoreRequest, order_key as _order

if TYPE_CHECKING:
    from common.instance.core import InstanceCore


def remaining_load(req: CoreRequest) -> int:
    """What a request adds to its instance's `load`: its known tokens not yet computed plus
    the tokens it may still generate."""
    return (req.num_tokens - req.computed) + (req.max_tokens - req.out)


class Moves:
    """InstanceCore's migration methods (the state they use is InstanceCore's)."""

    def detach(self: InstanceCore, req_id: int, now: float) -> CoreRequest:
        """Takes a live request out of this instance to move it to another (`adopt`): it leaves
        its queue, its blocks go back to this pool (through on_release, as a finished
        request's do) and its load leaves with it. It keeps `computed` and `blocks`: the KV it
        carries, which the destination takes. Refused while a micro-batch in flight holds it
        (its token is not back yet)."""
        req = self.by_id.get(req_id)
        if req is None or req.finished:
            raise ValueError(f"request {req_id} is not live on instance {self.index}")
        if req.inflight:
            raise ValueError(f"request {req_id} is in a micro-batch in flight on instance "
                             f"{self.index}: detach it once its token is back")
        self.load -= remaining_load(req)
        if req.running:
            self._drop_ready(req)
            self.free_blocks += req.blocks
            self.num_running -= 1
            if self.on_release is not None:
                self.on_release(req)
            req.running = False
            self.head.valid = False
        else:
            self.waiting.remove(req)
            self.head.left(req)
        del self.by_id[req_id]
        if not self.by_id:
            self.metrics.pending[self.index].update(False, now)
        return req

    def adopt(self: InstanceCore, req: CoreRequest, now: float) -> None:
        """Takes a request detached from another instance, with the KV it carries
        (`req.blocks` blocks, `req.computed` tokens): running if it has KV, waiting
        otherwise. Its prediction and timings travel with it."""
        if req.req_id in self.by_id:
            raise ValueError(f"request {req.req_id} is already on instance {self.index}")
        if req.blocks > self.free_blocks:
            raise ValueError(f"request {req.req_id} brings {req.blocks} KV blocks, instance "
                             f"{self.index} has {self.free_blocks} free")
        req.instance = self.index
        self.by_id[req.req_id] = req
        if not req.blocks:  # no KV carried: recomputed from its first token
            req.computed = 0
        self.load += remaining_load(req)
        if req.blocks:
            req.running = True
            self.free_blocks -= req.blocks
            self.max_used = max(self.max_used, self.total_blocks - self.free_blocks)
            self.num_running += 1
            bisect.insort(self.ready, req, key=_order)
            self.head.valid = False
        else:
            self._enqueue(req)
        self.metrics.pending[self.index].update(True, now)

    def reserve(self: InstanceCore, count: int) -> None:
        """Takes `count` free blocks out of the pool for a request arriving by live migration
        (its KV is copied into them before it is adopted); `unreserve` gives them back."""
        if not 0 <= count <= self.free_blocks:
            raise ValueError(f"instance {self.index} has {self.free_blocks} free blocks, "
                             f"cannot reserve {count}")
        self.free_blocks -= count

    def unreserve(self: InstanceCore, count: int) -> None:
        self.free_blocks += count
