"""The simulator's event loop and timing: hand-computed latencies, pipelining, transfers,
preemption under KV exhaustion."""

from __future__ import annotations

import math

import pytest

from common.scheduling.types import InflightView, KVView, RequestView, SchedulerSnapshot
from conveyor.sim.cluster import build_cluster
from conveyor.sim.engine import EventQueue, simulate
from conveyor.sim.report import summarize
from conveyor.sim.requests import SimRequest
from common.instance.views import make_kv, make_snapshot
from conveyor.sim.workload import Workload


class LinearCost:
    """A test double of the CostModel protocol: linear in the micro-batch's tokens."""

    def __init__(self, base: float = 1e-3, per_prefill: float = 1e-5, per_decode: float = 1e-4,
                 hop: float = 0.0):
        self.base, self.per_prefill, self.per_decode, self.hop = (base, per_prefill,
                                                                  per_decode, hop)

    def stage_step_s(self, s) -> float:
        return self.base + self.per_prefill * s.prefill_tokens + self.per_decode * s.decode_tokens

    def transfer_s(self, num_tokens: int) -> float:
        return self.hop


def cluster(stages: int = 1, instances: int = 1, policy: str = "fcfs", blocks: int = 4096,
            link_latency_us: float = 0.0, dispatch_latency_us: float = 0.0, **sched):
    return build_cluster({
        "model": {"shape": "tiny", "max_model_len": 2048},
        "cluster": {"instances": instances, "stages": stages},
        "kvcache": {"num_blocks": blocks, "block_size": 16},
        "scheduler": {"policy": policy, **sched},
        "link": {"latency_us": link_latency_us},
        "simulator": {"dispatch_latency_us": dispatch_latency_us, "waiting_head": -1},
    })


def burst(n: int, prompt: int, output: int) -> Workload:
    return Workload([0.0] * n, [prompt] * n, [output] * n)


# ---- the event queue ----------------------------------------------------------------------------

def test_events_run_in_time_order_then_push_order():
    q = EventQueue()
    seen = []

    def note(tag, t):
        seen.append((t, tag))
        if tag == "a":  # an event pushed while running runs in its place in time
            q.push(2.5, note, "from-a")

    q.push(3.0, note, "c")
    q.push(1.0, note, "a")
    q.push(2.0, note, "b1")
    q.push(2.0, note, "b2")
    q.run_until(2.0)  # inclusive
    assert seen == [(1.0, "a"), (2.0, "b1"), (2.0, "b2")]
    assert q.now == 2.0
    q.run()
    assert seen[3:] == [(2.5, "from-a"), (3.0, "c")]
    with pytest.raises(ValueError, match="past"):
        q.push(1.0, note, "late")


def test_fast_snapshots_equal_constructed_ones():
    r = SimRequest(7, 6, 0.5, 100, 20, 20, 2048, ignore_eos=True)
    view = RequestView(7, 0.5, 100, 100, 0, 0, 20)
    kv = make_kv(100, 40, 16)
    assert kv == KVView(100, 40, 16)
    snap = make_snapshot(1.0, 4, (view,), (r,), 1, (InflightView(1, 0),), kv)
    assert snap == SchedulerSnapshot(1.0, 4, (view,), (r,), 1, (InflightView(1, 0),),
                                     KVView(100, 40, 16))


# ---- exact timings ------------------------------------------------------------------------------

def test_one_stage_one_request_matches_the_hand_calculation():
    cost = LinearCost(base=1e-3, per_prefill=1e-5, per_decode=1e-4)
    res = simulate(cluster(), cost, Workload([0.25], [100], [5]))
    (r,) = res.requests
    prefill = 1e-3 + 100 * 1e-5       # the whole prompt in one micro-batch, samples token 1
    decode = 1e-3 + 1 * 1e-4          # each further token: a one-decode micro-batch
    assert r.first_token - r.arrival == pytest.approx(prefill, rel=1e-12)
    assert r.last_token - r.arrival == pytest.approx(prefill + 4 * decode, rel=1e-12)
    assert list(r.itl) == pytest.approx([decode] * 4, rel=1e-12)
    summary = summarize(res)
    assert summary["ttft"]["mean"] == pytest.approx(prefill, rel=1e-12)
    assert summary["tpot"]["mean"] == pytest.approx(decode, rel=1e-12)
    assert summary["e2e"]["mean"] == pytest.approx(prefill + 4 * decode, rel=1e-12)
    assert summary["completed"] == 1 and summary["total_output_tokens"] == 5
    assert res.metrics.micro_batches == 5


