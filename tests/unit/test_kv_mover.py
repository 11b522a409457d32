"""The stage's KV mover (services/stage/kv_mover.py) over a real gloo pair group: two movers
in one process, as stage s of a source and of a destination instance, copy a request's blocks
in two rounds into other block ids; the destination's cache then holds the same K/V there,
its table is installed, and a round naming blocks the source does not hold is refused."""

from __future__ import annotations

import select

import torch

from common.model import PagedKVCache
from common.wire.internal_messages import MoveKV
from services.stage.kv_mover import KVMover


def _wait(mover: KVMover, n: int) -> list:
    done = []
    while len(done) < n:
        assert select.select([mover.wake_r], [], [], 20)[0], "no answer in 20 s"
        done += mover.drain()
    return done


def test_two_rounds_copy_a_requests_blocks_into_the_destinations_ids():
    torch.manual_seed(0)
    src_kv = PagedKVCache(3, 8, 4, 2, 8, torch.float32, "cpu")
    dst_kv = PagedKVCache(3, 8, 4, 2, 8, torch.float32, "cpu")
    src_kv.data.normal_()
    src, dst = KVMover(src_kv, 0, 1, "127.0.0.1"), KVMover(dst_kv, 1, 1, "127.0.0.1")
    try:
        src_tables = {7: [1, 3, 6]}
        dst_tables: dict[int, list[int]] = {}
        peer = f"127.0.0.1:{src.port}"
        for rnd, (first, count, blocks, table) in enumerate(
                [(0, 2, [5, 0], [5, 0]), (1, 2, [0, 2], [5, 0, 2])], start=1):
            src.submit(MoveKV(1, 7, rnd, True, first, count), src_tables)
            dst.submit(MoveKV(1, 7, rnd, False, first, count, peer, blocks, table), dst_tables)
            got = _wait(src, 1) + _wait(dst, 1)
            assert [m.error for m in got] == ["", ""] and got[1].nbytes == 2 * 3 * 2 * 4 * 2 * 8 * 4
            assert got[1].instance == 1 and got[1].stage == 1 and got[1].round == rnd
        assert dst_tables == {7: [5, 0, 2]}
        for s, d in zip([1, 3, 6], [5, 0, 2]):
            assert torch.equal(dst_kv.data[:, :, d], src_kv.data[:, :, s])
        src.submit(MoveKV(1, 7, 3, True, 2, 5), src_tables)
        refused = _wait(src, 1)[0]
        assert "blocks [2, 7) are not in its table here (3)" in refused.error
    finally:
        src.close()
        dst.close()
