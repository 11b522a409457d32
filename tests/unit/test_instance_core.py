"""The instance core (common/instance/core.py): stop conditions, aborts and errors with the
release of blocks deferred until nothing in flight holds them, preemption for recompute, the
checks on a policy's plans, and the simulator driving the same core with true lengths apart
from the clients' caps."""

from __future__ import annotations

import dataclasses

import pytest

from common.instance import CoreRequest, Finish, InstanceCore, PlanError
from common.scheduling import make_policy
from common.scheduling.types import MicroBatchPlan, RequestView, ScheduledChunk
from common.stats import ControllerMetrics
from conveyor.sim.cluster import build_cluster
from conveyor.sim.engine import simulate
from conveyor.sim.report import summarize
from conveyor.sim.workload import Workload

EOS = 2


def core(blocks: int = 100, depth: int = 2, **kw) -> tuple[InstanceCore, list, list]:
    released: list[int] = []
    finished: list[tuple[int, Finish]] = []
    c = InstanceCore(0, depth, depth, 16, blocks, ControllerMetrics(started=0.0),
                     on_release=lambda r: released.append(r.req_id),
                     on_finish=lambda r: finished.append((r.req_id, r.finish)), **kw)
    return c, released, finished


def request(rid: int, prompt: int = 20, max_tokens: int = 10) -> CoreRequest:
    return CoreRequest(rid, float(rid), prompt, max_tokens, 4096, (EOS,),
                       prompt_token_ids=list(range(10, 10 + prompt)))


def plan(*chunks: tuple[int, int]) -> MicroBatchPlan:
    return MicroBatchPlan(tuple(ScheduledChunk(r, n) for r, n in chunks))


def as_view(r: CoreRequest) -> RequestView:
    """The RequestView a policy must read of `r`, from the core's own fields."""
    return RequestView(r.req_id, r.arrival, r.prompt, r.prompt + r.out, r.computed, r.blocks,
                       r.max_tokens, r.out, r.inflight > 0, r.last_scheduled, r.slo,
                       r.predicted_output, r.predicted_high, r.first_token)


def read_as_view(r: CoreRequest) -> RequestView:
    """What a policy reads through RequestView's names on the request itself."""
    return RequestView(*(getattr(r, f.name) for f in dataclasses.fields(RequestView)))


def test_requests_read_as_their_views_through_every_step():
    """Policies read the core's requests through RequestView's names (no view is built): at
    every snapshot of a cycle with a partial prompt chunk in flight, decodes, a stop token, a
    preemption and its recompute, each request reads as the view of its fields would."""
    policy = make_policy("fcfs", max_num_batched_tokens=24)
    c, _, _ = core(blocks=6)
    for rid, prompt in ((1, 40), (2, 30), (3, 10)):
        c.add(request(rid, prompt, max_tokens=12), 0.0)
    now, seen, checked = 0.0, set(), 0
    while c.by_id and now < 200:
        now += 1.0
        if c.inflight:  # the oldest micro-batch returns; the other stays in flight
            mb, batch = next(iter(c.inflight.items()))
            c.complete(mb, [EOS if r.req_id == 3 and r.out == 4 else 7
                            for r in batch.sampling], now)
        while True:
            snap = c.snapshot(now)
            for r in snap.ready + snap.waiting:
                assert read_as_view(r) == as_view(r)
                assert (r.pending, r.is_decode) == (as_view(r).pending, as_view(r).is_decode)
                seen.add((r.in_flight, r.num_computed > 0, r.preemptions > 0))
                checked += 1
            p = c.next_plan(policy, now)
            if p is None:
                break
            c.commit(p, now, policy)
    assert not c.by_id and checked > 20
    assert (True, True, False) in seen  # a partial prompt chunk in flight, still schedulable
    assert any(preempted for *_, preempted in seen)  # the small pool preempted someone


def test_a_stop_token_ends_a_request_before_max_tokens_and_frees_its_blocks():
    c, released, finished = core()
    r = request(1)
    c.add(r, 0.0)
    b = c.commit(plan((1, 20)), 0.0)
    assert r.blocks == 2 and c.free_blocks == 98 and r.awaiting
    c.complete(b.mb_id, [5], 1.0)
    assert r.output_token_ids == [5] and not r.finished and c.snapshot(1.0).ready[0].is_decode
    b = c.commit(plan((1, 1)), 1.0)
    c.complete(b.mb_id, [EOS], 2.0)
    assert r.finish is Finish.STOP and r.out == 2 and finished == [(1, Finish.STOP)]
    assert released == [1] and c.free_blocks == 100 and not c.by_id
    assert c.metrics.finished["stop"] == 1 and c.metrics.generated_tokens == 2
    assert r.timings()["ttft_s"] == pytest.approx(0.0) and c.load == 0


