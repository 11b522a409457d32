"""The stage feedback (common/instance/feedback.py) and the stage controller
(common/scheduling/stage_control.py): the step-time model, the queue counts, the core's one
in-flight rule, and the controller's response to a step in load in the simulator."""

import dataclasses
from pathlib import Path

import pytest

from common.instance import InstanceCore
from common.instance.feedback import StageFeedback, StepTimeModel
from common.scheduling.policy import make_policy
from common.scheduling.stage_control import ControllerGains, StageController
from common.scheduling.types import SLO, InflightView, StageView
from common.stats import ControllerMetrics
from tests.unit.policy_driver import MiniDriver
from tests.unit.policy_helpers import req, snapshot

ROOT = Path(__file__).resolve().parents[2]


def test_the_step_time_model_recovers_a_linear_stage():
    m = StepTimeModel(forgetting=0.98)
    shapes = [(0, 8), (512, 4), (128, 16), (0, 32), (2048, 0), (256, 8)] * 20
    for p, d in shapes:
        m.update(p, d, 0.002 + 1e-5 * p + 2e-4 * d)
    assert m.predict(1000, 10) == pytest.approx(0.002 + 1e-2 + 2e-3, rel=1e-3)
    assert m.theta[1] == pytest.approx(1e-5, rel=1e-3)


def test_the_model_stays_finite_when_a_direction_is_never_excited():
    m = StepTimeModel(forgetting=0.9)
    for _ in range(5000):  # decode only: prefill never seen, forgetting inflates its variance
        m.update(0, 16, 0.01)
    assert m.predict(0, 16) == pytest.approx(0.01, rel=1e-6)
    assert all(abs(v) < 1e7 for row in m.cov for v in row)


class _Batch:
    def __init__(self, done):
        self.stages_done = done


def test_queues_count_the_micro_batches_each_stage_holds():
    fb = StageFeedback(4)
    assert fb.queue_lengths([_Batch(0), _Batch(0), _Batch(1), _Batch(3)]) == [2, 1, 0, 1]


class _Allow:
    """fcfs that allows two micro-batches in flight, whatever is configured."""

    def __init__(self):
        self.inner = make_policy("fcfs")
        self.seen = []

    reads_stage_feedback = True

    def schedule(self, snap):
        self.seen.append(snap.stages)
        return self.inner.schedule(snap)

    def inflight_allowance(self, configured, stages):
        return 2


def test_the_core_obeys_the_policy_allowance_and_takes_stage_reports():
    policy = _Allow()
    core = InstanceCore(0, 4, 4, 16, 1000, ControllerMetrics(started=0.0))
    d = MiniDriver(policy, depth=4, total_blocks=1000)
    d.core = core
    for _ in range(6):
        d.add(400, 4)  # one prompt per 512-token micro-batch
    while (plan := core.next_plan(policy, 0.0)) is not None:
        core.commit(plan, 0.0, policy)
    assert len(core.inflight) == 2 and core.allowance == 2
    first = next(iter(core.inflight.values()))
    core.stage_done(first.mb_id, 0, 0.01, 0.0)
    core.stage_done(first.mb_id, 2, 0.02, 0.001)  # overtook stage 1's report
    assert first.stages_done == 3 and first.iview.stages_done == 3
    assert core.feedback.queue_lengths(core.inflight.values()) == [1, 0, 0, 1]
    views = core.stage_views()
    assert views[0].queue == 1 and views[0].step_s == pytest.approx(0.01)
    assert views[3].queue == 1 and views[3].steps == 0


def _views(queues, step=0.01, completed=0):
    return tuple(StageView(stage=s, queue=q, step_s=step, completed=completed)
                 for s, q in enumerate(queues))


