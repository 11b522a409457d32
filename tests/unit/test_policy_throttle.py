"""gLLM Token Throttling on constructed scheduler states and whole simulated workloads."""

import random

import pytest

from common.scheduling import make_policy
from tests.unit.policy_driver import MiniDriver
from tests.unit.policy_helpers import decode, req, snapshot


def throttle(**kw):
    return make_policy("throttle", **kw)


def decodes_in(plan, snap) -> int:
    ids = {r.req_id for r in snap.ready if r.is_decode}
    return sum(1 for c in plan.chunks if c.req_id in ids)


def test_forty_decodes_on_four_stages_go_ten_per_micro_batch():
    policy = throttle()
    ready = [decode(i) for i in range(1, 41)]
    inflight: list[tuple[int, int]] = []
    sizes = []
    for _ in range(4):  # fill the pipeline the way the controller does, one plan at a time
        snap = snapshot(ready=ready, inflight=inflight, depth=4)
        plan = policy.schedule(snap)
        n = decodes_in(plan, snap)
        sizes.append(n)
        chosen = {c.req_id for c in plan.chunks}
        ready = [r for r in ready if r.req_id not in chosen]
        inflight.append((n, 0))
    assert all(9 <= n <= 11 for n in sizes), sizes
    assert sum(sizes) == 40 and not ready


@pytest.mark.parametrize("total", [41, 42, 43, 57])
def test_uneven_decode_counts_are_spread_exactly_over_the_pipeline(total):
    policy = throttle()
    ready = [decode(i) for i in range(1, total + 1)]
    inflight: list[tuple[int, int]] = []
    sizes = []
    for _ in range(4):
        snap = snapshot(ready=ready, inflight=inflight, depth=4)
        plan = policy.schedule(snap)
        sizes.append(decodes_in(plan, snap))
        ready = [r for r in ready if r.req_id not in {c.req_id for c in plan.chunks}]
        inflight.append((sizes[-1], 0))
    assert sum(sizes) == total
    assert max(sizes) - min(sizes) <= 1, sizes


def test_fewer_decodes_than_stages_go_one_at_a_time():
    snap = snapshot(ready=[decode(1), decode(2), decode(3)], depth=4)
    assert decodes_in(throttle().schedule(snap), snap) == 1


def prefill_tokens(policy, free_blocks, waiting, depth=4, total_blocks=1000):
    snap = snapshot(waiting=waiting, total_blocks=total_blocks, free_blocks=free_blocks,
                    depth=depth)
    return policy.schedule(snap).num_tokens


def test_prefill_budget_shrinks_as_kv_utilization_rises():
    waiting = [req(i, 4000) for i in range(1, 3)]  # 8000 pending tokens: never the limit
    policy = throttle(max_prefill_tokens=2048, min_prefill_tokens=32, prefill_iterations=1,
                      kv_threshold=0.05)
    budgets = [prefill_tokens(policy, free, waiting) for free in (1000, 800, 500, 200, 60, 50)]
    assert budgets == sorted(budgets, reverse=True), budgets
    assert budgets[0] == 2048
    # (free_ratio - kvthresh) / (1 - kvthresh) * maxp at 50% free: 0.45/0.95 * 2048
    assert budgets[2] == round(0.45 / 0.95 * 2048)
    assert budgets[-1] == 0  # at the threshold prefill stops entirely


def test_prefill_budget_spreads_pending_tokens_over_iterations():
    policy = throttle(max_prefill_tokens=2048, min_prefill_tokens=32, prefill_iterations=8)
    waiting = [req(i, 100) for i in range(1, 9)]  # 800 pending tokens
    assert prefill_tokens(policy, 1000, waiting) == 100
    # Little pending work: the minimum keeps prompts moving.
    assert prefill_tokens(policy, 1000, [req(1, 20), req(2, 20)]) == 32
    # A single waiting prompt is not spread (gLLM uses the pending-token rule only for >1).
    assert prefill_tokens(policy, 1000, [req(1, 800)]) == 800


def test_one_stage_has_nothing_to_balance_and_uses_the_full_budget():
    policy = throttle(max_prefill_tokens=512, prefill_iterations=8)
    waiting = [req(i, 400) for i in range(1, 5)]
    assert prefill_tokens(policy, 600, waiting, depth=1) == 512


def test_prefill_never_takes_the_reserved_blocks():
    # 100 blocks, 5% reserved: only 20 - 5 = 15 blocks (240 tokens) may go to prompts.
    policy = throttle(kv_threshold=0.05, prefill_iterations=1)
    plan = policy.schedule(snapshot(waiting=[req(1, 1000), req(2, 1000)], total_blocks=100,
                                    free_blocks=20, depth=2))
    assert 0 < plan.num_tokens <= 15 * 16


def test_decodes_are_scheduled_before_prefill_takes_blocks():
    # Two free blocks: the decode needing one must get it even though prompts wait.
    d = decode(1, prompt=12, out=5)  # 16 computed: its next token needs a new block
    plan = throttle(kv_threshold=0.0).schedule(
        snapshot(ready=[d], waiting=[req(2, 64)], total_blocks=10, free_blocks=1, depth=2))
    assert plan.chunks[0].req_id == 1


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="kv_threshold"):
        throttle(kv_threshold=1.5)
    with pytest.raises(ValueError, match="prefill_iterations"):
        throttle(prefill_iterations=0)
    with pytest.raises(ValueError, match="unknown_knob"):
        make_policy("throttle", unknown_knob=3)


def workload(driver: MiniDriver, n: int, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(n):
        driver.add(prompt=rng.randint(8, 300), max_out=rng.randint(1, 60))


@pytest.mark.parametrize("name", ["fcfs", "sarathi", "throttle"])
@pytest.mark.parametrize("total_blocks", [80, 2000])
def test_every_request_finishes_under_memory_pressure_and_without(name, total_blocks):
    driver = MiniDriver(make_policy(name), depth=4, total_blocks=total_blocks)
    workload(driver, 60, seed=7)
    driver.run()
    assert all(r.out == r.max_tokens for r in driver.requests)
    # 60 prompts of up to 300 tokens need far more than 80 blocks of 16 at once: the policy
    # must preempt to make room (and the requests still finish); 2000 blocks hold them all.
    assert (driver.preemptions > 0) == (total_blocks == 80), driver.preemptions


def test_steady_decode_work_per_micro_batch_is_even_with_throttle_not_sarathi():
    """The point of Token Throttling: with prompts arriving while others decode, the decode
    count per micro-batch stays near total/P with throttle, and swings with sarathi."""
    spreads = {}
    for name in ("sarathi", "throttle"):
        driver = MiniDriver(make_policy(name), depth=4, total_blocks=5000)
        for _ in range(40):
            driver.add(prompt=64, max_out=200)
        for step in range(400):
            if step % 10 == 0:
                driver.add(prompt=200, max_out=200)
            driver.step()
        counts = [b.decode for b in driver.history[100:]]
        mean = sum(counts) / len(counts)
        spreads[name] = (sum((c - mean) ** 2 for c in counts) / len(counts)) ** 0.5 / mean
    assert spreads["throttle"] < 0.15, spreads
    assert spreads["throttle"] < spreads["sarathi"] / 2, spreads
