"""The stage performance controller: Conveyor's reading of Planck's "stage instance performance
controller" (only the abstract is public; see docs/scheduling.md). It keeps every stage's queue
near a target by acting on the instance's admission.

* Target (Little's law, L = lambda W): a micro-batch may spend its stage budget W_s at stage s;
  micro-batches pass at the bottleneck's rate lambda = 1 / max_s step_s, so the queue that
  keeps within budget is L_s = W_s / max_s step_s, clamped to [min_target, max_target].
  W_s is the tightest budget of the micro-batches now at the stage (re-split,
  slo_allocation.resplit) or, when none is known, the next pass's budget split over the stages
  by their step times; without any SLO the target is max_target.
* Error: the worst stage's, e = min_s (L_s - queue_s) (negative: some stage is over target).
* PI in velocity form, once per micro-batch that leaves the pipeline:
  u += kp * (e - e_prev) + ki * e, clamped to [0, 1]. Anti-windup twice over: the increment
  form stores no integral, so a long saturation leaves nothing to unwind; and u is not raised
  while no request waits for admission (an idle pipeline's empty queues are no sign of room).
* Actuators, from the admission headroom u: micro-batches allowed in flight
  round(min_inflight + u * (max_inflight - min_inflight)) (P to 2P by default, so a fast stage
  is never starved), and a cap on the prefill tokens of a micro-batch,
  (min_prefill_fraction + u * (1 - min_prefill_fraction)) * the policy's own prefill budget.
* Budgets lost (`release_when_late`, off by default): while every stage's budget is negative
  (the micro-batches already past their deadlines) the actuators can let go: the configured
  micro-batches in flight and the policy's own prefill budget (the throughput policy alone),
  until a budget is positive again, u held meanwhile (its error, every target at its floor,
  says nothing about room). Meant for a run that falls behind and is held back further by the
  prefill cap; measured, it did not help (docs/scheduling.md, BENCHMARKS.md), hence off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.scheduling.slo_allocation import resplit, split
from common.scheduling.types import InflightView, StageView


@dataclass
class ControllerGains:
    kp: float
    ki: float
    min_target: float
    max_target: float
    min_inflight: int
    """0: the pipeline depth."""
    max_inflight: int
    """0: twice the pipeline depth."""
    min_prefill_fraction: float
    initial_headroom: float
    queue_smoothing: float = 1.0
    """Weight of the newest count in each stage's smoothed queue (1: the count itself)."""
    release_when_late: bool = False
    """While every stage's budget is negative, admit as the throughput policy alone."""


class StageController:
    """One instance's controller state (inside its policy object)."""

    def __init__(self, gains: ControllerGains):
        self.g = gains
        self.u = gains.initial_headroom
        self.prev_error: float | None = None
        self.seen = -1
        """StageView.completed at the last update: one update per micro-batch that left."""
        self.targets: list[float] = []
        self.budgets: list[float] = []
        self.queues: list[float] = []
        """Each stage's smoothed queue, what the error is taken on."""
        self.error = 0.0
        self.late = False
        """Every stage's budget negative at the last update (and release_when_late)."""

    def bounds(self, depth: int) -> tuple[int, int]:
        lo = self.g.min_inflight or depth
        hi = self.g.max_inflight or 2 * depth
        return lo, max(lo, hi)

    def allowance(self, depth: int, configured: int) -> int:
        """Micro-batches allowed in flight; `configured` (scheduler.max_inflight, what the
        throughput policy alone runs) while the budgets are lost."""
        if self.late:
            return configured
        lo, hi = self.bounds(depth)
        return int(round(lo + self.u * (hi - lo)))

    def prefill_cap(self, budget: int) -> int:
        """Prefill tokens a micro-batch may admit, of `budget`: all of it while the budgets
        are lost."""
        if self.late:
            return budget
        f = self.g.min_prefill_fraction
        return int(budget * (f + self.u * (1.0 - f)))

    def stage_budgets(self, stages: Sequence[StageView], inflight: Sequence[InflightView],
                      now: float, next_pass_s: float) -> list[float]:
        """W_s: the tightest re-split budget of the micro-batches at each stage, else the next
        pass's budget split by step times (inf: no SLO known)."""
        steps = [s.step_s for s in stages]
        fallback = split(next_pass_s, steps)
        budgets = [float("inf")] * len(stages)
        for b in inflight:
            if b.deadline == float("inf") or b.stages_done >= len(stages):
                continue
            w = resplit(b.deadline, now, steps, b.stages_done)[0]
            s = b.stages_done
            budgets[s] = min(budgets[s], w)
        return [b if b != float("inf") else f for b, f in zip(budgets, fallback)]

    def update(self, stages: Sequence[StageView] | None, inflight: Sequence[InflightView],
               now: float, next_pass_s: float, demand: bool = True) -> None:
        """Moves u once per completed micro-batch (no-op until the stages have reported).
        `demand`: requests are waiting for admission. Without it short queues say nothing
        about room to admit more (an idle pipeline has empty queues), so u is not raised:
        conditional integration, the second half of the anti-windup."""
        if not stages or stages[0].completed == self.seen:
            return
        self.seen = stages[0].completed
        g = self.g
        slowest = max(s.step_s for s in stages)
        self.budgets = self.stage_budgets(stages, inflight, now, next_pass_s)
        if slowest <= 0:
            return
        self.targets = [min(max(w / slowest, g.min_target), g.max_target)
                        for w in self.budgets]
        a = g.queue_smoothing
        if len(self.queues) != len(stages):
            self.queues = [float(s.queue) for s in stages]
        else:
            self.queues = [q + a * (s.queue - q) for q, s in zip(self.queues, stages)]
        error = min(t - q for t, q in zip(self.targets, self.queues))
        delta = g.ki * error + (g.kp * (error - self.prev_error)
                                if self.prev_error is not None else 0.0)
        self.prev_error = error
        self.error = error
        self.late = g.release_when_late and all(w < 0 for w in self.budgets)
        if self.late or (delta > 0 and not demand):
            return
        self.u = min(max(self.u + delta, 0.0), 1.0)
