"""The controller's side of the kv-cache manager: pools, the block lease, frees.

The manager owns each instance's pool. The controller holds a lease of its free block ids and
assigns them to requests itself, telling the manager afterwards (AssignBlocks, fire and
forget), so dispatching a micro-batch costs no round trip. Freed blocks go back to the manager
(FreeBlocks) and the lease is topped up from them in the background; a dispatch waits for a
top-up only when a plan needs more blocks than the lease holds (the policy counted blocks freed
a moment ago). The manager handles one socket's messages in order, so it sees a request's
assignment before its free, and a free before the top-up that hands those blocks out again.
"""

from __future__ import annotations

import asyncio

from common.log import get_logger
from common.wire.internal_messages import (AssignBlocks, FreeBlocks, LeaseBlocks, PoolInit,
                                           PoolReply)
from common.zmq_io import Endpoint, RpcClient
from services.controller.instance import ServedInstance

log = get_logger()
KV_TIMEOUT_S = 30.0


class KVLink:
    def __init__(self, endpoint: Endpoint, lease_blocks: int):
        self.endpoint = endpoint
        self.rpc = RpcClient(endpoint)
        self.lease_blocks = lease_blocks
        self.to_free: dict[int, list[int]] = {}
        """Per instance, requests whose blocks go back to the manager with the next flush."""
        self.lease_waits = 0
        """Dispatches that had to wait for a top-up."""

    async def init_pool(self, inst: ServedInstance, num_blocks: int) -> bool:
        """Creates the instance's pool and takes its first lease (the instance's pool is then
        ready); False if the manager refused it."""
        reply: PoolReply = await self.rpc.call(
            lambda cid: PoolInit(cid, inst.index, num_blocks, inst.core.block_size),
            KV_TIMEOUT_S)
        if not reply.ok:
            log.error("the kv-cache manager refused the instance's pool; it stays down",
                      instance=inst.index, kv_blocks=num_blocks, error=reply.error)
            return False
        inst.core.resize_pool(reply.free_blocks)
        inst.lease_target = min(self.lease_blocks or reply.free_blocks, reply.free_blocks)
        await self._top_up(inst, inst.lease_target)
        inst.pool_ready = True
        return True

    def free(self, index: int, req_id: int) -> None:
        self.to_free.setdefault(index, []).append(req_id)

    def flush(self, instances: list[ServedInstance]) -> None:
        """Sends the queued frees, then tops up every lease that has blocks to gain."""
        if self.to_free:
            frees, self.to_free = self.to_free, {}
            for index, req_ids in frees.items():
                self.endpoint.send_nowait(FreeBlocks(0, index, req_ids))
        for inst in instances:
            if inst.pool_ready and inst.lease_wanted():
                asyncio.create_task(self._refill(inst))

    async def top_up_for(self, inst: ServedInstance, need: int) -> bool:
        """Waits for a top-up that brings the lease to `need` blocks (a plan needs more than
        it holds); False if even the manager has too few (the books disagree)."""
        self.lease_waits += 1
        self.flush([])  # frees first: the manager hands out what they return
        await self._top_up(inst, max(need - len(inst.lease), inst.lease_wanted()))
        if need <= len(inst.lease):
            return True
        log.error("the kv-cache manager has fewer free blocks than the controller counted",
                  instance=inst.index, needed=need, leased=len(inst.lease),
                  counted_free=inst.core.free_blocks)
        return False

    def assigned(self, inst: ServedInstance, granted: dict[int, list[int]]) -> None:
        if granted:
            self.endpoint.send_nowait(AssignBlocks(inst.index, list(granted.items())))

    async def _refill(self, inst: ServedInstance) -> None:
        try:
            await self._top_up(inst, inst.lease_wanted())
        except Exception as e:  # the next dispatch that needs blocks asks again
            log.warning("lease top-up failed", instance=inst.index, error=repr(e))

    async def _top_up(self, inst: ServedInstance, count: int) -> None:
        if count <= 0:
            return
        inst.refilling = True
        try:
            reply: PoolReply = await self.rpc.call(
                lambda cid: LeaseBlocks(cid, inst.index, count), KV_TIMEOUT_S)
        finally:
            inst.refilling = False
        if reply.ok:
            inst.lease.extend(reply.granted[0])
        else:
            log.error("the kv-cache manager refused a lease", instance=inst.index,
                      error=reply.error)
