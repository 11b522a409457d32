"""KV reserved from predicted output lengths rather than the worst case (UELLM's and S³'s
premise): a request is admitted only while the pool, less what the running requests are
predicted to still grow into, holds its prompt and its own predicted reply.

A request's planned final length is its predicted high quantile (or, with `high` false, its
median prediction: a fuller pool and more preemptions when predictions run short) times
(1 + margin); one that
outlives it has it doubled until it is ahead again (S³'s rule for a short prediction), and one
with no prediction is planned at its max_tokens cap (the worst case, as without a predictor).
When a prediction was short anyway, the running requests preempt as under every policy.

The snapshot shows only the running requests that are schedulable now, not those awaiting a
token in flight (about (P-1)/P of the decodes on a busy pipeline). Conveyor's estimate of the
whole reserve: the visible requests' mean growth times the seats taken.
"""

from __future__ import annotations

from common.scheduling.types import KVView, RequestView, SchedulerSnapshot


def planned_output(req: RequestView, margin: float, high: bool = True) -> int:
    """Output tokens to reserve KV for: the high prediction (the median one when not `high`)
    plus the margin, doubled while the request has already outlived it; max_tokens without a
    prediction."""
    base = req.predicted_high if high and req.predicted_high is not None \
        else req.predicted_output
    if base is None:
        return req.max_tokens
    plan = max(1, round(base * (1.0 + margin)))
    while plan <= req.num_output_tokens:
        plan *= 2
    return min(plan, req.max_tokens)


def growth_blocks(req: RequestView, kv: KVView, margin: float, high: bool = True) -> int:
    """Blocks `req` is predicted to take beyond those it holds, up to its planned end."""
    final = req.num_prompt_tokens + planned_output(req, margin, high)
    return max(0, -(-final // kv.block_size) - req.num_blocks)


def running_reserve(snap: SchedulerSnapshot, margin: float, high: bool = True) -> int:
    """Blocks the running requests are predicted to still need (see the module)."""
    if not snap.ready or snap.num_running == 0:
        return 0
    grow = sum(growth_blocks(r, snap.kv, margin, high) for r in snap.ready)
    return -(-grow * snap.num_running // len(snap.ready))
