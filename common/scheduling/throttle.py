"""gLLM's Token Throttling (Guo et al., "gLLM: Global Balanced Pipeline Parallelism System for
Distributed LLM Serving with Token Throttling", SC '25; code: github.com/gty111/gLLM,
`Scheduler.token_throttling`). See docs/scheduling.md for the derivation.

Pipeline bubbles come from micro-batches of uneven cost: a stage that finishes a cheap
micro-batch waits for the expensive one ahead of it. Token Throttling regulates the two kinds of
tokens separately, from global state:

* Decode tokens: every micro-batch carries about 1/P of all decoding requests (P = pipeline
  depth), counting those still in flight, so each stage sees near-constant decode work. gLLM
  draws the rounding offset at random; here it rotates through 0..P-1, which gives exactly
  `total` decodes over any P consecutive micro-batches and keeps the policy deterministic.
* Prefill tokens: the budget follows the work waiting — pending prompt tokens spread over
  `prefill_iterations` micro-batches, never under `min_prefill_tokens` — and is throttled as the
  KV cache fills: it scales with (free_ratio - kv_threshold) / (1 - kv_threshold), up to
  `max_prefill_tokens`, and never takes the last `kv_threshold` of the blocks, which are left
  for running requests to grow into. With one stage there are no bubbles to balance and the
  budget is simply `max_prefill_tokens` within the free blocks, as in gLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from msgspec import Meta

from common.scheduling.policy import SchedulingPolicy, register_policy
from common.scheduling.sarathi import by_readiness, schedule_prefills
from common.scheduling.types import (MicroBatchPlan, PlanBuilder, SchedulerSnapshot, WaitingNeed,
                                     split_ready)


@register_policy
@dataclass
class ThrottlePolicy(SchedulingPolicy):
    """gLLM Token Throttling: decodes spread evenly over the micro-batches in flight; prefill
    budget from pending prompt tokens, throttled by KV utilization."""

    name = "throttle"
    max_prefill_tokens: Annotated[int, Meta(ge=1, description=(
        "most prefill tokens in one micro-batch, reached when the KV cache is empty "
        "(gLLM --maxp)"))] = 512
    min_prefill_tokens: Annotated[int, Meta(ge=1, description=(
        "fewest prefill tokens a micro-batch is given while prompts wait (gLLM --minp)"))] = 32
    prefill_iterations: Annotated[int, Meta(ge=1, description=(
        "micro-batches over which the pending prompt tokens are spread (gLLM --iterp)"))] = 8
    kv_threshold: Annotated[float, Meta(ge=0, lt=1, description=(
        "fraction of KV blocks prefill never takes, left for running requests to grow "
        "(gLLM --kvthresh)"))] = 0.05
    max_num_seqs: Annotated[int, Meta(ge=1, description=(
        "most requests holding KV at once, and most decodes in one micro-batch "
        "(gLLM --maxd)"))] = 128

    def __post_init__(self) -> None:
        self._turn = 0

    def largest_prefill_chunk(self) -> int:
        return self.max_prefill_tokens

    def waiting_need(self) -> WaitingNeed:
        """Prefills are admitted in arrival order (as fcfs), and the pending tokens W of the
        queue enter the budget only through min(max(W / prefill_iterations, min), cap), which
        prefill_iterations x max_prefill_tokens pending tokens already saturate."""
        return WaitingNeed(whole=False, min_requests=2, max_num_seqs=self.max_num_seqs,
                           tokens=self.prefill_iterations * self.max_prefill_tokens)

    def schedule(self, snap: SchedulerSnapshot) -> MicroBatchPlan:
        decodes, prefills = split_ready(snap.ready)
        decodes = by_readiness(decodes)
        decode_budget = self.decode_budget(snap, len(decodes))
        prefill_budget = self.prefill_budget(snap, prefills)
        plan = PlanBuilder(snap, decode_budget + prefill_budget, self.max_num_seqs)
        # Decodes first: their blocks come before any prompt's, so prefill can never take the
        # memory a running request needs for its next token.
        plan.add_decodes(decodes, limit=decode_budget)
        plan.token_budget = prefill_budget
        reserve = self.reserved_blocks(snap)
        schedule_prefills(plan, snap, prefills, reserve_new=reserve,
                          max_num_seqs=self.max_num_seqs, reserve_started=reserve)
        if plan.chunks:
            self._turn += 1
        return plan.build()

    def decode_budget(self, snap: SchedulerSnapshot, ready_decodes: int) -> int:
        """About 1/P of every decoding request, in flight or ready (gLLM's balanced decode
        budget); 1 when there are fewer decodes than stages."""
        depth = snap.pipeline_depth
        total = ready_decodes + sum(b.num_decode_tokens for b in snap.inflight)
        if total < depth:
            budget = 1
        else:
            budget = (total + self._turn % depth) // depth
        return min(budget, self.max_num_seqs)

    def reserved_blocks(self, snap: SchedulerSnapshot) -> int:
        return int(self.kv_threshold * snap.kv.total_blocks)

    def prefill_budget(self, snap: SchedulerSnapshot, started_prefills: list) -> int:
        """Prefill tokens for this micro-batch (gLLM's throttled prefill budget)."""
        kv = snap.kv
        budget = kv.block_size * max(kv.free_blocks - self.reserved_blocks(snap), 0)
        if budget == 0:
            return 0
        if snap.pipeline_depth == 1:
            return min(self.max_prefill_tokens, budget)
        free_ratio = kv.free_blocks / kv.total_blocks if kv.total_blocks else 0.0
        ratio = max((free_ratio - self.kv_threshold) / (1.0 - self.kv_threshold), 0.0)
        budget = min(round(ratio * self.max_prefill_tokens), budget)
        candidates = len(started_prefills) + len(snap.waiting)
        if candidates > 1:
            pending = pending_prompt_tokens(started_prefills, snap.waiting,
                                            enough=budget * self.prefill_iterations)
            budget = min(max(pending // self.prefill_iterations, self.min_prefill_tokens),
                         budget)
        return budget


def pending_prompt_tokens(started: list, waiting: tuple, enough: int) -> int:
    """Pending prompt tokens of the started prefills and the waiting requests, counted until
    `enough`: past it the budget is capped anyway, and a long queue need not be walked."""
    pending = 0
    for group in (started, waiting):
        for r in group:
            pending += r.num_tokens - r.num_computed
            if pending >= enough:
                return pending
    return pending
