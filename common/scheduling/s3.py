"""An S³-style baseline (Jin et al., "S³: Increasing GPU Utilization during Generative
Inference for Higher Throughput", NeurIPS '23): predict each request's output length, then pack
as many requests as the KV cache holds at their predicted footprints, in arrival order, a
request that does not fit letting later, smaller ones in (first fit); a request that outlives
its prediction has it doubled (predicted_kv.py), and preemption handles the rest. No SLO, no
grouping: what UELLM compares SLO-ODBS against. On continuous batching the packing is the
admission rule of each micro-batch, under a fixed token budget (fcfs's), decodes first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from msgspec import Meta

from common.scheduling.fcfs import FCFSPolicy
from common.scheduling.policy import register_policy
from common.scheduling.predicted_kv import growth_blocks, running_reserve
from common.scheduling.sarathi import by_readiness
from common.scheduling.types import (WHOLE_QUEUE, MicroBatchPlan, PlanBuilder, SchedulerSnapshot,
                                     WaitingNeed, split_ready)


@register_policy
@dataclass
class S3Policy(FCFSPolicy):
    """S³-style: predicted footprints packed into the KV cache, first fit in arrival order."""

    name = "s3"
    uses_predictions = True
    kv_margin: Annotated[float, Meta(ge=0, description=(
        "KV is reserved for the high predicted output times (1 + this)"))] = 0.0

    def waiting_need(self) -> WaitingNeed:
        return WHOLE_QUEUE  # first fit may reach past a request that does not fit

    def schedule(self, snap: SchedulerSnapshot) -> MicroBatchPlan:
        plan = PlanBuilder(snap, self.max_num_batched_tokens, self.max_num_seqs)
        decodes, prefills = split_ready(snap.ready)
        plan.add_decodes(by_readiness(decodes), limit=self.max_num_batched_tokens)
        for req in prefills:
            if plan.token_budget <= 0:
                break
            if not plan.is_preempted(req):
                plan.try_add(req, min(req.pending, plan.token_budget))
        reserve = max(int(self.watermark * snap.kv.total_blocks),
                      running_reserve(snap, self.kv_margin))
        for req in snap.waiting:
            if plan.token_budget <= 0 or plan.seats_used >= self.max_num_seqs:
                break
            chunk = min(req.pending, plan.token_budget)
            own = growth_blocks(req, snap.kv, self.kv_margin) - snap.kv.blocks_to_add(req, chunk)
            if snap.num_running == 0 and not plan.chunks:
                own = 0  # an idle instance always takes its first request
            if plan.try_add(req, chunk, reserve + max(own, 0)):
                reserve += max(own, 0)
        return plan.build()
