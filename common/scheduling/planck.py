"""Planck in Conveyor (Lin et al., "Planck: Optimizing LLM Inference Performance in Pipeline
Parallelism with Fine-Grained SLO Constraint", ICWS 2024). Only the abstract is public, so this
is Conveyor's interpretation, every choice a setting (docs/scheduling.md):

* progressive per-stage SLO allocation (slo_allocation.py): candidates are served least slack
  first against their pass deadlines (ties: arrival), so a request behind its budget goes into
  the next micro-batch; each plan carries its deadline, re-split over the stages left as it
  crosses them;
* a stage controller (stage_control.py): a PI on the stages' queues against a Little's-law
  target, acting on the micro-batches allowed in flight and on the prefill tokens admitted.

Two policies: `planck` alone plans under a fixed token budget (decodes first, as Sarathi), and
`planck-throttle` takes gLLM Token Throttling's decode and prefill budgets, the prefill one
capped by the controller (the minimum of the two). `allocation = false` and
`controller = false` switch either idea off (the ablation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

from msgspec import Meta

from common.scheduling.fcfs import FCFSPolicy
from common.scheduling.policy import register_policy
from common.scheduling.sarathi import by_readiness
from common.scheduling.slo_allocation import expected_stage_times, pass_deadline
from common.scheduling.stage_control import ControllerGains, StageController
from common.scheduling.throttle import ThrottlePolicy
from common.scheduling.types import (WHOLE_QUEUE, MicroBatchPlan, PlanBuilder, RequestView,
                                     SchedulerSnapshot, WaitingNeed, split_ready)


@dataclass
class PlanckSettings:
    """The settings both Planck policies share (a mixin: the policies are the dataclasses)."""

    allocation: Annotated[bool, Meta(description=(
        "order candidates least slack first against their per-pass SLO budgets (false: "
        "arrival order, the ablation without allocation)"))] = True
    controller: Annotated[bool, Meta(description=(
        "run the stage controller on admission (false: the ablation without it)"))] = True
    default_ttft_s: Annotated[float, Meta(gt=0, description=(
        "TTFT target of a request without one, so it cannot be starved"))] = 60.0
    default_tpot_s: Annotated[float, Meta(gt=0, description=(
        "TPOT target of a request without one"))] = 2.0
    kp: Annotated[float, Meta(ge=0, description=(
        "proportional gain: headroom per micro-batch of queue error change"))] = 0.2
    ki: Annotated[float, Meta(ge=0, description=(
        "integral gain: headroom per micro-batch of queue error, per completed "
        "micro-batch"))] = 0.05
    min_target_queue: Annotated[float, Meta(gt=0, description=(
        "least target queue of a stage, in micro-batches"))] = 1.0
    max_target_queue: Annotated[float, Meta(gt=0, description=(
        "largest target queue of a stage (the target without SLOs)"))] = 2.0
    controller_min_inflight: Annotated[int, Meta(ge=0, description=(
        "fewest micro-batches allowed in flight (0: the pipeline depth P)"))] = 0
    controller_max_inflight: Annotated[int, Meta(ge=0, description=(
        "most micro-batches allowed in flight (0: 2P)"))] = 0
    min_prefill_fraction: Annotated[float, Meta(ge=0, le=1, description=(
        "share of the prefill budget still admitted at zero headroom"))] = 0.25
    initial_headroom: Annotated[float, Meta(ge=0, le=1, description=(
        "the controller's output before any feedback (0: least admission, 1: most)"))] = 0.5
    queue_smoothing: Annotated[float, Meta(gt=0, le=1, description=(
        "weight of the newest count in a stage's smoothed queue, on which the error is "
        "taken (1: the count itself)"))] = 0.25
    release_when_late: Annotated[bool, Meta(description=(
        "while every stage's SLO budget is negative (every micro-batch past its deadline) "
        "admit as the throughput policy alone: its prefill budget and the "
        "configured micro-batches in flight, until a budget is positive again (off by "
        "default: measured, it did not help; BENCHMARKS.md)"))] = False
    waiting_window: Annotated[int, Meta(ge=0, description=(
        "waiting requests ordered by slack, from the head of the queue (0: all)"))] = 256

    def _planck_init(self) -> None:
        if self.min_target_queue > self.max_target_queue:
            raise ValueError("min_target_queue must not exceed max_target_queue")
        if self.controller_max_inflight and self.controller_max_inflight < self.controller_min_inflight:
            raise ValueError("controller_max_inflight must not be below controller_min_inflight")
        self.stage_control = StageController(ControllerGains(
            self.kp, self.ki, self.min_target_queue, self.max_target_queue, self.controller_min_inflight,
            self.controller_max_inflight, self.min_prefill_fraction, self.initial_headroom,
            self.queue_smoothing, self.release_when_late))


class _Planck:
    """The planning both policies share; they supply the budgets."""

    reads_stage_feedback = True
    stage_control: StageController

    def waiting_need(self) -> WaitingNeed:
        if self.waiting_window == 0:
            return WHOLE_QUEUE
        return WaitingNeed(whole=False, min_requests=self.waiting_window)

    def inflight_allowance(self, configured: int, stages: tuple | None) -> int:
        if not self.controller or not stages:
            return configured
        return self.stage_control.allowance(len(stages), configured)

    def _deadline(self, r: RequestView, now: float) -> float:
        return pass_deadline(r, now, self.largest_prefill_chunk(), self.default_ttft_s,
                             self.default_tpot_s)

    def _order(self, reqs: list[RequestView], now: float) -> list[RequestView]:
        # Least slack = pass deadline - now - expected path; the path is the same estimate for
        # every candidate of one snapshot, so the order is the pass deadlines'.
        deadline = self._deadline
        return sorted(reqs, key=lambda r: (deadline(r, now), r.arrival))

    def _plan(self, snap: SchedulerSnapshot, max_num_seqs: int, reserve: int) -> MicroBatchPlan:
        now = snap.now
        decodes, prefills = split_ready(snap.ready)
        waiting = list(snap.waiting)
        if self.allocation:
            decodes, prefills, waiting = (self._order(x, now) for x in (decodes, prefills,
                                                                       waiting))
        else:
            decodes = by_readiness(decodes)
        if self.controller:
            heads = [x[0] for x in (decodes, prefills, waiting) if x]
            tight = min((self._deadline(r, now) for r in heads), default=math.inf) - now
            path = sum(expected_stage_times(snap.stages, snap.pipeline_depth, queueing=False))
            self.stage_control.update(snap.stages, snap.inflight, now, tight - path,
                                      demand=bool(waiting))
        decode_limit, prefill_budget = self._budgets(snap, decodes, prefills)
        plan = PlanBuilder(snap, decode_limit + max(prefill_budget, 0), max_num_seqs)
        plan.add_decodes(decodes, limit=decode_limit)
        if prefill_budget >= 0:
            plan.token_budget = prefill_budget
        if self.controller:
            plan.token_budget = min(plan.token_budget,
                                    self.stage_control.prefill_cap(self.largest_prefill_chunk()))
        for req in prefills:
            if plan.token_budget <= 0:
                break
            if not plan.is_preempted(req):
                plan.try_add(req, min(req.pending, plan.token_budget), reserve)
        for req in waiting:
            if plan.token_budget <= 0 or plan.seats_used >= max_num_seqs:
                break
            if not plan.try_add(req, min(req.pending, plan.token_budget), reserve):
                break  # in slack order, nobody overtakes a request that does not fit
        chosen = {c.req_id for c in plan.chunks}
        deadline = min((self._deadline(r, now) for group in (decodes, prefills, waiting)
                        for r in group if r.req_id in chosen), default=math.inf)
        return MicroBatchPlan(tuple(plan.chunks), tuple(plan.preempt), deadline)

    def stage_report(self) -> dict:
        """The controller's view, for statistics: targets, budgets and headroom."""
        c = self.stage_control
        return {"targets": list(c.targets), "budgets_s": list(c.budgets), "headroom": c.u}


