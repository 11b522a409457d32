"""UELLM's SLO-ODBS on continuous batching, its ablations and the S³-style baseline: the order,
the batch rule and the predicted KV reserve on hand-computed cases, and whole workloads
finishing through the instance core (with the online predictor filling the lengths)."""

from __future__ import annotations

import random

import pytest

from common.prediction import OnlineLengthPredictor
from common.prediction.requests import RequestLengths
from common.scheduling.policy import make_policy
from common.scheduling.types import SLO, KVView, RequestView, SchedulerSnapshot
from tests.unit.policy_driver import MiniDriver

TTFT2 = SLO(ttft_s=2.0)


def waiting(req_id, arrival=0.0, pred=100, slo=TTFT2, prompt=16, high=None):
    return RequestView(req_id, arrival, prompt, prompt, 0, 0, 1 << 20, slo=slo,
                       predicted_output=pred, predicted_high=high if high is not None else pred)


def snap(wait=(), ready=(), free=10_000, total=10_000, running=0, now=10.0):
    return SchedulerSnapshot(now, 2, tuple(wait), tuple(ready), running, (),
                             KVView(total, free, 16))


def admitted(plan):
    return [c.req_id for c in plan.chunks]


def test_the_order_weighs_slack_and_predicted_length():
    # keys at now = 10 (a = 1, b = 0.5, 0.01 s a token): A 1 + 1.5 = 2.5, B 1.5 + 0.1 = 1.6,
    # C (no SLO) 60 + 0.05, D -3 + 5 = 2 (late already, but predicted long).
    reqs = [waiting(1, 9.0, 300), waiting(2, 9.5, 20), waiting(3, 0.0, 10, slo=None),
            waiting(4, 5.0, 1000)]
    order = {name: [r.req_id for r in make_policy(name, late_last=False).ordered(
        tuple(reqs), 10.0)] for name in ("slo-odbs", "odbs", "slo-dbs")}
    assert order == {"slo-odbs": [2, 4, 1, 3], "odbs": [3, 2, 1, 4], "slo-dbs": [4, 1, 2, 3]}
    # With late_last (the default but for odbs), D, 3 s past its deadline, goes behind all
    # that can still meet theirs, C (no deadline) included.
    order = {name: [r.req_id for r in make_policy(name).ordered(tuple(reqs), 10.0)]
             for name in ("slo-odbs", "odbs", "slo-dbs")}
    assert order == {"slo-odbs": [2, 1, 3, 4], "odbs": [3, 2, 1, 4], "slo-dbs": [1, 2, 3, 4]}
    # Only for late_for_s: 3 s late is past a 2 s stay behind, so D has its place by slack
    # again (none starves behind a stream of requests that are on time).
    assert [r.req_id for r in make_policy("slo-odbs", late_for_s=2.0).ordered(
        tuple(reqs), 10.0)] == [2, 4, 1, 3]


def test_a_group_closes_at_uellms_waste_rule():
    # SLO-DBS order = arrival here. 100 then 5000: (5000-100) x 2 x 1.2 = 11760 <= 15000, in;
    # then 9500: (9500-5000) x 3 x 1.2 = 16200 > 15000, the group closes.
    policy = make_policy("slo-dbs", throttle=False, max_prefill_tokens=4096)
    reqs = [waiting(1, 0.0, 100), waiting(2, 0.1, 5000), waiting(3, 0.2, 9500),
            waiting(4, 0.3, 9500)]
    assert admitted(policy.schedule(snap(reqs))) == [1, 2]
    # The next micro-batch starts the next group: 9500 and 9500 (no growth, no waste).
    assert admitted(policy.schedule(snap(reqs[2:]))) == [3, 4]


def test_a_group_has_at_most_max_group_members():
    policy = make_policy("slo-odbs", throttle=False, max_prefill_tokens=4096)
    reqs = [waiting(i, i * 0.01, 50) for i in range(1, 13)]
    assert admitted(policy.schedule(snap(reqs))) == list(range(1, 11))  # UELLM's B = 10
    assert len(admitted(make_policy("slo-odbs", throttle=False, max_prefill_tokens=4096,
                                    max_group=3).schedule(snap(reqs)))) == 3


