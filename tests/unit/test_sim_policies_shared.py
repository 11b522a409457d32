"""The simulator runs the policy objects of common.scheduling, not copies of them: a policy
registered at run time changes what it simulates, and the built-in ones behave in simulation
as documented (gLLM's even decode work per micro-batch with throttle, not with sarathi)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

import common.scheduling.policy as registry
from common.scheduling import register_policy
from common.scheduling.fcfs import FCFSPolicy
from common.scheduling.types import MicroBatchPlan, PlanBuilder, SchedulerSnapshot
from conveyor.sim.cluster import build_cluster
from conveyor.sim.engine import simulate
from conveyor.sim.report import summarize
from conveyor.sim.workload import Workload


class LinearCost:
    """CostModel test double: a fixed cost per step plus a cost per token of each kind."""

    def __init__(self, base=1e-3, per_prefill=2e-6, per_decode=1e-4):
        self.base, self.per_prefill, self.per_decode = base, per_prefill, per_decode

    def stage_step_s(self, s) -> float:
        return self.base + self.per_prefill * s.prefill_tokens + self.per_decode * s.decode_tokens

    def transfer_s(self, num_tokens: int) -> float:
        return 0.0


def cluster(policy: str, stages: int = 4, **sched):
    return build_cluster({"model": {"shape": "tiny", "max_model_len": 2048},
                          "cluster": {"instances": 1, "stages": stages},
                          "kvcache": {"num_blocks": 4096},
                          "scheduler": {"policy": policy, **sched}})


def workload(n: int = 48, seed: int = 1) -> Workload:
    import random

    rng = random.Random(seed)
    return Workload([0.002 * i for i in range(n)], [rng.randint(16, 200) for _ in range(n)],
                    [rng.randint(40, 160) for _ in range(n)])


@dataclass
class OneDecodePolicy(FCFSPolicy):
    """Test-only: FCFS, but at most one decode per micro-batch (and a knob of its own)."""

    name = "test-one-decode"
    max_decodes: int = 1

    def schedule(self, snap: SchedulerSnapshot) -> MicroBatchPlan:
        plan = PlanBuilder(snap, self.max_num_batched_tokens, self.max_num_seqs)
        decodes = 0
        for req in snap.ready:
            if req.is_decode:
                if decodes >= self.max_decodes:
                    continue
                decodes += plan.try_add(req, 1)
            elif plan.token_budget > 0:
                plan.try_add(req, min(req.pending, plan.token_budget))
        for req in snap.waiting:
            if plan.token_budget <= 0 or plan.seats_used >= self.max_num_seqs:
                break
            if not plan.try_add(req, min(req.pending, plan.token_budget)):
                break
        return plan.build()


@pytest.fixture(scope="module", autouse=True)
def _registered():
    """Registered only while this module's tests run, not at import: pytest imports every
    module before running any, and a policy registered then would be in every config the
    other tests save (their child processes do not know it)."""
    register_policy(OneDecodePolicy)
    yield
    registry._POLICIES.pop(OneDecodePolicy.name, None)


def decode_stats(res) -> tuple[float, float, float]:
    m = res.metrics.decode_per_batch
    mean = m.sum / m.count
    return mean, math.sqrt(max(0.0, m.sumsq / m.count - mean * mean)), m.sumsq - m.sum


def test_a_registered_policy_drives_the_simulation():
    wl = workload()
    capped = simulate(cluster("test-one-decode"), LinearCost(), wl)
    assert isinstance(capped.cfg.make_policy(), OneDecodePolicy)
    assert all(r.finished for r in capped.requests)
    mean, _, excess = decode_stats(capped)
    # Every micro-batch holds 0 or 1 decodes: then sum of squares == sum exactly.
    assert excess == 0 and 0 < mean <= 1
    plain = simulate(cluster("fcfs"), LinearCost(), wl)
    assert decode_stats(plain)[0] > 2 * mean
    assert plain.metrics.micro_batches < capped.metrics.micro_batches
    # Its own parameter comes from the cluster file like any built-in one.
    two = simulate(cluster("test-one-decode", max_decodes=2), LinearCost(), wl)
    assert two.cfg.make_policy().max_decodes == 2
    assert decode_stats(two)[0] > mean
    assert summarize(two)["completed"] == len(wl)


@pytest.mark.parametrize("policy", ["fcfs", "sarathi", "throttle"])
def test_every_builtin_policy_finishes_the_workload(policy):
    wl = workload(60, seed=3)
    res = simulate(cluster(policy), LinearCost(), wl)
    assert all(r.finished and r.out == r.max_tokens for r in res.requests)
    s = summarize(res)
    assert s["completed"] == 60 and s["failed"] == 0
    assert s["total_output_tokens"] == sum(wl.output_len)
    assert s["controller"]["policy"] == policy


def test_throttle_evens_out_decode_work_per_micro_batch_where_sarathi_bunches_it():
    """gLLM's Figure 2 on a simulated 4-stage pipeline: 40 requests decoding while longer
    prompts keep arriving. Sarathi takes whatever decodes happen to be ready, so the decodes
    travel in bunches (e.g. 14, 59, 15, 12, ...); throttle takes about 1/P of them all every
    time."""
    wl = Workload([0.0] * 40 + [0.02 * (i + 1) for i in range(60)], [64] * 40 + [200] * 60,
                  [200] * 100)
    cost = LinearCost(base=1e-3, per_prefill=5e-6, per_decode=2e-4)
    spread, steady = {}, {}
    for policy in ("sarathi", "throttle"):
        cfg = cluster(policy, max_num_batched_tokens=512, max_prefill_tokens=512)
        counts: list[int] = []
        make = cfg.make_policy

        class Counting:  # the real policy object, its decode count per plan noted
            def __init__(self):
                self.inner = make()

            def schedule(self, snap):
                plan = self.inner.schedule(snap)
                decodes = {r.req_id for r in snap.ready if r.is_decode}
                if plan.chunks:
                    counts.append(sum(c.req_id in decodes for c in plan.chunks))
                return plan

        cfg.make_policy = Counting
        res = simulate(cfg, cost, wl)
        assert all(r.finished for r in res.requests)
        mean, std, _ = decode_stats(res)  # the controller's moments over the whole run
        spread[policy] = std / mean
        window = counts[len(counts) // 4: 3 * len(counts) // 4]
        m = sum(window) / len(window)
        steady[policy] = math.sqrt(sum((c - m) ** 2 for c in window) / len(window)) / m
    assert spread["throttle"] < 0.6 * spread["sarathi"], spread
    assert steady["throttle"] < 0.1 < 0.5 < steady["sarathi"], steady
