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
On a cluster of different devices (`model.devices`) the cost is a `StageCosts`: each stage is
timed by its own device's model, each hop by the slowest link it crosses. `StepTimer` caches
them: a steady decode phase repeats the same inputs over and over; it can
scatter them step by step (`simulator.step_jitter`), as real steps scatter.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from common.costmodel import StepCost, hop_seconds
from conveyor.sim.cluster import ClusterConfig, StageSpec

CACHE_LIMIT = 1 << 20


Timing = tuple[tuple[float, ...], tuple[float, ...], float]
"""(seconds per stage, seconds of each hop from stage s to s + 1, co-run speed: the fraction of
its speed alone a stage keeps on this micro-batch while another stage of a shared host
computes — 1 where stages do not slow each other)."""


class StageCosts:
    """The cost of a cluster on model.devices: one cost model per device, stage s timed by its
    device's (StageSpec.device), a hop by the slowest of the links it crosses (StageSpec.link:
    more than one where the placement skipped a device, as HELR plans it)."""

    def __init__(self, models: dict[str, Any]):
        self.models = models

    @classmethod
    def rooflines(cls, shape: Any, stages: Sequence[StageSpec], dtype_bytes: int,
                  **settings: Any) -> "StageCosts":
        """A roofline per device the stages run on or link through (settings such as mfu
        apply to each)."""
        from common.costmodel.devices import parse_device
        from common.costmodel.roofline import RooflineCostModel

        names = {s.device for s in stages} | {d for s in stages for d in s.link}
        return cls({name: RooflineCostModel(shape, parse_device(name).spec, dtype_bytes,
                                            **settings) for name in names})

    def for_stage(self, spec: StageSpec) -> Any:
        return self.models[spec.device]

    def hop_s(self, spec: StageSpec, tokens: int, act_bytes_per_token: int,
              bandwidth_bytes_s: float, latency_s: float) -> float:
        return max(hop_seconds(self.models[d], tokens, act_bytes_per_token, bandwidth_bytes_s,
                               latency_s) for d in spec.link)

    # Where one model stands for the whole cluster (cascade's migration link, the range DP's
    # hop): the slowest link.
    def transfer_s(self, num_tokens: int) -> float:
        return max(float(m.transfer_s(num_tokens)) for m in self.models.values())

    @property
    def link_bandwidth(self) -> float:
        return min(float(getattr(m, "link_bandwidth", 0.0) or 0.0)
                   for m in self.models.values())


def stage_cost(cost: Any, spec: StageSpec) -> Any:
    """The cost model that times stage `spec`: its device's in a StageCosts, else `cost`."""
    return cost.for_stage(spec) if isinstance(cost, StageCosts) else cost


