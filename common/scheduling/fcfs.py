"""FCFS continuous batching with chunked prefill under a token budget (vLLM v1 style).

Every micro-batch: first the requests already holding KV, in arrival order, each given as many
of its pending tokens as the budget allows (a decode takes one; a long prompt continues in
chunks); then waiting requests in arrival order while the budget, the seats and the KV blocks
last. A request is never skipped for a later one (first come, first served), and when a running
request needs a block that is not free, the latest-arrived running request is preempted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from msgspec import Meta

from common.scheduling.policy import SchedulingPolicy, register_policy
from common.scheduling.types import MicroBatchPlan, PlanBuilder, SchedulerSnapshot, WaitingNeed


@register_policy
@dataclass
class FCFSPolicy(SchedulingPolicy):
    """vLLM-style continuous batching: running requests first, then new ones, in arrival
    order, chunked prefill under a token budget."""

    name = "fcfs"
    max_num_batched_tokens: Annotated[int, Meta(ge=1, description=(
        "token budget of one micro-batch, prefill chunks and decodes together"))] = 512
    max_num_seqs: Annotated[int, Meta(ge=1, description=(
        "most requests holding KV at once"))] = 128
    watermark: Annotated[float, Meta(ge=0, lt=1, description=(
        "fraction of KV blocks kept free when admitting new requests, so running ones can "
        "grow without preemption"))] = 0.01

    def largest_prefill_chunk(self) -> int:
        return self.max_num_batched_tokens

    def waiting_need(self) -> WaitingNeed:
        """Admission is in arrival order and stops at a request that does not fit, at the token
        budget or when the seats are taken: a head with one request more than the free seats
        (at least 2) and a micro-batch's worth of pending tokens plans as the whole queue."""
        return WaitingNeed(whole=False, min_requests=2, max_num_seqs=self.max_num_seqs,
                           tokens=self.max_num_batched_tokens)

    def schedule(self, snap: SchedulerSnapshot) -> MicroBatchPlan:
        plan = PlanBuilder(snap, self.max_num_batched_tokens, self.max_num_seqs)
        for req in snap.ready:
            if plan.token_budget <= 0:
                break
            if plan.is_preempted(req):
                continue
            n = min(req.pending, plan.token_budget)
            if not plan.try_add(req, n):
                # Only a decode may push others out; a prefill chunk waits for free blocks.
                if req.is_decode and plan.preempt_for(req, snap.ready):
                    plan.try_add(req, n)
        reserve = int(self.watermark * snap.kv.total_blocks)
        for req in snap.waiting:
            if plan.token_budget <= 0 or plan.seats_used >= self.max_num_seqs:
                break
            if not plan.try_add(req, min(req.pending, plan.token_budget), reserve):
                break  # FCFS: nobody overtakes the head of the queue
        return plan.build()
