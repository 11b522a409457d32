"""Progressive per-stage SLO allocation (common/scheduling/slo_allocation.py) and the Planck
policies' order, on hand-computed cases."""

import dataclasses
import math

import pytest

from common.instance import CoreRequest
from common.scheduling.policy import make_policy
from common.scheduling.slo_allocation import pass_deadline, resplit, split
from common.scheduling.types import SLO, RequestView
from tests.unit.policy_driver import MiniDriver
from tests.unit.policy_helpers import decode, req, snapshot


def test_split_is_proportional_to_expected_stage_times():
    assert split(0.3, [0.01, 0.02, 0.03]) == pytest.approx([0.05, 0.10, 0.15])
    assert split(0.3, [0.0, 0.0, 0.0]) == pytest.approx([0.1, 0.1, 0.1])  # nothing known yet
    assert split(-0.06, [0.01, 0.02, 0.03]) == pytest.approx([-0.01, -0.02, -0.03])


def test_resplit_passes_an_overrun_and_a_saving_downstream():
    expected = [0.01, 0.02, 0.03]
    # Deadline 1.0; dispatched at 0.7, stage 0's share was 0.05. It left stage 0 at 0.75,
    # exactly on budget: stages 1 and 2 keep 0.10 and 0.15.
    assert resplit(1.0, 0.75, expected, 1) == pytest.approx([0.10, 0.15])
    # It left at 0.80 (0.05 late): stages 1 and 2 absorb it in proportion, 0.08 and 0.12.
    assert resplit(1.0, 0.80, expected, 1) == pytest.approx([0.08, 0.12])
    # It left at 0.72 (0.03 early): the saving goes on, 0.112 and 0.168.
    assert resplit(1.0, 0.72, expected, 1) == pytest.approx([0.112, 0.168])
    # Past the deadline every stage left is behind.
    assert resplit(1.0, 1.05, expected, 2) == pytest.approx([-0.05])


def _with(view: RequestView, **kw) -> RequestView:
    return dataclasses.replace(view, **kw)


def test_pass_deadlines_share_the_ttft_over_passes_and_count_tpot_from_the_first_token():
    prompt = _with(req(1, 1000, arrival=0.0), slo=SLO(2.0, 0.1))
    # 1000 tokens in chunks of 512: 2 passes left of the 1.5 s to the TTFT deadline.
    assert pass_deadline(prompt, 0.5, 512, 60.0, 2.0) == pytest.approx(0.5 + 1.5 / 2)
    half = _with(prompt, num_computed=512, num_blocks=32)
    assert pass_deadline(half, 1.0, 512, 60.0, 2.0) == pytest.approx(2.0)  # last pass
    dec = _with(decode(2, prompt=20, out=3), slo=SLO(2.0, 0.1), first_token=1.0)
    # Token 4 is due 3 TPOTs after the first: progressive, a late token shortens the next.
    assert pass_deadline(dec, 1.25, 512, 60.0, 2.0) == pytest.approx(1.3)
    plain = decode(3, prompt=20, out=3)
    plain = _with(plain, first_token=1.0)
    assert pass_deadline(plain, 1.25, 512, 60.0, 2.0) == pytest.approx(1.0 + 3 * 2.0)


@pytest.mark.parametrize("name", ["planck", "planck-throttle"])
def test_least_slack_first_and_the_plan_carries_its_deadline(name):
    policy = make_policy(name, {"controller": False})
    loose = _with(req(1, 100, arrival=990.0), slo=SLO(60.0, 2.0))
    tight = _with(req(2, 100, arrival=999.0), slo=SLO(2.0, 0.1))
    budget = {"max_num_batched_tokens": 100} if name == "planck" else {
        "max_prefill_tokens": 100, "min_prefill_tokens": 100}
    policy = make_policy(name, {"controller": False, **budget})
    plan = policy.schedule(snapshot(waiting=[loose, tight]))
    assert [c.req_id for c in plan.chunks] == [2]  # the later, tighter one goes first
    assert plan.deadline == pytest.approx(999.0 + 2.0)
    fifo = make_policy(name, {"controller": False, "allocation": False, **budget})
    assert [c.req_id for c in fifo.schedule(snapshot(waiting=[loose, tight])).chunks] == [1]


def test_a_loose_request_is_not_starved_by_a_stream_of_tight_ones():
    """One prompt fits a micro-batch; a tight request (TTFT 2 s) arrives every step for 200
    steps. The loose one (TTFT 60 s) is admitted once its deadline is the earliest: by step
    ~58, not after the stream."""
    policy = make_policy("planck", {"controller": False, "max_num_batched_tokens": 64,
                                    "max_num_seqs": 4})
    d = MiniDriver(policy, depth=2, total_blocks=10_000)
    loose = CoreRequest(1, 0.0, 64, 1, 1 << 30, slo=SLO(60.0, 2.0))
    d.requests.append(loose)
    d.core.add(loose, 0.0)
    for i in range(200):
        r = CoreRequest(i + 2, d.now, 64, 1, 1 << 30, slo=SLO(2.0, 0.1))
        d.requests.append(r)
        d.core.add(r, d.now)
        d.step()
        if loose.first_scheduled is not None:
            break
    assert loose.first_scheduled is not None and loose.first_scheduled <= 60.0
    d.run()
    assert all(r.finished for r in d.requests)


def test_requests_without_an_slo_get_the_default_targets():
    policy = make_policy("planck", {"controller": False, "default_ttft_s": 5.0})
    r = req(1, 100, arrival=0.0)
    assert policy._deadline(r, 0.0) == pytest.approx(5.0)
    assert math.isfinite(policy._deadline(r, 0.0))
