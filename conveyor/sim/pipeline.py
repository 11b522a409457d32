"""One instance's pipeline: P stages as FIFO servers, timed by a cost model.

A micro-batch enters stage s when stage s is free and its activations have arrived from stage
s-1 (that stage's finish plus the hop's transfer time); stage 0 starts it when it is free and
the controller has dispatched it. Every micro-batch crosses the same stages in the order it was
dispatched and nothing else competes for them, so its whole path is fixed the moment it is
dispatched: `Pipeline.run` computes every stage's start and finish right then, and the
simulator needs a single event per micro-batch (its completion on the last stage) instead of
one per stage, with identical timings.

When the stages are processes sharing a machine's cores (`cluster.host_cores`, the default CPU
deployment) a later micro-batch slows down earlier ones, so the path is not fixed at dispatch:
sharing.py's `SharedHostPipeline` steps through those stage by stage instead.

Stage times come from `CostModel.stage_step_s(StepCost)` with the micro-batch's prefill and
decode tokens, the mean context of its decodes (and their longest, for a profile whose
attention pads to it) and of its prefill tokens, the rows it samples, and the stage's layer
count and first/last flags; hops from `CostModel.transfer_s` (or the cluster's link settings).
`StepTimer` caches them: a steady decode phase repeats the same inputs over and over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from common.costmodel import StepCost
from conveyor.sim.cluster import ClusterConfig, StageSpec

CACHE_LIMIT = 1 << 20


class StepTimer:
    """(prefill, decode, context, sampled, prefill context) -> (per-stage seconds, per-hop
    seconds), cached.

    Stages of equal layer count and flags are costed once per micro-batch. The mean decode and
    prefill contexts are rounded to a multiple of `context_quantum` tokens (0: exact) first, so
    that repeated micro-batches hit the cache."""

    def __init__(self, cost: Any, stages: Sequence[StageSpec], link_bandwidth_bytes_s: float = 0.0,
                 link_latency_s: float = 0.0, activation_bytes_per_token: int = 0,
                 context_quantum: float = 1.0):
        self.cost = cost
        self.stages = list(stages)
        kinds: dict[StageSpec, int] = {}
        self._kind_of = [kinds.setdefault(s, len(kinds)) for s in self.stages]
        self._kinds = list(kinds)
        self.bandwidth = link_bandwidth_bytes_s
        self.latency = link_latency_s
        self.act_bytes = activation_bytes_per_token
        self.quantum = context_quantum
        self.pads = bool(getattr(cost, "pads_decode_context", False))
        """The cost model's attention pads decodes to the longest context (CPU profiles)."""
        self._cache: dict[tuple, tuple[tuple[float, ...], float]] = {}
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_cluster(cls, cfg: ClusterConfig, cost: Any) -> "StepTimer":
        return cls(cost, cfg.stages, cfg.link_bandwidth_bytes_s, cfg.link_latency_s,
                   cfg.activation_bytes_per_token, cfg.context_quantum)

    def __call__(self, prefill: int, decode: int, context: float, sampled: int,
                 prefill_context: float | None = None, longest: float = 0.0
                 ) -> tuple[tuple[float, ...], float]:
        """prefill_context: the mean keys a prefill token attends to (None: one fresh prompt
        of `prefill` tokens); longest: the longest decode context, passed on only to a cost
        model whose attention pads to it (and only then part of the cache key)."""
        q = self.quantum
        if q:
            if decode:
                context = round(context / q) * q
            if prefill_context:
                prefill_context = round(prefill_context / q) * q
        if not (self.pads and decode):
            longest = 0.0
        elif q:
            longest = round(longest / q) * q
        key = (prefill, decode, context, sampled, prefill_context, longest)
        hit = self._cache.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        per_kind = [self.cost.stage_step_s(StepCost(prefill, decode, float(context), sampled,
                                                    s.num_layers, s.first, s.last,
                                                    float(longest) if longest else None,
                                                    prefill_context if prefill else None))
                    for s in self._kinds]
        durations = tuple(float(per_kind[k]) for k in self._kind_of)
        if any(not d >= 0 for d in durations):
            raise ValueError(f"the cost model gave a negative or NaN stage time {durations} for "
                             f"{prefill} prefill + {decode} decode tokens")
        tokens = prefill + decode
        if self.bandwidth > 0:
            hop = self.latency + tokens * self.act_bytes / self.bandwidth
        else:
            hop = float(self.cost.transfer_s(tokens)) + self.latency
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        value = (durations, hop)
        self._cache[key] = value
        return value


class Pipeline:
    """The P stages of one instance as FIFO servers, with per-stage busy and wait time."""

    __slots__ = ("free", "busy", "wait", "steps", "num_stages", "push")

    def __init__(self, num_stages: int,
                 push: Callable[[float, Callable[[Any, float], None], Any], None] | None = None):
        self.num_stages = num_stages
        self.push = push
        """The event queue's push, for `submit`."""
        self.free = [0.0] * num_stages
        """When each stage finishes the last micro-batch given to it."""
        self.busy = [0.0] * num_stages
        self.wait = [0.0] * num_stages
        """Time a stage, free and holding the plan, waited for its input activations."""
        self.steps = 0

    def submit(self, now: float, durations: tuple[float, ...], hop: float,
               on_done: Callable[[Any, float], None], arg: Any) -> None:
        """A micro-batch dispatched at `now`; `on_done(arg, t)` runs when the last stage
        finishes it (one event, its path being fixed now)."""
        self.push(self.run(now, durations, hop), on_done, arg)

    def run(self, now: float, durations: tuple[float, ...], hop: float) -> float:
        """Sends a micro-batch dispatched at `now` through every stage; returns when the last
        stage finishes it."""
        free, busy, wait = self.free, self.busy, self.wait
        t = now  # when the input reaches the stage
        end = now
        s = 0
        for d in durations:
            f = free[s]
            if t > f:
                start = t
                if s:
                    wait[s] += t - (f if f > now else now)
            else:
                start = f
            end = start + d
            free[s] = end
            busy[s] += d
            t = end + hop
            s += 1
        self.steps += 1
        return end
