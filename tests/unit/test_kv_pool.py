"""The kv-cache manager's block pool, and the manager's answers to messages it cannot act on."""

import pytest

from common.wire.internal_messages import FreeBlocks, LeaseBlocks, PoolInit, PoolStatsQuery
from common.zmq_io import Incoming
from services.kvcache.pool import BlockPool
from services.kvcache.service import KVCacheManager


def test_leased_blocks_are_assigned_to_tables_and_freed_back():
    pool = BlockPool(10, 16)
    lease = pool.lease(6)
    assert len(lease) == len(set(lease)) == 6 and pool.leased_blocks == 6
    assert pool.free_blocks == 10  # leased but unassigned blocks are still free
    pool.assign(1, lease[:3])
    pool.assign(2, lease[3:5])
    pool.assign(1, lease[5:])
    assert pool.table(1) == lease[:3] + lease[5:] and pool.free_blocks == 4
    assert pool.num_requests == 2 and pool.leased_blocks == 0
    assert pool.free([1, 99]) == 4
    assert pool.free_blocks == 8 and pool.table(1) == [] and pool.leased_blocks == 0


def test_a_lease_is_at_most_the_unleased_free_blocks():
    pool = BlockPool(4, 16)
    assert len(pool.lease(3)) == 3
    assert len(pool.lease(3)) == 1 and pool.lease(3) == []


def test_only_leased_blocks_can_be_assigned():
    pool = BlockPool(8, 16)
    lease = pool.lease(2)
    with pytest.raises(ValueError, match="not leased"):
        pool.assign(1, [lease[0], 7 if 7 not in lease else 6])
    assert pool.table(1) == [] and pool.leased_blocks == 2  # all or nothing
    pool.assign(1, lease)
    with pytest.raises(ValueError, match="not leased"):
        pool.assign(2, lease[:1])  # already in a table


def test_block_ids_stay_unique_under_churn():
    pool = BlockPool(64, 16)
    for round_ in range(20):
        lease = pool.lease(5)
        pool.assign(round_, lease[:3])
        pool.assign(1000 + round_, lease[3:])
        pool.free([round_])
    held = [b for r in range(1000, 1020) for b in pool.table(r)]
    assert len(held) == len(set(held)) == 40 and pool.free_blocks == 24


def manager_and_replies(tmp_path, monkeypatch) -> tuple[KVCacheManager, list]:
    """A manager whose replies are collected instead of sent."""
    manager = KVCacheManager(f"ipc://{tmp_path}/kvcache")
    replies: list = []

    async def send(msg, identity):
        replies.append(msg)
    monkeypatch.setattr(manager.endpoint, "send", send)
    return manager, replies


async def test_the_manager_refuses_a_bad_pool_and_serves_on(tmp_path, monkeypatch):
    manager, replies = manager_and_replies(tmp_path, monkeypatch)
    try:
        await manager.handle(Incoming(b"controller", PoolInit(1, 0, 8, 16)))
        await manager.handle(Incoming(b"controller", PoolInit(2, 0, 0, 16)))   # crashed the manager
        await manager.handle(Incoming(b"controller", PoolInit(3, 1, 4, 0)))
        await manager.handle(Incoming(b"controller", LeaseBlocks(4, 0, 2)))
    finally:
        manager.endpoint.close()
    ok, no_blocks, no_size, leased = replies
    assert ok.ok and ok.free_blocks == 8
    assert not no_blocks.ok and no_blocks.error == (
        "a pool needs num_blocks >= 1 and block_size >= 1, got num_blocks=0, block_size=16")
    assert not no_size.ok and "block_size=0" in no_size.error
    assert leased.ok and len(leased.granted[0]) == 2 and leased.free_blocks == 8
    assert set(manager.pools) == {0}  # the refused ones left the pools as they were


async def test_a_message_the_manager_fails_on_is_answered_not_fatal(tmp_path, monkeypatch):
    manager, replies = manager_and_replies(tmp_path, monkeypatch)
    monkeypatch.setattr(manager, "answer", lambda msg: 1 / 0)
    try:
        await manager.handle(Incoming(b"controller", PoolStatsQuery(9)))
        await manager.handle(Incoming(b"controller", FreeBlocks(0, 0, [1])))  # call_id 0: no reply
    finally:
        manager.endpoint.close()
    assert len(replies) == 1 and replies[0].call_id == 9 and not replies[0].ok
    assert replies[0].error == "ZeroDivisionError('division by zero')"