def test_the_pi_lowers_admission_when_a_stage_is_over_target_and_clamps():
    c = StageController(ControllerGains(kp=0.2, ki=0.1, min_target=1.0, max_target=2.0,
                                        min_inflight=0, max_inflight=0,
                                        min_prefill_fraction=0.25, initial_headroom=0.5))
    assert c.allowance(4, 4) == 6 and c.prefill_cap(2048) == 1280
    for k in range(1, 30):  # a stage holding 4 against a target of 2: error -2 each time
        c.update(_views([0, 0, 0, 4], completed=k), (), 0.0, float("inf"))
    assert c.u == 0.0 and c.allowance(4, 4) == 4 and c.prefill_cap(2048) == 512
    for k in range(30, 60):  # queues short but nobody waits: no windup upwards
        c.update(_views([0, 0, 0, 0], completed=k), (), 0.0, float("inf"), demand=False)
    assert c.u == 0.0
    c.update(_views([0, 0, 0, 0], completed=60), (), 0.0, float("inf"), demand=True)
    assert c.u > 0.0
    c.update(_views([0, 0, 0, 0], completed=60), (), 0.0, float("inf"), demand=True)
    assert c.u == pytest.approx(0.1 * 2.0)  # error +2, unchanged: only the integral term
    c.update(_views([0, 0, 0, 0], completed=60), (), 0.0, float("inf"), demand=True)
    assert c.u == pytest.approx(0.2)  # the same completion counts once


def test_little_law_targets_follow_the_stage_budgets():
    c = StageController(ControllerGains(0.0, 0.0, 1.0, 8.0, 0, 0, 0.25, 0.5))
    # A pass budget of 0.12 s over four stages of 10, 10, 10, 30 ms: 0.02, 0.02, 0.02, 0.06;
    # micro-batches pass at the bottleneck's 1/0.03 per second: targets 1 (clamped), 2.
    stages = tuple(StageView(stage=s, queue=0, step_s=t, completed=1)
                   for s, t in enumerate((0.01, 0.01, 0.01, 0.03)))
    c.update(stages, (), 0.0, 0.12)
    assert c.budgets == pytest.approx([0.02, 0.02, 0.02, 0.06])
    assert c.targets == pytest.approx([1.0, 1.0, 1.0, 2.0])


def _late_snapshot(completed: int, late: bool):
    """Three stages, one micro-batch at each (the last stage holding two: over its target of
    one), ten 400-token prompts of the interactive class waiting. late: every deadline, in
    flight and waiting, is already past (every stage's budget negative); else 10 s ahead."""
    ahead = -5.0 if late else 10.0
    waiting = [dataclasses.replace(req(i, 400, arrival=990.0), slo=SLO(10.0 + ahead, 0.3))
               for i in range(1, 11)]
    snap = snapshot(waiting=waiting, depth=3)
    return dataclasses.replace(
        snap, inflight=tuple(InflightView(0, 64, done, snap.now + ahead) for done in range(3)),
        stages=tuple(StageView(stage=s, queue=q, step_s=0.1, completed=completed)
                     for s, q in enumerate((1, 1, 2))))


def _prefill(plan) -> int:
    return sum(c.num_tokens for c in plan.chunks)


@pytest.mark.parametrize("release", [True, False])
def test_when_every_budget_is_lost_admission_falls_back_to_throttle(release):
    """Every stage's budget negative and the last stage over its target: the controller's
    error stays at -1. With release_when_late the policy admits what Token Throttling alone
    admits, the configured 4 in flight (scheduler.max_inflight) and throttle's whole prefill
    budget; without it the headroom sinks to 0, the allowance to its floor P = 3 and the
    prefill cap to min_prefill_fraction (25%) of the 512-token chunk. Once the budgets are
    positive again the controller acts again, from the headroom it held (0.5)."""
    policy = make_policy("planck-throttle", {"release_when_late": release})
    throttle = make_policy("throttle")
    for k in range(1, 40):
        plan = policy.schedule(_late_snapshot(k, late=True))
    stages = _late_snapshot(40, late=True).stages
    admitted = _prefill(throttle.schedule(_late_snapshot(40, late=True)))
    assert admitted == 500  # 4000 pending tokens over 8 iterations
    if release:
        assert _prefill(plan) == admitted and policy.inflight_allowance(4, stages) == 4
        # Budgets 10/3, 5 and 10 s: every target 2 (clamped), error 2 - 2 = 0, a step of +1:
        # u = 0.5 + kp 0.2 = 0.7, 3 + 0.7 x 3 = 5.1 in flight, the cap 0.775 x 512 = 396.
        assert _prefill(policy.schedule(_late_snapshot(40, late=False))) == 396
        assert policy.inflight_allowance(4, stages) == 5
    else:
        assert policy.stage_control.u == 0.0
        assert _prefill(plan) == 128 and policy.inflight_allowance(4, stages) == 3


