"""FCFS continuous batching with chunked prefill, on constructed scheduler states."""

from common.scheduling import make_policy
from common.scheduling.types import ScheduledChunk
from tests.unit.policy_helpers import decode, req, snapshot


def fcfs(**kw):
    return make_policy("fcfs", **kw)


def test_running_first_then_waiting_chunked_under_the_budget():
    snap = snapshot(ready=[decode(1), decode(2)], waiting=[req(3, 700), req(4, 50)])
    plan = fcfs(max_num_batched_tokens=512).schedule(snap)
    assert plan.chunks == (ScheduledChunk(1, 1), ScheduledChunk(2, 1), ScheduledChunk(3, 510))
    assert plan.num_tokens == 512 and not plan.preempt


def test_partial_prefill_continues_before_new_requests():
    snap = snapshot(ready=[req(1, 700, computed=510)], waiting=[req(2, 30)])
    plan = fcfs(max_num_batched_tokens=512).schedule(snap)
    assert plan.chunks == (ScheduledChunk(1, 190), ScheduledChunk(2, 30))


def test_seats_limit_admission():
    snap = snapshot(ready=[decode(1)], waiting=[req(2, 10), req(3, 10)])
    plan = fcfs(max_num_seqs=2).schedule(snap)
    assert [c.req_id for c in plan.chunks] == [1, 2]


def test_head_of_line_is_not_overtaken_when_blocks_run_short():
    # Request 2 needs 4 blocks, only 3 are free: the small request 3 behind it must wait too.
    snap = snapshot(waiting=[req(2, 64), req(3, 8)], total_blocks=3)
    assert fcfs(watermark=0).schedule(snap).empty


def test_decode_preempts_the_latest_arrival_but_never_an_earlier_one():
    # Request 1 needs a new block (16 computed -> 17th token); none free.
    r1 = decode(1, prompt=12, out=5)          # 16 computed, 1 block
    r2 = decode(2, prompt=12, out=2)          # 13 computed, 1 block
    r3 = decode(3, prompt=12, out=2, in_flight=True)
    snap = snapshot(ready=[r1, r2, r3], total_blocks=3, free_blocks=0)
    plan = fcfs().schedule(snap)
    assert plan.preempt == (2,)               # 3 is in flight, so 2 goes
    assert ScheduledChunk(1, 1) in plan.chunks and all(c.req_id != 2 for c in plan.chunks)


def test_latest_request_waits_instead_of_preempting_older_ones():
    r1 = decode(1, prompt=12, out=2)
    r2 = decode(2, prompt=12, out=5)          # needs a block, is the latest
    snap = snapshot(ready=[r1, r2], total_blocks=2, free_blocks=0)
    plan = fcfs().schedule(snap)
    assert plan.chunks == (ScheduledChunk(1, 1),) and not plan.preempt


def test_nothing_to_do_is_an_empty_plan():
    assert fcfs().schedule(snapshot()).empty
