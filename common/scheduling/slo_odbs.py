"""UELLM's SLO-ODBS on continuous batching (He et al., "UELLM: A Unified and Efficient Approach
for LLM Inference Serving", ICSOC '24; the batch rule from its public code), with its two
ablations, ODBS (by predicted length only) and SLO-DBS (by SLO only), as policies of their own.

Waiting requests are ordered by  a·slack + b·predicted_output·token_seconds  (UELLM's a·SLO +
b·length with a = 1, b = 0.5; Conveyor counts the SLO as the slack left to the first-token
deadline, so a request that has waited rises, and a predicted token as `token_seconds` of it so
that the two terms share a unit). With `late_last` (Conveyor's, the default) a request whose
deadline has passed goes behind all that can still meet theirs, for `late_for_s`: under a
burst, least slack first would otherwise serve the lost causes first and make the next ones
late too; after that it is first by its (negative) slack again, so that none starves.

Each micro-batch admits one group, walking that order: a request joins while the group has
fewer than `max_group` members (UELLM's B = 10) and

    (predicted − group's longest predicted) · (members + 1) · waste_factor <= max_waste

(UELLM's 1.2 and 15000: the padding a static batch would waste); the first that breaks the
rule, or that the token budget, the seats or the KV cannot take, closes the group, and the next
micro-batch starts the next one. UELLM caps each batch's generation at its longest prediction +
50; Conveyor never cuts a reply short: a request runs to its EOS or max_tokens.

Who goes in is SLO-ODBS's; how much goes in is Token Throttling's (`throttle`, the default:
the decode and prefill budgets of throttle.py) or a fixed budget (`throttle = false`: every
ready decode, then `max_prefill_tokens` of prompts). KV is taken on demand by default
(`kv_plan = "demand"`): a new request goes in while the pool holds its prompt beside Token
Throttling's `kv_threshold`, as under throttle. UELLM's own rule, `kv_plan = "high"` (or
"median"), admits it only while the pool holds its predicted footprint beside what the running
ones are predicted to still need (predicted_kv.py); measured, that reserve gives capacity away
(BENCHMARKS.md, a tight pool: 91.6% violations against 0.7%).

The policy is shown the requests that lead its order, not the whole queue: the instance core
keeps the waiting requests sorted by the order's time-invariant part (`rank_key`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from msgspec import Meta

from common.scheduling.policy import register_policy
from common.scheduling.predicted_kv import growth_blocks, running_reserve
from common.scheduling.sarathi import by_readiness
from common.scheduling.throttle import ThrottlePolicy
from common.scheduling.types import (MicroBatchPlan, PlanBuilder, RequestView, SchedulerSnapshot,
                                     WaitingNeed, is_late, split_ready)

KVPlan = Literal["high", "median", "demand"]
_NEVER = float("inf")
_LATE_LAST = ("a request past its first-token deadline goes behind those that can still meet "
              "theirs")
_SLO_WEIGHT = "weight a of the slack (seconds to the first-token deadline) in the order"
_LENGTH_WEIGHT = "weight b of the predicted output (in token_seconds units) in the order"


@register_policy
@dataclass
class SloOdbsPolicy(ThrottlePolicy):
    """UELLM SLO-ODBS: waiting requests by slack and predicted length, admitted in groups of
    similar predicted length; KV reserved from predictions."""

    name = "slo-odbs"
    uses_predictions = True
    slo_weight: Annotated[float, Meta(ge=0, description=_SLO_WEIGHT)] = 1.0
    length_weight: Annotated[float, Meta(ge=0, description=_LENGTH_WEIGHT)] = 0.5
    token_seconds: Annotated[float, Meta(gt=0, description=(
        "seconds of slack one predicted output token weighs in the order"))] = 0.01
    no_slo_slack_s: Annotated[float, Meta(ge=0, description=(
        "slack counted for a request without a TTFT target"))] = 60.0
    max_group: Annotated[int, Meta(ge=1, description=(
        "most new requests admitted in one micro-batch (UELLM's B)"))] = 10
    max_waste: Annotated[float, Meta(ge=0, description=(
        "bound of UELLM's batch rule (predicted - longest) x (members + 1) x factor"))] = 15000.0
    waste_factor: Annotated[float, Meta(ge=0, description=(
        "factor of UELLM's batch rule"))] = 1.2
    kv_margin: Annotated[float, Meta(ge=0, description=(
        "KV is reserved for the high predicted output times (1 + this)"))] = 0.2
    kv_plan: Annotated[KVPlan, Meta(description=(
        "KV a new request must find: high (its predicted high quantile and the running "
        "requests' predicted growth), median (the same at the median prediction) or demand "
        "(what its prompt takes now, as throttle: growth is met on demand)"))] = "demand"
    late_last: Annotated[bool, Meta(description=_LATE_LAST)] = True
    late_for_s: Annotated[float, Meta(gt=0, description=(
        "how long past its deadline a request stays behind (late_last); then it is first by "
        "its slack again, so that none starves"))] = 10.0
    throttle: Annotated[bool, Meta(description=(
        "size micro-batches by Token Throttling; false: every ready decode plus "
        "max_prefill_tokens of prompts"))] = True

    @property
    def _high(self) -> bool:
        return self.kv_plan == "high"

    def waiting_need(self) -> WaitingNeed:
        """A group is the first `max_group` requests of the order at most (the next one only
        closes it), so the instance core keeps the queue sorted by `rank_key` and shows those
        (common/instance/ranked.py); and, for Token Throttling's prefill budget, the head that
        throttle itself needs (its pending tokens saturate the budget)."""
        tokens = self.prefill_iterations * self.max_prefill_tokens if self.throttle else 0
        return WaitingNeed(whole=False, min_requests=2, tokens=tokens, ranked=self.max_group,
                           rank=self.rank_key)

    def order_key(self, req: RequestView, now: float) -> tuple[bool, float]:
        static, drift, late_from, late_until = self.rank_key(req)
        return is_late(now, late_from, late_until), static - drift * now

    def rank_key(self, req: RequestView) -> tuple[float, float, float, float]:
        """The order's key as (static, drift, late_from, late_until): at `now` it is
        (late, static - drift * now), late while late_from < now <= late_until (`late_last`:
        from the first-token deadline, for `late_for_s`). a·slack = a·(arrival + TTFT target)
        - a·now, and the deadline does not move, so neither does a request's place among
        those that share its drift (a with a TTFT target, 0 without one) and its lateness (the
        instance core keeps the queue ranked by it: common/instance/ranked.py)."""
        predicted = req.predicted_output if req.predicted_output is not None else req.max_tokens
        length = self.length_weight * predicted * self.token_seconds
        slo = req.slo
        if slo is not None and slo.ttft_s is not None:
            deadline = req.arrival + slo.ttft_s
            static = self.slo_weight * deadline + length
            if self.late_last:
                return static, self.slo_weight, deadline, deadline + self.late_for_s
            return static, self.slo_weight, _NEVER, _NEVER
        return self.slo_weight * self.no_slo_slack_s + length, 0.0, _NEVER, _NEVER

    def ordered(self, waiting: tuple[RequestView, ...], now: float) -> list[RequestView]:
        """The waiting requests in SLO-ODBS order (ties: arrival)."""
        return sorted(waiting, key=lambda r: (self.order_key(r, now), r.arrival))

    def schedule(self, snap: SchedulerSnapshot) -> MicroBatchPlan:
        decodes, prefills = split_ready(snap.ready)
        decodes = by_readiness(decodes)
        if self.throttle:
            decode_budget = self.decode_budget(snap, len(decodes))
            prefill_budget = self.prefill_budget(snap, prefills)
        else:
            decode_budget = min(len(decodes), self.max_num_seqs)
            prefill_budget = min(self.max_prefill_tokens,
                                 snap.kv.block_size * snap.kv.free_blocks)
        plan = PlanBuilder(snap, decode_budget + prefill_budget, self.max_num_seqs)
        plan.add_decodes(decodes, limit=decode_budget)
        plan.token_budget = prefill_budget
        reserve = self.reserved_blocks(snap) if self.throttle else 0
        for req in prefills:  # prompts already started go on first, as under throttle
            if plan.token_budget <= 0:
                break
            if not plan.is_preempted(req):
                plan.try_add(req, min(req.pending, plan.token_budget), reserve)
        if snap.waiting and plan.token_budget > 0:
            if self.kv_plan != "demand":
                reserve = max(reserve, running_reserve(snap, self.kv_margin, self._high))
            self.admit_group(plan, snap, reserve)
        if plan.chunks:
            self._turn += 1
        return plan.build()

    def admit_group(self, plan: PlanBuilder, snap: SchedulerSnapshot, reserve: int) -> int:
        """Admits one group from the ordered waiting requests (the module's rule) while each
        one's predicted footprint fits beside `reserve`; returns how many joined."""
        members, longest = 0, 0
        for req in self.ordered(snap.waiting, snap.now):
            predicted = req.predicted_output if req.predicted_output is not None \
                else req.max_tokens
            if members >= self.max_group or plan.token_budget <= 0 \
                    or plan.seats_used >= self.max_num_seqs:
                break
            if members and (predicted - longest) * (members + 1) * self.waste_factor \
                    > self.max_waste:
                break
            chunk = min(req.pending, plan.token_budget)
            own = 0 if self.kv_plan == "demand" else \
                growth_blocks(req, snap.kv, self.kv_margin, self._high) \
                - snap.kv.blocks_to_add(req, chunk)
            if snap.num_running == 0 and not members:
                own = 0  # an idle instance always takes its first request, prediction or not
            if not plan.try_add(req, chunk, reserve + max(own, 0)):
                break
            reserve += max(own, 0)
            members += 1
            longest = max(longest, predicted)
        return members


def _ablation(name: str, slo_weight: float, length_weight: float, doc: str) -> type:
    """A policy of its own for each of UELLM's ablations: SLO-ODBS with other default weights
    (so `--policy odbs` selects it, and its table has its own defaults); the one without the
    SLO term does not look at deadlines at all (late_last off)."""
    cls = dataclass(type(name.replace("-", "_").title().replace("_", "") + "Policy",
                         (SloOdbsPolicy,), {
        "__doc__": doc, "name": name,
        "__annotations__": {"slo_weight": Annotated[float, Meta(ge=0, description=_SLO_WEIGHT)],
                            "length_weight": Annotated[float, Meta(
                                ge=0, description=_LENGTH_WEIGHT)],
                            "late_last": Annotated[bool, Meta(description=_LATE_LAST)]},
        "slo_weight": slo_weight, "length_weight": length_weight,
        "late_last": slo_weight > 0}))
    cls.__module__ = __name__
    return register_policy(cls)


OdbsPolicy = _ablation("odbs", 0.0, 0.5, "UELLM ODBS: SLO-ODBS ordered by predicted length "
                       "only.")
SloDbsPolicy = _ablation("slo-dbs", 1.0, 0.0, "UELLM SLO-DBS: SLO-ODBS ordered by SLO only.")
