"""Sarathi-Serve stall-free batching on constructed scheduler states."""

import random

from common.scheduling import make_policy
from common.scheduling.types import ScheduledChunk
from tests.unit.policy_helpers import decode, req, snapshot


def sarathi(**kw):
    return make_policy("sarathi", **kw)


def test_decodes_go_first_even_behind_an_earlier_long_prompt():
    # Request 1 arrived first and is mid-prefill; FCFS would give it the budget first.
    long_prompt = req(1, 2000, computed=512)
    snap = snapshot(ready=[long_prompt, decode(2), decode(3)])
    plan = sarathi(max_num_batched_tokens=256).schedule(snap)
    assert plan.chunks == (ScheduledChunk(2, 1), ScheduledChunk(3, 1), ScheduledChunk(1, 254))
    fcfs = make_policy("fcfs", max_num_batched_tokens=256).schedule(snap)
    assert fcfs.chunks == (ScheduledChunk(1, 256),)  # FCFS stalls both decodes


def test_new_prompts_fill_what_the_decodes_leave():
    snap = snapshot(ready=[decode(1)], waiting=[req(2, 100), req(3, 400)])
    plan = sarathi(max_num_batched_tokens=300).schedule(snap)
    assert plan.chunks == (ScheduledChunk(1, 1), ScheduledChunk(2, 100), ScheduledChunk(3, 199))


def test_never_exceeds_its_budget_on_random_states():
    rng = random.Random(3)
    for trial in range(300):
        budget = rng.choice([16, 64, 256, 512])
        ready = [decode(i) if rng.random() < 0.7 else req(i, rng.randint(20, 900),
                                                           computed=rng.randint(1, 19))
                 for i in range(1, rng.randint(1, 80))]
        waiting = [req(100 + i, rng.randint(1, 900)) for i in range(rng.randint(0, 20))]
        snap = snapshot(ready=ready, waiting=waiting, total_blocks=rng.randint(50, 5000),
                        free_blocks=None)
        plan = sarathi(max_num_batched_tokens=budget).schedule(snap)
        assert plan.num_tokens <= budget, (trial, plan)
        assert len({c.req_id for c in plan.chunks}) == len(plan.chunks)


def test_decodes_beyond_the_budget_rotate_by_readiness():
    # Budget 2, three decodes: the one that waited longest for a seat goes first.
    ready = [decode(1, last_scheduled=9.0), decode(2, last_scheduled=5.0),
             decode(3, last_scheduled=7.0)]
    plan = sarathi(max_num_batched_tokens=2).schedule(snapshot(ready=ready))
    assert [c.req_id for c in plan.chunks] == [2, 3]
