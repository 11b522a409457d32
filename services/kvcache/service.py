"""The kv-cache manager process: one BlockPool per instance behind a ROUTER socket.

The controller is the only allocator (it initializes a pool once all stages of an instance
have reported their capacity): pool changes from any other peer are refused and logged (with
CURVE, the peer must also hold the controller's key: common/security.py). Any peer that got in
may ask for pool statistics (tests, tools, dashboards).
A message the manager cannot act on is answered with a refusal (ok false, and why) or, when it
expects no answer, logged: one bad message never stops the process every instance relies on.
"""

from __future__ import annotations

import asyncio
import traceback

import zmq

from common import sd_notify
from common.config import ConveyorConfig
from common.log import get_logger
from common.wire.internal_messages import (AssignBlocks, FreeBlocks, LeaseBlocks, PoolInfo,
                                           PoolInit, PoolReply, PoolStats, PoolStatsQuery)
from common.security import (CONTROLLER_IDENTITY, Security, log_handshake_failures,
                             peer_is)
from common.zmq_io import Endpoint, Incoming, make_context, stop_tasks
from services.kvcache.pool import BlockPool

log = get_logger()


_POOL_CHANGES = (PoolInit, LeaseBlocks, AssignBlocks, FreeBlocks)


class KVCacheManager:
    def __init__(self, address: str, security: Security | None = None):
        self.pools: dict[int, BlockPool] = {}
        self._ctx = ctx = make_context()
        self.security = security or Security("", "kvcache")
        self.auth = self.security.start_authenticator(ctx)  # before bind: no unchecked peer
        self.endpoint = Endpoint(ctx, zmq.ROUTER, bind=address, security=self.security.server())

    async def serve(self) -> None:
        log.info("kv-cache manager listening", address=self.endpoint.address,
                 curve=self.security.enabled)
        sd_notify.ready("kv-cache manager listening")
        watch = (asyncio.create_task(log_handshake_failures(self.endpoint.sock, "kvcache"))
                 if self.security.enabled else None)
        try:
            while True:
                await self.handle(await self.endpoint.recv())
        finally:
            if watch is not None:
                await stop_tasks([watch])  # its monitor closes before the socket does
            if self.auth is not None:
                self.auth.stop()
            self.endpoint.close()
            self._ctx.destroy(linger=0)

    async def handle(self, inc: Incoming) -> None:
        if inc.message is None:
            log.warning("dropped undecodable frame", error=inc.error)
            return
        if isinstance(inc.message, _POOL_CHANGES) and not (
                inc.identity == CONTROLLER_IDENTITY and peer_is(inc.role, "controller")):
            log.warning("refused a message", type=type(inc.message).__name__,
                        peer=inc.identity, peer_role=inc.role,
                        reason="only the controller may change the pools")
            call_id = getattr(inc.message, "call_id", 0)
            if call_id:
                await self.endpoint.send(PoolReply(call_id, False, [], 0, "refused: only the "
                                                   "controller may change the pools"),
                                         inc.identity)
            return
        try:
            reply = self.answer(inc.message)
        except Exception as e:  # a bug met by one message: refuse it, keep serving the rest
            log.error("failed to handle a message", type=type(inc.message).__name__,
                      error=repr(e), traceback=traceback.format_exc())
            call_id = getattr(inc.message, "call_id", 0)
            reply = PoolReply(call_id, False, [], 0, repr(e)) if call_id else None
        if reply is not None:
            await self.endpoint.send(reply, inc.identity)

    def answer(self, msg):  # -> reply message or None
        if isinstance(msg, PoolInit):
            if msg.num_blocks < 1 or msg.block_size < 1:
                log.error("refused a pool", instance=msg.instance, blocks=msg.num_blocks,
                          block_size=msg.block_size)
                return PoolReply(msg.call_id, False, [], 0,
                                 f"a pool needs num_blocks >= 1 and block_size >= 1, got "
                                 f"num_blocks={msg.num_blocks}, block_size={msg.block_size}")
            try:
                pool = BlockPool.rebuilt(msg.num_blocks, msg.block_size, msg.tables, msg.leased)
            except ValueError as e:
                log.error("refused a pool", instance=msg.instance, error=str(e))
                return PoolReply(msg.call_id, False, [], 0, str(e))
            self.pools[msg.instance] = pool
            log.info("pool initialized", instance=msg.instance, blocks=msg.num_blocks,
                     block_size=msg.block_size,
                     **({"rebuilt_requests": pool.num_requests, "leased": pool.leased_blocks}
                        if msg.tables or msg.leased else {}))
            return PoolReply(msg.call_id, True, [], pool.free_blocks)
        if isinstance(msg, PoolStatsQuery):
            return PoolStats(msg.call_id, [
                PoolInfo(i, p.block_size, p.num_blocks, p.free_blocks, p.num_requests)
                for i, p in sorted(self.pools.items())])
        if isinstance(msg, (LeaseBlocks, AssignBlocks, FreeBlocks)):
            pool = self.pools.get(msg.instance)
            call_id = getattr(msg, "call_id", 0)
            if pool is None:
                log.error("message for an instance without a pool", instance=msg.instance,
                          type=type(msg).__name__)
                return PoolReply(call_id, False, [], 0,
                                 f"no pool for instance {msg.instance}") if call_id else None
            if isinstance(msg, FreeBlocks):
                pool.free(msg.req_ids)
                return PoolReply(msg.call_id, True, [], pool.free_blocks)
            if isinstance(msg, AssignBlocks):
                for req_id, blocks in msg.tables:
                    try:
                        pool.assign(req_id, blocks)
                    except ValueError as e:  # the controller's books and ours disagree
                        log.error("refused a block assignment", instance=msg.instance,
                                  error=str(e))
                return None
            try:
                granted = pool.lease(msg.count)
            except ValueError as e:
                return PoolReply(msg.call_id, False, [], pool.free_blocks, str(e))
            return PoolReply(msg.call_id, True, [granted], pool.free_blocks)
        log.warning("unexpected message", type=type(msg).__name__)
        return None


async def run(cfg: ConveyorConfig) -> None:
    await KVCacheManager(cfg.endpoints.kvcache, Security.for_role(cfg, "kvcache")).serve()
