"""The kv-cache manager's block pool."""

import pytest

from services.kvcache.pool import BlockPool, PoolExhausted


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