@register_policy
@dataclass
class PlanckPolicy(_Planck, FCFSPolicy, PlanckSettings):
    """Planck alone: least-slack order under a fixed token budget, decodes first; the stage
    controller caps prefill and sets the micro-batches in flight. Its budget, seats and
    watermark are fcfs's settings."""

    name = "planck"

    def __post_init__(self) -> None:
        self._planck_init()

    def _budgets(self, snap: SchedulerSnapshot, decodes: list, prefills: list) -> tuple[int, int]:
        return self.max_num_batched_tokens, -1  # prefill: what the decodes leave

    def schedule(self, snap: SchedulerSnapshot) -> MicroBatchPlan:
        return self._plan(snap, self.max_num_seqs, int(self.watermark * snap.kv.total_blocks))


@register_policy
@dataclass
class PlanckThrottlePolicy(_Planck, ThrottlePolicy, PlanckSettings):
    """Planck over gLLM Token Throttling: throttle's decode and prefill budgets, the prefill
    budget capped by the stage controller, candidates in least-slack order."""

    name = "planck-throttle"

    def __post_init__(self) -> None:
        ThrottlePolicy.__post_init__(self)
        self._planck_init()

    def waiting_need(self) -> WaitingNeed:
        return _Planck.waiting_need(self)

    def _budgets(self, snap: SchedulerSnapshot, decodes: list, prefills: list) -> tuple[int, int]:
        return self.decode_budget(snap, len(decodes)), self.prefill_budget(snap, prefills)

    def schedule(self, snap: SchedulerSnapshot) -> MicroBatchPlan:
        plan = self._plan(snap, self.max_num_seqs, self.reserved_blocks(snap))
        if plan.chunks:
            self._turn += 1
        return plan
