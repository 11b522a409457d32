"""Stage feedback: what each stage of an instance's pipeline reports back, kept for the policy.

Both drivers call `StageFeedback.step_done` once per stage per micro-batch: the controller on
every `StepDone` (services/controller/service.py), the simulator lazily once its clock passes a
stage's end time (conveyor/sim/state.py). From these reports it keeps, per stage:

* a step-time model, `compute_s ~ base + per_prefill * prefill + per_decode * decode`, fit
  online by recursive least squares with a forgetting factor (old steps fade, so a stage that
  slows down, or a workload that moves, is followed within ~1/(1 - forgetting) steps);
* the recent mean step time and mean input wait (exponential averages with the same factor);
* its queue: micro-batches that have reached the stage (the previous stage is done with them;
  for stage 0, dispatched) and that it is not yet done with, the one in service included. The
  queues add up to the micro-batches in flight. They are counted from each in-flight
  micro-batch's progress (`CoreBatch.stages_done`), so they cannot drift when a micro-batch
  is lost or reports arrive out of order.

Policies see it as `SchedulerSnapshot.stages`, a tuple of `StageView` (common/scheduling/types).
"""

from __future__ import annotations

from collections.abc import Iterable

from common.scheduling.types import StageView
from common.stats import StageLive

PRIOR_VARIANCE = 1e6
"""The least-squares fit's initial uncertainty: large, so the first few steps decide it."""


class StepTimeModel:
    """Recursive least squares over x = (1, prefill tokens, decode tokens), with forgetting.

    Pure Python on three parameters (no numpy: it runs once per stage per micro-batch)."""

    __slots__ = ("theta", "cov", "forgetting", "count", "mean_s", "mean_wait_s")

    def __init__(self, forgetting: float = 0.98):
        if not 0 < forgetting <= 1:
            raise ValueError("forgetting must be in (0, 1]")
        self.forgetting = forgetting
        self.theta = [0.0, 0.0, 0.0]
        self.cov = [[PRIOR_VARIANCE if i == j else 0.0 for j in range(3)] for i in range(3)]
        self.count = 0
        self.mean_s = 0.0
        self.mean_wait_s = 0.0

    def update(self, prefill: int, decode: int, compute_s: float, wait_s: float = 0.0) -> None:
        lam = self.forgetting
        x = (1.0, float(prefill), float(decode))
        p = self.cov
        px = [p[i][0] * x[0] + p[i][1] * x[1] + p[i][2] * x[2] for i in range(3)]
        denom = lam + x[0] * px[0] + x[1] * px[1] + x[2] * px[2]
        if denom > 0 and denom < float("inf"):
            gain = [v / denom for v in px]
            err = compute_s - (self.theta[0] + self.theta[1] * x[1] + self.theta[2] * x[2])
            self.theta = [t + g * err for t, g in zip(self.theta, gain)]
            cov = [[(p[i][j] - gain[i] * px[j]) / lam for j in range(3)] for i in range(3)]
            # Forgetting inflates the covariance along directions the steps do not excite
            # (no prefill for a while, say) without bound: cap it at the prior, so the fit
            # stays finite and merely stays ready to learn there.
            trace = cov[0][0] + cov[1][1] + cov[2][2]
            if not trace <= 3 * PRIOR_VARIANCE:
                k = 3 * PRIOR_VARIANCE / trace if trace < float("inf") else 0.0
                cov = ([[v * k for v in row] for row in cov] if k else
                       [[PRIOR_VARIANCE if i == j else 0.0 for j in range(3)] for i in range(3)])
            self.cov = cov
        self.count += 1
        # Exponential averages, started at the first report rather than at 0.
        a = 1.0 / self.count if self.count < 1 / (1 - lam + 1e-12) else 1 - lam
        self.mean_s += a * (compute_s - self.mean_s)
        self.mean_wait_s += a * (wait_s - self.mean_wait_s)

    def predict(self, prefill: int, decode: int) -> float:
        """Seconds for a step of this shape (the recent mean until the fit has seen 3 steps;
        never below 0)."""
        if self.count < 3:
            return self.mean_s
        t = self.theta
        return max(t[0] + t[1] * prefill + t[2] * decode, 0.0)


class StageFeedback:
    """The stages' reports of one instance (owned by its InstanceCore)."""

    def __init__(self, depth: int, forgetting: float = 0.98):
        self.depth = depth
        self.models = [StepTimeModel(forgetting) for _ in range(depth)]
        self.reports = 0
        """Stage reports taken in all (a policy can tell a fresh view from a stale one)."""
        self.completed = 0
        """Micro-batches that left the last stage."""

    def step_done(self, stage: int, prefill: int, decode: int, compute_s: float,
                  wait_s: float) -> None:
        self.models[stage].update(prefill, decode, compute_s, wait_s)
        self.reports += 1
        if stage == self.depth - 1:
            self.completed += 1

    def queue_lengths(self, inflight: Iterable) -> list[int]:
        """Per stage, the in-flight micro-batches done up to the stage before it and not at it
        (`stages_done == s`)."""
        last = self.depth - 1
        queues = [0] * self.depth
        for b in inflight:
            queues[min(b.stages_done, last)] += 1
        return queues

    def views(self, inflight: Iterable) -> tuple[StageView, ...]:
        queues = self.queue_lengths(inflight)
        return tuple(StageView(stage=s, queue=queues[s], step_s=m.mean_s, wait_s=m.mean_wait_s,
                               base_s=m.theta[0] if m.count >= 3 else m.mean_s,
                               per_prefill_s=m.theta[1] if m.count >= 3 else 0.0,
                               per_decode_s=m.theta[2] if m.count >= 3 else 0.0,
                               steps=m.count, completed=self.completed)
                     for s, m in enumerate(self.models))


def live_stages(core, policy) -> list[StageLive]:
    """Each stage's live gauges for the statistics: its queue and step time, and the SLO
    budget and target queue of a policy with a stage controller (`stage_report`)."""
    report = getattr(policy, "stage_report", None)
    extra = report() if report is not None else {}
    budgets, targets = extra.get("budgets_s") or [], extra.get("targets") or []
    queues = core.feedback.queue_lengths(core.inflight.values())
    out = []
    for s, m in enumerate(core.feedback.models):
        b = budgets[s] if s < len(budgets) and budgets[s] != float("inf") else None
        out.append(StageLive(stage=s, queue=queues[s], step_s=m.mean_s, budget_s=b,
                             target_queue=targets[s] if s < len(targets) else None))
    return out