class StepTimer:
    """(prefill, decode, context, sampled, prefill context) -> Timing, cached.

    Stages of equal layer count and flags are costed once per micro-batch. The mean decode and
    prefill contexts are rounded to a multiple of `context_quantum` tokens (0: exact) first, so
    that repeated micro-batches hit the cache. With `jitter` > 0 each stage time is then scaled
    by its own draw of a log-normal factor of mean 1 and that coefficient of variation, from a
    generator seeded with `seed` (simulator.step_jitter: real steps scatter)."""

    def __init__(self, cost: Any, stages: Sequence[StageSpec], link_bandwidth_bytes_s: float = 0.0,
                 link_latency_s: float = 0.0, activation_bytes_per_token: int = 0,
                 context_quantum: float = 1.0, jitter: float = 0.0, seed: int = 0,
                 corun: Callable[[int], float] | None = None, decode_corun: float = 1.0):
        self.cost = cost
        self.stages = list(stages)
        kinds: dict[StageSpec, int] = {}
        self._kind_of = [kinds.setdefault(s, len(kinds)) for s in self.stages]
        self._kinds = list(kinds)
        self._kind_cost = [stage_cost(cost, s) for s in self._kinds]
        self.bandwidth = link_bandwidth_bytes_s
        self.latency = link_latency_s
        self.act_bytes = activation_bytes_per_token
        self.quantum = context_quantum
        self.pads = any(getattr(c, "pads_decode_context", False)
                        or getattr(c, "reads_longest_context", False) for c in self._kind_cost)
        """The cost model reads the decodes' longest context: its attention pads to it (CPU
        profiles) or charges mixed lengths (the roofline's mixed_length_penalty)."""
        self.corun = corun
        """Co-run speed of a prefill of n tokens (None: stages do not slow each other)."""
        self.decode_corun = decode_corun
        self._cache: dict[tuple, Timing] = {}
        # log-normal with E[factor] = 1: sigma^2 = ln(1 + cv^2), mu = -sigma^2 / 2
        self._sigma = math.sqrt(math.log1p(jitter * jitter))
        self._rng = random.Random(seed)
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_cluster(cls, cfg: ClusterConfig, cost: Any, shard: int = 0) -> "StepTimer":
        """shard: which of the simulation's worker processes (each draws its own noise)."""
        return cls(cost, cfg.stages, cfg.link_bandwidth_bytes_s, cfg.link_latency_s,
                   cfg.activation_bytes_per_token, cfg.context_quantum, cfg.step_jitter,
                   cfg.seed * 1_000_003 + shard,
                   cfg.corun_speed if cfg.corun_slows else None, cfg.host_corun_speed)

    def __call__(self, prefill: int, decode: int, context: float, sampled: int,
                 prefill_context: float | None = None, longest: float = 0.0) -> Timing:
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
            return self._scatter(hit) if self._sigma else hit
        self.misses += 1
        per_kind = [c.stage_step_s(StepCost(prefill, decode, float(context), sampled,
                                            s.num_layers, s.first, s.last,
                                            float(longest) if longest else None,
                                            prefill_context if prefill else None))
                    for s, c in zip(self._kinds, self._kind_cost)]
        durations = tuple(float(per_kind[k]) for k in self._kind_of)
        if any(not d >= 0 for d in durations):
            raise ValueError(f"the cost model gave a negative or NaN stage time {durations} for "
                             f"{prefill} prefill + {decode} decode tokens")
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        value = (durations, self._hops(prefill + decode),
                 self._corun(prefill, decode, durations[0], prefill_context))
        self._cache[key] = value
        return self._scatter(value) if self._sigma else value

    def _hops(self, tokens: int) -> tuple[float, ...]:
        link = (tokens, self.act_bytes, self.bandwidth, self.latency)
        if isinstance(self.cost, StageCosts):
            return tuple(self.cost.hop_s(s, *link) for s in self.stages[:-1])
        return (hop_seconds(self.cost, *link),) * (len(self.stages) - 1)

    def _corun(self, prefill: int, decode: int, seconds: float,
               prefill_context: float | None) -> float:
        """The micro-batch's co-run speed: its decode work slows to decode_corun, its prefill
        work to corun(prefill); together, the harmonic blend by how stage 0's time splits
        between them (each part slowed by its own factor, added up)."""
        if self.corun is None:
            return 1.0
        if not prefill:
            return self.decode_corun
        prefill_speed = self.corun(prefill)
        if not decode:
            return prefill_speed
        if prefill_speed == self.decode_corun or seconds <= 0:
            return self.decode_corun  # no split to weigh
        s = self.stages[0]
        alone = float(self._kind_cost[0].stage_step_s(StepCost(
            prefill, 0, 0.0, 0, s.num_layers, s.first, s.last, None, prefill_context)))
        share = min(1.0, max(0.0, alone / seconds))
        return 1.0 / (share / prefill_speed + (1.0 - share) / self.decode_corun)

    def _scatter(self, value: Timing) -> Timing:
        sigma, gauss = self._sigma, self._rng.gauss
        mu = -0.5 * sigma * sigma
        return tuple(d * math.exp(gauss(mu, sigma)) for d in value[0]), value[1], value[2]


class Pipeline:
    """The P stages of one instance as FIFO servers, with per-stage busy and wait time."""

    __slots__ = ("free", "busy", "wait", "queue_area", "steps", "num_stages", "push")

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
        self.queue_area = [0.0] * num_stages
        """Time integral of each stage's queue: the time each micro-batch spent there, from
        reaching it (dispatched, or its activations sent by the stage before) to its end."""
        self.steps = 0

    def submit(self, now: float, durations: tuple[float, ...], hops: tuple[float, ...],
               on_done: Callable[[Any, float], None], arg: Any, corun: float = 1.0,
               stage_log: list | None = None) -> None:
        """A micro-batch dispatched at `now`; `on_done(arg, t)` runs when the last stage
        finishes it (one event, its path being fixed now). Stages that are devices of their
        own do not slow each other, so `corun` plays no part here. `stage_log` gets each
        stage's (end, compute, wait) now, ahead of time: the simulator reports them to the
        stage feedback once its clock passes each end (state.py), with no event of their own."""
        self.push(self.run(now, durations, hops, stage_log), on_done, arg)

    def run(self, now: float, durations: tuple[float, ...], hops: tuple[float, ...],
            stage_log: list | None = None) -> float:
        """Sends a micro-batch dispatched at `now` through every stage; returns when the last
        stage finishes it."""
        free, busy, wait, area = self.free, self.busy, self.wait, self.queue_area
        t = now  # when the input reaches the stage
        end = reached = now
        s, last = 0, len(durations) - 1
        for d in durations:
            f = free[s]
            waited = 0.0
            if t > f:
                start = t
                if s:
                    waited = t - (f if f > now else now)
                    wait[s] += waited
            else:
                start = f
            end = start + d
            free[s] = end
            busy[s] += d
            area[s] += end - reached
            reached = end
            if stage_log is not None:
                stage_log.append((end, d, waited))
            if s < last:
                t = end + hops[s]
            s += 1
        self.steps += 1
        return end