def test_a_long_prompt_is_chunked_under_the_token_budget():
    cost = LinearCost(base=1e-3, per_prefill=1e-5)
    res = simulate(cluster(max_num_batched_tokens=512), cost, Workload([0.0], [1000], [1]))
    (r,) = res.requests
    # One stage, one micro-batch in flight: 512 tokens, then the last 488 (which samples).
    assert r.first_token == pytest.approx(2 * 1e-3 + 1000 * 1e-5, rel=1e-12)


def test_a_non_final_chunk_in_flight_leaves_the_prompt_schedulable():
    # Two stages of a constant 1 ms: chunk 2 enters stage 0 while chunk 1 is in stage 1.
    cost = LinearCost(base=1e-3, per_prefill=0.0)
    res = simulate(cluster(stages=2, max_num_batched_tokens=512), cost,
                   Workload([0.0], [1000], [1]))
    assert res.requests[0].first_token == pytest.approx(3e-3, rel=1e-12)


@pytest.mark.parametrize("via", ["link", "cost-model"])
def test_transfer_time_adds_per_stage_hop(via):
    d, hop, stages = 2e-3, 5e-4, 4
    if via == "link":
        cfg, cost = cluster(stages=stages, link_latency_us=hop * 1e6), LinearCost(d, 0, 0)
    else:
        cfg, cost = cluster(stages=stages), LinearCost(d, 0, 0, hop=hop)
    res = simulate(cfg, cost, Workload([0.0], [10], [3]))
    (r,) = res.requests
    step = stages * d + (stages - 1) * hop
    assert r.first_token == pytest.approx(step, rel=1e-12)
    assert r.last_token == pytest.approx(3 * step, rel=1e-12)


def test_dispatch_latency_delays_every_micro_batch():
    cost = LinearCost(1e-3, 0, 0)
    res = simulate(cluster(dispatch_latency_us=200), cost, Workload([0.0], [10], [2]))
    assert res.requests[0].last_token == pytest.approx(2 * (1e-3 + 2e-4), rel=1e-12)


# ---- pipelining ---------------------------------------------------------------------------------

def test_a_busy_pipeline_keeps_depth_micro_batches_in_flight_without_bubbles():
    stages = 4
    res = simulate(cluster(stages=stages), LinearCost(1e-3, 0, 0), burst(64, 32, 64))
    assert all(r.finished for r in res.requests)
    inst = res.instances[0]
    assert inst["max_inflight"] == stages
    assert inst["mean_inflight"] > stages - 0.1
    ctl = summarize(res)["controller"]
    assert ctl["mean_bubble_ratio"] < 0.03
    assert all(s["bubble_ratio"] < 0.03 for s in ctl["stages"])
    # Each of the 64 requests is in every 4th micro-batch: 16 decodes each.
    decode = ctl["batch_tokens"]["decode"]
    assert decode["mean"] == pytest.approx(16, abs=1.0)


def test_an_idle_pipeline_is_not_counted_as_bubbles():
    # One request every second, each done in a few ms: the stages idle most of the wall time,
    # but bubbles count only while requests are pending.
    res = simulate(cluster(stages=2), LinearCost(1e-3, 0, 0),
                   Workload([0.0, 1.0, 2.0], [10] * 3, [2] * 3))
    stats = res.metrics.snapshot(res.end_s)
    assert res.end_s > 2.0 and len(stats.stages) == 2
    for s in stats.stages:
        # Pending only while each request runs (a few ms each), not the 2 s between them.
        assert 0 < s.pending_s < 0.05
        assert s.idle_s < 0.05 and s.idle_s <= s.pending_s


# ---- memory pressure ----------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["fcfs", "sarathi", "throttle"])
def test_kv_exhaustion_preempts_and_still_completes_everything(policy):
    # 40 blocks of 16 tokens; each request grows to 64 + 200 tokens = 17 blocks.
    cfg = cluster(stages=2, blocks=40, policy=policy)
    res = simulate(cfg, LinearCost(1e-3, 1e-6, 1e-5), burst(10, 64, 200))
    assert all(r.finished and r.out == 200 for r in res.requests)
    assert res.metrics.preemptions > 0
    assert sum(r.preemptions for r in res.requests) == res.metrics.preemptions
    assert res.instances[0]["max_kv_used"] <= 1.0
    assert res.metrics.finished["length"] == 10
    # All blocks came back: the last gauge sample (time, waiting, running, blocks in use).
    assert res.instances[0]["samples"][-1][1:] == (0, 0, 0)


def test_requests_that_cannot_fit_the_pool_fail_up_front():
    res = simulate(cluster(blocks=8), LinearCost(), Workload([0.0, 0.0], [64, 200], [10, 10]))
    ok, too_big = res.requests
    assert ok.finished and not ok.error
    assert too_big.error and "KV blocks" in too_big.error
    assert summarize(res)["failed"] == 1


