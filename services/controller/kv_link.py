"""The controller's side of the kv-cache manager: pools, the block lease, frees.

The manager owns each instance's pool. The controller holds a lease of its free block ids and
assigns them to requests itself, telling the manager afterwards (AssignBlocks, fire and
forget), so dispatching a micro-batch costs no round trip. Freed blocks go back to the manager
(FreeBlocks) and the lease is topped up from them in the background; a dispatch waits for a
top-up only when a plan needs more blocks than the lease holds (the policy counted blocks freed
a moment ago). The manager handles one socket's messages in order, so it sees a request's
assignment before its free, and a free before the top-up that hands those blocks out again.

The controller keeps the same books as the manager (every live request's block ids, and its
lease), so a restarted manager is rebuilt from them: when the connection comes back, each
ready instance's pool is created again holding exactly those tables and that lease. Meanwhile
dispatches go on from the lease; one that needs a top-up waits for the manager's return (at
most KV_TIMEOUT_S, then its requests fail with that reason).
"""

from __future__ import annotations

import asyncio

from collections.abc import Callable

from common.log import get_logger
from common.wire import Message
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
        self.usable = asyncio.Event()
        """The manager is connected and holds this controller's pools (cleared while it is
        away or being rebuilt)."""
        self.books_only = False
        """The manager is away: assignments and frees go to the books alone (the rebuilt
        pools carry them), not into a socket queue for a manager that would have no pool."""

    async def watch(self, instances: list[ServedInstance],
                    on_rebuilt: Callable[[], None]) -> None:
        """Runs for the controller's life: calls in flight fail at once when the manager goes
        away, and its pools are rebuilt when it comes back (then `on_rebuilt` runs)."""
        def away() -> None:
            self.usable.clear()
            self.books_only = True

        await self.rpc.fail_on_disconnect(
            "kv-cache manager", on_disconnect=away, on_connect=self.usable.set,
            on_reconnect=lambda: self._rebuild(instances, on_rebuilt))

    def _rebuild(self, instances: list[ServedInstance], on_rebuilt: Callable[[], None]) -> None:
        """Sends each ready instance's books (PoolInit with its tables and lease) at once,
        before any assignment or free may follow them; the replies are awaited in a task."""
        self.usable.clear()  # until the pools exist
        self.to_free.clear()  # the books already leave those requests out
        calls = [(inst, self.rpc.send_call(lambda cid, inst=inst: PoolInit(
                     cid, inst.index, inst.core.total_blocks, inst.core.block_size,
                     [(r, list(b)) for r, b in inst.tables.items()], list(inst.lease))))
                 for inst in instances if inst.pool_ready]
        self.books_only = False

        async def rebuilt() -> None:
            for inst, call in calls:
                reply: PoolReply = await asyncio.wait_for(call, KV_TIMEOUT_S)
                if not reply.ok:
                    log.error("the rebuilt kv-cache manager refused a pool",
                              instance=inst.index, error=reply.error)
                    return
            log.warning("kv-cache manager back: pools rebuilt from the controller's books",
                        instances=len(calls))
            self.usable.set()
            on_rebuilt()

        task = asyncio.create_task(rebuilt())
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or log.error(
            "rebuilding the kv-cache manager's pools failed", error=repr(t.exception())))

    async def _usable(self) -> None:
        """Waits for the manager (at most KV_TIMEOUT_S) while it is away or being rebuilt."""
        if self.usable.is_set():
            return
        try:
            await asyncio.wait_for(self.usable.wait(), KV_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RuntimeError(f"the kv-cache manager has been away for {KV_TIMEOUT_S:g}s") \
                from None

    async def _call(self, build: Callable[[int], Message], what: str) -> PoolReply:
        """One call to the manager; a manager that does not answer (stopped, say) is an
        error saying so, not a bare timeout (its text reaches the requests it fails)."""
        try:
            return await self.rpc.call(build, KV_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RuntimeError(f"the kv-cache manager did not answer {what} within "
                               f"{KV_TIMEOUT_S:g}s") from None

    async def init_pool(self, inst: ServedInstance, num_blocks: int) -> bool:
        """Creates the instance's pool and takes its first lease (the instance's pool is then
        ready); False if the manager refused it."""
        await self._usable()
        reply = await self._call(
            lambda cid: PoolInit(cid, inst.index, num_blocks, inst.core.block_size),
            "the pool's creation")
        if not reply.ok:
            log.error("the kv-cache manager refused the instance's pool; it stays down",
                      instance=inst.index, kv_blocks=num_blocks, error=reply.error)
            return False
        inst.core.resize_pool(reply.free_blocks)
        inst.lease_target = min(self.lease_blocks or reply.free_blocks, reply.free_blocks)
        await self._top_up(inst, inst.lease_target)
        inst.pool_ready = True
        return True

    def free(self, inst: ServedInstance, req_id: int) -> None:
        inst.tables.pop(req_id, None)
        self.to_free.setdefault(inst.index, []).append(req_id)

    def flush(self, instances: list[ServedInstance]) -> None:
        """Sends the queued frees, then tops up every lease that has blocks to gain."""
        if self.to_free and not self.books_only:
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
            for req_id, blocks in granted.items():
                inst.tables.setdefault(req_id, []).extend(blocks)
            if not self.books_only:
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
            await self._usable()
            reply = await self._call(lambda cid: LeaseBlocks(cid, inst.index, count),
                                     "a lease top-up")
        finally:
            inst.refilling = False
        if reply.ok:
            inst.lease.extend(reply.granted[0])
        else:
            log.error("the kv-cache manager refused a lease", instance=inst.index,
                      error=reply.error)
