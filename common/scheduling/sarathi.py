"""Sarathi-Serve's stall-free batching under a fixed token budget (Agrawal et al., OSDI '24).

Every micro-batch: first every running decode (so generation never stalls behind a prompt),
then the chunks of prompts already started, then new requests, each chunk cut to what is left
of the fixed budget. This is the baseline gLLM is judged against: the budget is constant, so a
micro-batch's cost depends on how many decodes happen to be ready when it is built, and on a
pipeline the decodes bunch up in the micro-batches that follow the ones that returned them.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

from common.scheduling.fcfs import FCFSPolicy
from common.scheduling.policy import register_policy
from common.scheduling.types import (MicroBatchPlan, PlanBuilder, RequestView, SchedulerSnapshot,
                                     split_ready)


@register_policy
@dataclass
class SarathiPolicy(FCFSPolicy):
    """Sarathi-Serve: all ready decodes first, then prefill chunks filling a fixed budget."""

    name = "sarathi"

    def schedule(self, snap: SchedulerSnapshot) -> MicroBatchPlan:
        plan = PlanBuilder(snap, self.max_num_batched_tokens, self.max_num_seqs)
        decodes, prefills = split_ready(snap.ready)
        plan.add_decodes(by_readiness(decodes), limit=self.max_num_batched_tokens)
        schedule_prefills(plan, snap, prefills, reserve_new=int(self.watermark *
                                                                snap.kv.total_blocks),
                          max_num_seqs=self.max_num_seqs)
        return plan.build()


_READINESS = attrgetter("last_scheduled", "arrival")


def by_readiness(decodes) -> list[RequestView]:
    """Decodes in the order they became ready (then arrival): the one that has waited longest
    for a seat in a micro-batch goes first, so a budget smaller than the ready set rotates
    through them instead of starving the youngest."""
    return sorted(decodes, key=_READINESS)


def schedule_prefills(plan: PlanBuilder, snap: SchedulerSnapshot, started: list[RequestView],
                      reserve_new: int, max_num_seqs: int, reserve_started: int = 0) -> None:
    """Fills what is left of the token budget with prompt chunks: prompts already holding KV
    first, then waiting requests in arrival order. Nobody overtakes a waiting request that
    does not fit (first come, first served)."""
    for req in started:
        if plan.token_budget <= 0:
            return
        if not plan.is_preempted(req):
            plan.try_add(req, min(req.pending, plan.token_budget), reserve_started)
    for req in snap.waiting:
        if plan.token_budget <= 0 or plan.seats_used >= max_num_seqs:
            return
        if not plan.try_add(req, min(req.pending, plan.token_budget), reserve_new):
            return
