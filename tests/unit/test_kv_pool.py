"""The kv-cache manager's block pool, and the manager's answers to messages it cannot act on."""

import pytest

from common.wire.internal_messages import Allocate, FreeBlocks, PoolInit, PoolStatsQuery
from common.zmq_io import Incoming
from services.kvcache.pool import BlockPool, PoolExhausted
from services.kvcache.service import KVCacheManager


def test_allocate_grows_tables_and_free_returns_everything():
    pool = BlockPool(10, 16)
    a, b = pool.allocate([(1, 3), (2, 2)])
    assert len(a) == 3 and len(b) == 2 and not set(a) & set(b)
    pool.allocate([(1, 1)])
    assert len(pool.table(1)) == 4 and pool.free_blocks == 4 and pool.num_requests == 2
    assert pool.free([1, 99]) == 4
    assert pool.free_blocks == 8 and pool.table(1) == []


def test_allocation_is_all_or_nothing():
    pool = BlockPool(4, 16)
    pool.allocate([(1, 3)])
    with pytest.raises(PoolExhausted, match="2 blocks wanted, 1 free"):
        pool.allocate([(2, 1), (3, 1)])
    assert pool.free_blocks == 1 and pool.table(2) == []


def test_block_ids_stay_unique_under_churn():
    pool = BlockPool(64, 16)
    for round_ in range(20):
        pool.allocate([(round_, 3), (1000 + round_, 2)])
        pool.free([round_])
    held = [b for r in range(1000, 1020) for b in pool.table(r)]
    assert len(held) == len(set(held)) == 40 and pool.free_blocks == 24


async def test_the_manager_refuses_a_bad_pool_and_serves_on(tmp_path, monkeypatch):
    manager = KVCacheManager(f"ipc://{tmp_path}/kvcache")
    replies = []

    async def send(msg, identity):
        replies.append(msg)
    monkeypatch.setattr(manager.endpoint, "send", send)
    try:
        await manager.handle(Incoming(b"c", PoolInit(1, 0, 8, 16)))
        await manager.handle(Incoming(b"c", PoolInit(2, 0, 0, 16)))   # crashed the manager
        await manager.handle(Incoming(b"c", PoolInit(3, 1, 4, 0)))
        await manager.handle(Incoming(b"c", Allocate(4, 0, [(7, 2)])))
    finally:
        manager.endpoint.close()
    ok, no_blocks, no_size, allocated = replies
    assert ok.ok and ok.free_blocks == 8
    assert not no_blocks.ok and no_blocks.error == (
        "a pool needs num_blocks >= 1 and block_size >= 1, got num_blocks=0, block_size=16")
    assert not no_size.ok and "block_size=0" in no_size.error
    assert allocated.ok and len(allocated.granted[0]) == 2 and allocated.free_blocks == 6
    assert set(manager.pools) == {0}  # the refused ones left the pools as they were


async def test_a_message_the_manager_fails_on_is_answered_not_fatal(tmp_path, monkeypatch):
    manager = KVCacheManager(f"ipc://{tmp_path}/kvcache")
    replies = []

    async def send(msg, identity):
        replies.append(msg)
    monkeypatch.setattr(manager.endpoint, "send", send)
    monkeypatch.setattr(manager, "answer", lambda msg: 1 / 0)
    try:
        await manager.handle(Incoming(b"c", PoolStatsQuery(9)))
        await manager.handle(Incoming(b"c", FreeBlocks(0, 0, [1])))  # call_id 0: no reply
    finally:
        manager.endpoint.close()
    assert len(replies) == 1 and replies[0].call_id == 9 and not replies[0].ok
    assert replies[0].error == "ZeroDivisionError('division by zero')"