def test_max_tokens_and_the_context_end_with_length():
    c, _, finished = core()
    a, b = request(1, max_tokens=1), CoreRequest(2, 2.0, 20, 50, 22, (EOS,))
    c.add(a, 0.0)
    c.add(b, 0.0)
    mb = c.commit(plan((1, 20), (2, 20)), 0.0)
    c.complete(mb.mb_id, [5, 5], 1.0)
    assert finished == [(1, Finish.LENGTH)] and not b.finished
    mb = c.commit(plan((2, 1)), 1.0)
    c.complete(mb.mb_id, [5], 2.0)
    assert finished[-1] == (2, Finish.LENGTH) and b.prompt + b.out == 22


def test_an_abort_in_flight_drops_its_token_and_releases_when_the_batch_returns():
    c, released, finished = core()
    r, other = request(1), request(2)
    c.add(r, 0.0)
    c.add(other, 0.0)
    mb = c.commit(plan((1, 20), (2, 20)), 0.0)
    assert c.finish(r, Finish.ABORT, 0.5, "cancelled")
    assert not c.finish(r, Finish.ABORT, 0.6)  # once only
    assert finished == [(1, Finish.ABORT)] and released == [] and r.blocks == 2
    assert c.num_running == 2  # its blocks are still in use by the stages
    c.complete(mb.mb_id, [5, 5], 1.0)
    assert r.out == 0 and released == [1] and other.out == 1 and 1 not in c.by_id
    assert c.free_blocks == 100 - other.blocks and c.num_running == 1


def test_an_abort_of_a_waiting_request_removes_it_at_once():
    c, released, _ = core()
    r = request(1)
    c.add(r, 0.0)
    c.finish(r, Finish.ABORT, 0.1)
    assert not c.waiting and not c.by_id and released == [] and c.load == 0
    assert c.metrics.pending[0].read(1.0) == pytest.approx(0.1)


def test_a_partial_prefill_in_flight_stays_schedulable_and_an_abort_waits_for_it():
    c, released, _ = core()
    r = request(1, prompt=40)
    c.add(r, 0.0)
    first = c.commit(plan((1, 16)), 0.0)
    assert c.snapshot(0.0).ready[0].pending == 24
    second = c.commit(plan((1, 24)), 0.0)
    c.finish(r, Finish.ABORT, 0.1)
    c.complete(first.mb_id, [], 1.0)
    assert released == [] and r.inflight == 1
    c.complete(second.mb_id, [5], 2.0)
    assert released == [1] and r.out == 0 and c.free_blocks == 100


def test_preemption_frees_the_blocks_and_recomputes_prompt_and_output():
    c, released, _ = core()
    r = request(1)
    c.add(r, 0.0)
    mb = c.commit(plan((1, 20)), 0.0)
    c.complete(mb.mb_id, [5], 1.0)
    assert c.preempt([1]) == 1
    assert released == [1] and c.free_blocks == 100 and r.preemptions == 1
    view = c.snapshot(1.0).waiting[0]
    assert view.num_computed == 0 and view.pending == 21  # the sampled token is prefilled too
    mb = c.commit(plan((1, 21)), 2.0)
    assert mb.prefill == 21 and r.awaiting


def test_a_request_in_flight_is_not_preempted():
    c, released, _ = core()
    r = request(1)
    c.add(r, 0.0)
    c.commit(plan((1, 20)), 0.0)
    assert c.preempt([1]) == 0 and released == [] and r.blocks == 2


def test_a_failed_batch_ends_its_requests_with_the_error():
    c, released, finished = core()
    for rid in (1, 2):
        c.add(request(rid), 0.0)
    mb = c.commit(plan((1, 20), (2, 20)), 0.0)
    c.fail_batch(mb.mb_id, "stage 1: boom", 1.0)
    assert finished == [(1, Finish.ERROR), (2, Finish.ERROR)] and released == [1, 2]
    assert c.free_blocks == 100 and not c.inflight and c.metrics.finished["error"] == 2


@pytest.mark.parametrize("bad, message", [
    (plan((9, 1)), "request 9, which is not live"),
    (plan((1, 21)), "21 tokens of request 1, which has 20 schedulable"),
    (plan((1, 0)), "0 tokens"),
])
def test_plans_the_core_cannot_carry_out_are_refused(bad, message):
    c, _, _ = core()
    c.add(request(1), 0.0)
    with pytest.raises(PlanError, match=message):
        c.commit(bad, 0.0)
    tight, _, _ = core(blocks=1)
    tight.add(request(1), 0.0)
    with pytest.raises(PlanError, match="2 blocks with only 1 free"):
        tight.commit(plan((1, 20)), 0.0)