def test_uellms_kv_plan_keeps_the_predicted_kv_of_running_requests_free():
    # A running decode: 16 prompt + 10 out, planned to 100 x 1.2 = 120 out: 136 tokens = 9
    # blocks, 2 held, 7 to come. A new request: 160 prompt (10 blocks) planned to 1200 out:
    # 1360 tokens = 85 blocks, 75 beyond its prompt. Free 98: the first fits (10 <= 98 - 7 -
    # 75), a second one does not (10 > 88 - 82 - 75).
    decode = RequestView(9, 0.0, 16, 26, 25, 2, 1 << 20, num_output_tokens=10,
                         slo=TTFT2, predicted_output=50, predicted_high=100)
    reqs = [waiting(1, 1.0, 500, prompt=160, high=1000),
            waiting(2, 1.1, 500, prompt=160, high=1000)]
    policy = make_policy("slo-odbs", throttle=False, max_prefill_tokens=4096, kv_plan="high")
    plan = policy.schedule(snap(reqs, [decode], free=98, total=100, running=1))
    assert admitted(plan) == [9, 1]
    # fcfs, with no reserve, takes both prompts.
    fcfs = make_policy("fcfs", max_num_batched_tokens=4096).schedule(
        snap(reqs, [decode], free=98, total=100, running=1))
    assert admitted(fcfs) == [9, 1, 2]


def test_kv_on_demand_admits_as_throttle_does():
    # The case above with kv_plan = "demand": no predicted growth is held back, both prompts
    # go in beside the decode; with less free, the KV rule is Token Throttling's own (its
    # kv_threshold left for growth, its budget shrinking with the free share): the same
    # chunks as throttle's for the same queue.
    decode = RequestView(9, 0.0, 16, 26, 25, 2, 1 << 20, num_output_tokens=10,
                         slo=TTFT2, predicted_output=50, predicted_high=100)
    reqs = [waiting(1, 1.0, 500, prompt=160, high=1000),
            waiting(2, 1.1, 500, prompt=160, high=1000)]
    settings = {"max_prefill_tokens": 4096, "min_prefill_tokens": 1, "prefill_iterations": 1}
    demand = make_policy("slo-odbs", kv_plan="demand", **settings)
    throttle = make_policy("throttle", **settings)
    assert admitted(demand.schedule(snap(reqs, [decode], free=98, total=100, running=1))) \
        == [9, 1, 2]
    for free in (98, 40, 24, 16, 8):
        view = snap(reqs, [decode], free=free, total=100, running=1)
        assert demand.schedule(view).chunks == throttle.schedule(view).chunks, free
    with pytest.raises(ValueError, match="kv_plan"):
        make_policy("slo-odbs", kv_plan="lots")


def test_s3_packs_by_predicted_footprint_first_fit():
    decode = RequestView(9, 0.0, 16, 26, 25, 2, 1 << 20, num_output_tokens=10,
                         predicted_output=20, predicted_high=20)
    # 1: 16 + 3000 predicted = 189 blocks, more than the pool: skipped; 2: 16 + 100 = 8 fits.
    reqs = [waiting(1, 1.0, 3000, slo=None), waiting(2, 1.1, 100, slo=None)]
    plan = make_policy("s3").schedule(snap(reqs, [decode], free=98, total=100, running=1))
    assert admitted(plan) == [9, 2]


def test_a_request_that_outlives_its_prediction_has_it_doubled():
    from common.scheduling.predicted_kv import planned_output

    r = RequestView(1, 0.0, 16, 16 + 150, 16 + 149, 11, 1000, num_output_tokens=150,
                    predicted_output=40, predicted_high=50)
    assert planned_output(r, 0.0) == 200  # 50 -> 100 -> 200, ahead of its 150 again
    assert planned_output(r, 0.0, high=False) == 160  # the median's 40 -> 80 -> 160
    assert planned_output(RequestView(2, 0.0, 16, 16, 0, 0, 64), 0.2) == 64  # no prediction


@pytest.mark.parametrize("name,settings", [("slo-odbs", {}), ("odbs", {}), ("slo-dbs", {}),
                                           ("s3", {}), ("slo-odbs", {"kv_plan": "median"}),
                                           ("slo-odbs", {"kv_plan": "demand"})])
@pytest.mark.parametrize("total_blocks", [80, 2000])
def test_every_request_finishes_with_the_predictor_filling_lengths(name, settings,
                                                                  total_blocks):
    driver = MiniDriver(make_policy(name, **settings), depth=4, total_blocks=total_blocks)
    driver.core.lengths = RequestLengths(OnlineLengthPredictor())
    rng = random.Random(7)
    for _ in range(60):
        req = driver.add(prompt=rng.randint(8, 300), max_out=rng.randint(1, 60))
        assert req.predicted_output is not None and req.predicted_high is not None
    driver.run()
    assert all(r.out == r.max_tokens for r in driver.requests)


# ---- the ranked head: the same plans as sorting the whole queue -----------------------------