def test_worker_processes_give_identical_results():
    cfg = cluster(stages=2, instances=4, policy="throttle")
    wl = Workload([0.01 * i for i in range(40)], [30 + 7 * (i % 5) for i in range(40)],
                  [20 + 3 * (i % 7) for i in range(40)])
    one = simulate(cfg, LinearCost(), wl, workers=1)
    two = simulate(cfg, LinearCost(), wl, workers=2)
    assert two.workers == 2
    key = [(r.instance, r.first_token, r.last_token, r.out) for r in one.requests]
    assert key == [(r.instance, r.first_token, r.last_token, r.out) for r in two.requests]
    assert len({r.instance for r in one.requests}) == 4
    assert one.metrics.snapshot(one.end_s).stages == two.metrics.snapshot(two.end_s).stages
    assert not math.isnan(one.end_s)


@pytest.mark.parametrize("policy", ["fcfs", "sarathi", "throttle"])
def test_the_bounded_waiting_head_plans_as_the_whole_queue(policy):
    """A long queue (rate inf, few seats): the default head (seats + pending tokens) must give
    exactly the run that passing the whole waiting queue gives."""
    import random

    rng = random.Random(5)
    n = 150
    wl = Workload([0.0] * 100 + [0.01 * i for i in range(50)],
                  [rng.randint(4, 120) for _ in range(n)], [rng.randint(2, 40) for _ in range(n)])
    runs = []
    for head in (0, -1, 1):
        cfg = build_cluster({
            "model": {"shape": "tiny"}, "cluster": {"stages": 3},
            "kvcache": {"num_blocks": 300},
            "scheduler": {"policy": policy, "max_num_seqs": 12, "max_num_batched_tokens": 96,
                          "max_prefill_tokens": 96, "prefill_iterations": 4},
            "simulator": {"waiting_head": head}})
        res = simulate(cfg, LinearCost(1e-3, 1e-5, 1e-4), wl)
        assert all(r.finished for r in res.requests)
        runs.append([(r.first_token, r.last_token, r.preemptions) for r in res.requests])
        if head == 0:
            assert res.instances[0]["max_waiting"] > 50  # the head really was a small part
    assert runs[0] == runs[1]
    assert runs[2] != runs[1]  # a head too short does change the plans: the check has teeth


def test_the_cost_model_sees_how_far_prefill_tokens_attend():
    """Two fresh 16-token prompts in one micro-batch attend to 8.5 keys per token on
    average; a 40-token prompt chunked 32 + 8 attends to 16.5, then 32 + 4.5."""
    seen: list = []

    class Recording(LinearCost):
        def stage_step_s(self, s) -> float:
            seen.append((s.prefill_tokens, s.prefill_context))
            return super().stage_step_s(s)

    cfg = build_cluster({"model": {"shape": "tiny", "max_model_len": 2048},
                         "cluster": {"stages": 1},  # one cost call per micro-batch
                         "kvcache": {"num_blocks": 4096, "block_size": 16},
                         "scheduler": {"policy": "sarathi", "max_num_batched_tokens": 32},
                         "simulator": {"context_quantum": 0}})
    simulate(cfg, Recording(), burst(2, 16, 1))
    assert seen[0] == (32, pytest.approx(8.5))
    seen.clear()
    simulate(cfg, Recording(), Workload([0.0], [40], [1]))
    assert seen[:2] == [(32, pytest.approx(16.5)), (8, pytest.approx(36.5))]


def test_the_longest_decode_context_reaches_only_a_cost_model_that_pads():
    """Decodes with contexts 20 and 60 (prompts 20 and 60, one token each so far): the
    mean is 40, the longest 60; a model whose attention pads is told the longest."""
    seen: dict[bool, list] = {True: [], False: []}

    class Recording(LinearCost):
        def __init__(self, pads: bool):
            super().__init__()
            self.pads_decode_context = pads

        def stage_step_s(self, s) -> float:
            if s.decode_tokens:
                seen[self.pads_decode_context].append((s.context_len, s.max_context_len))
            return super().stage_step_s(s)

    cfg = build_cluster({"model": {"shape": "tiny", "max_model_len": 2048},
                         "cluster": {"stages": 1},
                         "kvcache": {"num_blocks": 4096, "block_size": 16},
                         "scheduler": {"policy": "fcfs"}, "simulator": {"context_quantum": 0}})
    for pads in (True, False):
        simulate(cfg, Recording(pads), Workload([0.0, 0.0], [20, 60], [2, 2]))
    assert seen[True][0] == (pytest.approx(40.0), pytest.approx(60.0))
    assert seen[False][0] == (pytest.approx(40.0), None)