def _step_response(policy, **settings):
    """The uneven 4-stage H100 cluster (the last stage the bottleneck), idle, then a step to
    50 requests/s for 8 s. Per micro-batch that left the pipeline after the step: the
    bottleneck's queue and the allowance as the controller saw them then (the first sample at
    or after each completion); and the run's end."""
    from conveyor.sim.cluster import build_cost_model, load_cluster
    from conveyor.sim.engine import simulate
    from conveyor.sim.workload import Workload

    base = load_cluster(ROOT / "deploy/clusters/h100-4stage-uneven.toml",
                        {"simulator.sample_points": 50000,  # a sample every scheduling round
                         "simulator.stage_queue_samples": True})
    arrivals = [5.0 + i * 0.02 for i in range(400)]
    r = simulate(base.with_policy(policy, **settings), build_cost_model(base, None),
                 Workload.from_lengths([(256, 256)] * len(arrivals), arrivals))
    samples = [s for s in r.instances[0]["stage_samples"] if 5.0 <= s[0] <= 13.0]
    first = samples[0][3]
    seen: dict[int, tuple[int, int]] = {}
    for _, queues, allowed, completed in samples:
        seen.setdefault(completed - first, (queues[3], allowed))
    return [seen[k] for k in sorted(seen)], r.end_s


def test_after_a_load_step_the_bottleneck_queue_returns_to_target_within_bounded_micro_batches():
    """The controller starts at half headroom (6 in flight of P..2P = 4..8): after the step
    the bottleneck's queue overshoots its target (2, the target without a tighter budget),
    and within 24 micro-batches it is back and stays there, the allowance down at P, at the
    throughput of Token Throttling alone. It acts on each stage's queue smoothed over the
    micro-batches that leave (queue_smoothing 0.25): on the count itself, which swings by one
    within a pipeline cycle, it cycles between P and P + 1 in flight for as long as the load
    lasts, the queue over target at a third of the completions."""
    path, end = _step_response("planck-throttle")
    assert max(q for q, _ in path[:24]) >= 3  # the overshoot the step causes
    assert all(q <= 2 for q, _ in path[24:]) and len(path) > 500
    assert all(allowed == 4 for _, allowed in path[24:])
    _, throttle_end = _step_response("throttle")
    assert end <= throttle_end * 1.01  # no throughput given up (it ends sooner here)
    raw, _ = _step_response("planck-throttle", queue_smoothing=1.0)
    over = sum(q > 2 for q, _ in raw[24:]) / len(raw[24:])
    assert over > 0.2 and {a for _, a in raw[24:]} == {4, 5}


def test_stage_gauges_reach_conveyor_stats_and_prometheus():
    from common.stats import ControllerStats, InstanceStats, StageLive
    from services.ingress.prometheus import render

    inst = InstanceStats(instance=0, inflight_allowed=6,
                         stages=[StageLive(stage=0, queue=1, step_s=0.01, budget_s=0.02,
                                           target_queue=2.0),
                                 StageLive(stage=1, queue=3, step_s=0.03)])
    text = render(ControllerStats(instances=[inst]), "m").decode()
    assert 'conveyor_stage_queue_micro_batches{instance="0",model_name="m",stage="1"} 3.0' in text
    assert 'conveyor_stage_slo_budget_seconds{instance="0",model_name="m",stage="0"} 0.02' in text
    assert 'stage="1"' not in text.split("conveyor_stage_slo_budget_seconds")[2].split("#")[0]
    assert 'conveyor_num_micro_batches_allowed{instance="0",model_name="m"} 6.0' in text
    assert ControllerStats.from_builtins(ControllerStats(instances=[inst]).to_builtins()) \
        .instances[0].stages[1].queue == 3
