"""InstanceCore.detach and adopt: a request leaves one core with its tokens, its blocks back
in that pool, and waits at another to be recomputed; both cores stay consistent (queues,
running count, free blocks, load) and the adopted request finishes with every token once."""

from __future__ import annotations

import pytest

from common.instance import CoreRequest, Finish, InstanceCore
from common.scheduling.types import MicroBatchPlan, ScheduledChunk
from common.stats import ControllerMetrics

EOS = 2


def two_cores(blocks: int = 100):
    metrics = ControllerMetrics(started=0.0, num_instances=2)
    released: list[tuple[int, int]] = []
    cores = [InstanceCore(i, 2, 2, 16, blocks, metrics, keep_chunks=True,
                          on_release=lambda r: released.append((r.instance, r.req_id)))
             for i in range(2)]
    return cores, released


def request(rid: int, prompt: int = 20, max_tokens: int = 10) -> CoreRequest:
    return CoreRequest(rid, float(rid), prompt, max_tokens, 4096, (EOS,),
                       prompt_token_ids=list(range(10, 10 + prompt)))


def plan(*chunks: tuple[int, int]) -> MicroBatchPlan:
    return MicroBatchPlan(tuple(ScheduledChunk(r, n) for r, n in chunks))


def test_a_running_request_moves_keeping_its_tokens_and_is_recomputed_at_the_destination():
    (a, b), released = two_cores()
    r, other = request(1, prompt=20), request(2, prompt=5)
    a.add(r, 0.0)
    a.add(other, 0.0)
    a.complete(a.commit(plan((1, 20), (2, 5)), 0.0).mb_id, [5, 6], 1.0)
    a.complete(a.commit(plan((1, 1)), 1.0).mb_id, [7], 2.0)
    assert r.blocks == 2 and a.free_blocks == 97 and a.load == 19
    moved, blocks = a.detach(1, 3.0)
    assert moved is r and blocks == 2 and released == [(0, 1)]
    assert a.free_blocks == 99 and a.num_running == 1 and [x.req_id for x in a.ready] == [2]
    assert 1 not in a.by_id and a.load == 10 and r.instance == -1
    assert (r.computed, r.blocks, r.running, r.out, r.output_token_ids) == (0, 0, False, 2, [5, 7])
    b.adopt(r, 3.0)
    assert r.instance == 1 and list(b.waiting) == [r] and b.load == 20 + 10
    # The destination recomputes prompt plus output (22 tokens) and samples the third token.
    batch = b.commit(plan((1, 22)), 3.0)
    assert batch.chunks[0][1:3] == (0, 22) and r.tokens(0, 22)[-2:] == [5, 7]
    b.complete(batch.mb_id, [EOS], 4.0)
    assert r.finish is Finish.STOP and r.output_token_ids == [5, 7, EOS] and r.out == 3
    assert b.free_blocks == 100 and not b.by_id and b.load == 0 and released[-1] == (1, 1)
    assert r.timings()["ttft_s"] == pytest.approx(0.0)  # its first token came at the source
    m = a.metrics
    assert m.prompt_tokens == 25 and m.generated_tokens == 4 and m.preemptions == 0


def test_a_waiting_request_moves_without_blocks_and_keeps_its_arrival_order():
    (a, b), released = two_cores()
    early, late = request(1), request(2)
    a.add(early, 0.0)
    b.add(late, 0.0)
    moved, blocks = a.detach(1, 1.0)
    assert blocks == 0 and released == [] and not a.waiting and a.load == 0
    assert not a.by_id and a.metrics.pending[0].read(5.0) == pytest.approx(1.0)
    b.adopt(moved, 1.0)
    assert [x.req_id for x in b.waiting] == [1, 2]  # it arrived first: it goes first
    assert b.load == 2 * 30


def test_a_request_in_flight_cannot_leave_and_both_cores_are_unchanged():
    (a, b), _ = two_cores()
    r = request(1)
    a.add(r, 0.0)
    batch = a.commit(plan((1, 12)), 0.0)  # a partial prefill chunk is in flight
    with pytest.raises(ValueError, match="in 1 micro-batch.* in flight on instance 0: it can "
                                         "move only between them"):
        a.detach(1, 0.5)
    assert r.instance == 0 and a.by_id[1] is r and r.blocks == 1
    a.complete(batch.mb_id, [], 1.0)
    a.detach(1, 1.0)
    assert a.free_blocks == 100
    with pytest.raises(ValueError, match="not live on instance 0"):
        a.detach(1, 1.0)


def test_adopt_refuses_a_request_that_was_not_detached():
    (a, b), _ = two_cores()
    r = request(1)
    a.add(r, 0.0)
    with pytest.raises(ValueError, match="was not detached"):
        b.adopt(r, 0.0)
    a.detach(1, 0.0)
    b.adopt(r, 0.0)
    with pytest.raises(ValueError, match="already on instance 1"):
        b.adopt(r, 0.0)


def test_a_request_adopted_with_its_kv_decodes_on_at_the_destination():
    (a, b), released = two_cores()
    r = request(1, prompt=20)
    a.add(r, 0.0)
    a.complete(a.commit(plan((1, 20)), 0.0).mb_id, [5], 1.0)
    computed = r.computed
    moved, blocks = a.detach(1, 2.0)
    with pytest.raises(ValueError, match="1 blocks cannot hold the KV of 20"):
        b.adopt(moved, 2.0, computed=computed, blocks=1)
    b.adopt(moved, 2.0, computed=computed, blocks=blocks)
    assert b.free_blocks == 98 and b.num_running == 1 and b.ready == [r] and r.running
    assert b.load == 1 + 9
    batch = b.commit(plan((1, 1)), 2.0)  # its next decode, not a re-prefill
    assert batch.decode == 1 and batch.prefill == 0
    b.complete(batch.mb_id, [EOS], 3.0)
    assert r.output_token_ids == [5, EOS] and b.free_blocks == 100 and b.load == 0