def _queue_run(policy: str, head: int, blocks: int, **sched):
    from conveyor.sim.cluster import build_cluster
    from conveyor.sim.engine import simulate
    from conveyor.sim.workload import Workload
    from tests.unit.test_sim_engine import LinearCost

    rng = random.Random(11)
    n = 300
    # A burst at t = 0 (exact ties: same arrival, class and prompt length, so the same
    # prediction), then arrivals over 3 s; three classes, one without a TTFT target.
    arrivals = [0.0] * 120 + sorted(rng.uniform(0, 3) for _ in range(n - 120))
    classes = [SLO(0.2, 0.05, "tight"), SLO(1.0, 0.1, "loose"), None]
    wl = Workload(arrivals, [rng.choice((16, 40, 64)) if i < 120 else rng.randint(4, 200)
                             for i in range(n)],
                  [rng.randint(2, 60) for _ in range(n)],
                  slos=[classes[i % 3] if i < 120 else rng.choice(classes) for i in range(n)])
    cfg = build_cluster({
        "model": {"shape": "tiny"}, "cluster": {"stages": 3},
        "kvcache": {"num_blocks": blocks},
        "scheduler": {"policy": policy, "max_num_seqs": 16, "max_prefill_tokens": 128,
                      "prefill_iterations": 4, **sched},
        "simulator": {"waiting_head": head}})
    res = simulate(cfg, LinearCost(1e-3, 1e-5, 1e-4), wl)
    assert all(r.finished for r in res.requests)
    return ([(r.first_token, r.last_token, r.preemptions) for r in res.requests],
            res.instances[0]["max_waiting"])


@pytest.mark.parametrize("policy,blocks,sched", [
    ("slo-odbs", 4096, {}), ("slo-odbs", 160, {}), ("slo-odbs", 4096, {"throttle": False}),
    ("slo-odbs", 4096, {"late_last": False}), ("slo-odbs", 160, {"kv_plan": "high"}),
    ("odbs", 4096, {}), ("slo-dbs", 160, {}), ("slo-dbs", 4096, {"max_group": 3})])
def test_the_ranked_head_plans_as_the_whole_queue(policy, blocks, sched):
    """SLO-ODBS shown the head its instance core keeps ranked (waiting_head 0) plans exactly
    as it did sorting the whole waiting queue at every micro-batch (-1): same first and last
    token times, same preemptions, for every request of a long queue."""
    ranked, longest = _queue_run(policy, 0, blocks, **sched)
    whole, _ = _queue_run(policy, -1, blocks, **sched)
    assert longest > 60  # the queue really was long: the head shown was a small part of it
    assert ranked == whole
    head_only, _ = _queue_run(policy, 2, blocks, **sched)
    assert head_only != whole  # shown only the arrival head, it plans otherwise: teeth


@pytest.mark.parametrize("late_last", [False, True])
def test_ranked_waiting_returns_the_first_k_of_the_exact_order(late_last):
    """Two drifts (with and without a deadline), exact ties and near ties, and requests
    turning late as the clock moves: top(now, k) holds the k first requests of sorting all by
    the policy's own order, at several times."""
    from common.instance import CoreRequest
    from common.instance.ranked import RankedWaiting

    policy = make_policy("slo-odbs", late_last=late_last, late_for_s=2.0)
    rng = random.Random(3)
    ranked = RankedWaiting(policy.rank_key)
    reqs = []
    for i in range(400):
        slo = rng.choice([SLO(0.5), SLO(2.0), None])
        r = CoreRequest(i, rng.choice([0.0, 0.1, rng.uniform(0, 5)]), 16, 1000, 1 << 20, slo=slo)
        r.predicted_output = rng.choice([10, 50, rng.randint(1, 900)])
        reqs.append(r)
        ranked.add(r)
    for r in reqs[::7]:  # some leave
        ranked.remove(r)
    live = [r for i, r in enumerate(reqs) if i % 7]
    assert len(ranked) == len(live)
    for now in (0.0, 0.3, 1.7, 2.1, 4.0, 60.0, 1e6):
        exact = policy.ordered(tuple(live), now)
        late = sum(now > r.arrival + r.slo.ttft_s for r in live if r.slo is not None)
        assert now < 1.7 or 0 < late < len(live)  # a mix of late and on time
        back = sum(now > r.arrival + r.slo.ttft_s + 2.0 for r in live if r.slo is not None)
        assert now < 4.0 or back > 0  # and some late for longer than late_for_s
        for k in (1, 10, 50, 390):
            top = ranked.top(now, k)
            assert len(top) >= min(k, len(live))
            shown = sorted(top, key=lambda r: r.order)
            first = policy.ordered(tuple(shown), now)[:k]
            assert [r.req_id for r in first] == [r.req_id for r in exact[:k]]
        if now == 1.7:  # one leaves and one comes back while some are late already
            gone = next(r for r in live if r.slo is not None and now > r.arrival + r.slo.ttft_s)
            ranked.remove(gone)
            live.remove(gone)
            comeback = live.pop(0)
            ranked.remove(comeback)
            ranked.add(comeback)
            live.append(comeback)
            live.sort(key=lambda r: r.order)  # ties go by queue position