def test_next_plan_carries_out_preemptions_and_stops_when_the_pipeline_is_full():
    c, _, _ = core(blocks=1000, depth=2)
    fcfs = make_policy("fcfs")
    for rid in (1, 2, 3):
        c.add(request(rid), 0.0)
    p = c.next_plan(fcfs, 0.0)
    assert [ch.req_id for ch in p.chunks] == [1, 2, 3]
    c.commit(p, 0.0)
    assert c.next_plan(fcfs, 0.0) is None  # every request awaits its token: not even asked
    calls = c.policy_calls
    c.add(request(4), 0.0)
    c.commit(c.next_plan(fcfs, 0.0), 0.0)
    assert c.policy_calls == calls + 1 and len(c.inflight) == c.max_inflight
    assert c.next_plan(fcfs, 0.0) is None and c.policy_calls == calls + 1


# ---- the simulator's requests: true lengths apart from the clients' caps ------------------------

class Cost:
    """A cost model: a fixed cost per step plus a cost per token of each kind."""

    def stage_step_s(self, s):
        return 1e-3 + 1e-5 * s.prefill_tokens + 1e-4 * s.decode_tokens

    def transfer_s(self, n):
        return 0.0


def test_simulated_requests_stop_at_eos_below_their_cap():
    cfg = build_cluster({"model": {"shape": "tiny", "max_model_len": 2048},
                         "cluster": {"stages": 2}, "kvcache": {"num_blocks": 2048}})
    outputs = [5 + 7 * i for i in range(20)]
    wl = Workload([0.01 * i for i in range(20)], [50] * 20, outputs)
    capped = simulate(cfg, Cost(), wl.with_max_tokens(100))
    stops = [r.finish for r in capped.requests]
    assert [r.out for r in capped.requests] == [min(o, 100) for o in outputs]
    assert stops.count(Finish.STOP) == 14 and stops.count(Finish.LENGTH) == 6
    assert all(r.max_tokens == 100 for r in capped.requests)  # what a policy sees
    s = summarize(capped)
    assert s["simulator"]["finished"] == {"stop": 14, "length": 6} and s["completed"] == 20
    bench_like = simulate(cfg, Cost(), wl)  # bench's default: the length is the cap
    assert all(r.finish is Finish.LENGTH and r.max_tokens == r.true_output
               for r in bench_like.requests)


def test_the_simulators_report_gives_slo_attainment_per_class():
    from common.scheduling.types import SLO
    from conveyor.sim.report import format_summary

    cfg = build_cluster({"model": {"shape": "tiny"}, "cluster": {"stages": 2}})
    wl = Workload([0.0] * 30, [64] * 30, [20] * 30)
    ttfts = sorted(r.first_token for r in simulate(cfg, Cost(), wl).requests)
    bound = ttfts[9] + 1e-12  # the first ten (and any tied with the tenth) meet it
    met = sum(t <= bound for t in ttfts)
    assert 10 <= met < 30
    res = simulate(cfg, Cost(), wl.with_slo(SLO(ttft_s=bound, name="tight")))
    s = summarize(res)
    assert s["simulator"]["slo"] == {"tight": {"met": met, "missed": 30 - met,
                                               "attainment": round(met / 30, 6)}}
    assert "SLO attainment, tight:" in format_summary(s)
    assert all(r.slo.ttft_s == bound for r in res.requests)


def test_a_lost_pipeline_requeues_every_running_request_keeping_its_tokens():
    """A stage died: what is in flight is gone, every request holding KV waits to be
    recomputed from its prompt and the tokens it already has, and an aborted one leaves."""
    c, released, finished = core()
    a, b, gone = request(1), request(2, prompt=40), request(3)
    for r in (a, b, gone):
        c.add(r, 0.0)
    mb = c.commit(plan((1, 20), (2, 16), (3, 20)), 0.0)
    assert [r.req_id for r in mb.sampling] == [1, 3]  # 2's prompt is half computed
    c.complete(mb.mb_id, [5, 5], 1.0)
    assert a.out == 1 and b.computed == 16
    c.commit(plan((1, 1), (2, 24)), 1.0)  # in flight when the stage dies
    c.finish(gone, Finish.ABORT, 1.2, "cancelled")
    assert c.reset_pipeline(1.5) == 2
    assert not c.inflight and c.free_blocks == 100 and sorted(released) == [1, 2, 3]
    assert [r.req_id for r in c.waiting] == [1, 2] and 3 not in c.by_id
    assert (a.out, a.computed, a.blocks, a.running) == (1, 0, 0, False)
    assert a.output_token_ids == [5] and b.computed == 0
    # Recomputed: the prompt and the generated token, then decoding goes on.
    mb = c.commit(plan((1, 21)), 2.0)
    c.complete(mb.mb_id, [6], 3.0)
    assert a.output_token_ids == [5, 6] and finished == [(3, Finish.ABORT)]
