"""The accumulators the controller and the simulator fill while serving; `snapshot` turns
them into the typed `ControllerStats` (snapshot.py). `merge` adds up the shares kept by the
simulator's worker processes."""

from __future__ import annotations

import bisect
import dataclasses
from collections import Counter
from dataclasses import dataclass, field

from common.stats.snapshot import (REQUEST_LATENCIES, BatchTokens, ControllerStats,
                                   GroupChange, HistogramStats, MomentsStats, SLOAttainment,
                                   StageStats, request_times)

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0,
                     300.0)
LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                  100000)
"""Token counts per request (prompt, generation): vLLM's 1-2-5 series."""
GROUP_HISTORY = 64
"""Length-group changes kept with their times (the latest; `length_group_changes` counts all)."""

@dataclass
class Moments:
    """Count, sum and sum of squares: mean and spread of any window by differencing."""

    count: int = 0
    sum: float = 0.0
    sumsq: float = 0.0

    def add(self, x: float) -> None:
        self.count += 1
        self.sum += x
        self.sumsq += x * x

    def merge(self, other: Moments) -> None:
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq

    def snapshot(self) -> MomentsStats:
        return MomentsStats(count=self.count, sum=self.sum, sumsq=self.sumsq)


@dataclass
class Histogram:
    """A Prometheus-style histogram (of seconds, or of token counts)."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    total: Moments = field(default_factory=Moments)

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def add(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total.add(value)

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.total.merge(other.total)

    def snapshot(self) -> HistogramStats:
        t = self.total
        return HistogramStats(buckets=list(self.bounds), counts=list(self.counts),
                              count=t.count, sum=t.sum, sumsq=t.sumsq)


@dataclass
class StageCounters:
    steps: int = 0
    busy_s: float = 0.0
    wait_s: float = 0.0
    """Time the stage reported waiting for its input activations (stage > 0)."""

    def merge(self, other: StageCounters) -> None:
        self.steps += other.steps
        self.busy_s += other.busy_s
        self.wait_s += other.wait_s


@dataclass
class PendingClock:
    """Wall time during which an instance had unfinished requests."""

    total_s: float = 0.0
    since: float | None = None

    def update(self, has_work: bool, now: float) -> None:
        if has_work and self.since is None:
            self.since = now
        elif not has_work and self.since is not None:
            self.total_s += now - self.since
            self.since = None

    def read(self, now: float) -> float:
        return self.total_s + (now - self.since if self.since is not None else 0.0)

    def merge(self, other: PendingClock) -> None:
        """Adds a clock kept elsewhere for the same instance (only one of them ever ran)."""
        self.total_s += other.total_s
        if self.since is None:
            self.since = other.since


def _latency_histograms() -> dict[str, Histogram]:
    return {name: Histogram() for name in REQUEST_LATENCIES}


def _length_histograms() -> dict[str, Histogram]:
    return {name: Histogram(LENGTH_BUCKETS) for name in ("prompt", "generation")}


@dataclass
class ControllerMetrics:
    started: float
    num_instances: int = 1
    finished: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    micro_batches: int = 0
    preemptions: int = 0
    pipeline_recoveries: int = 0
    """Times an instance's stages restarted and its requests were taken back."""
    requests_recovered: int = 0
    """Requests re-queued for recompute by those recoveries."""
    restarts: Counter = field(default_factory=Counter)
    """Processes the controller saw come back as a new process, by role (stage, ingress,
    kvcache)."""
    instances_given_up: int = 0
    """Times an instance was given up on (a stage that kept dying)."""
    stages_silent: int = 0
    """Stages treated as dead for answering no micro-batch within deployment.dead_after_s."""
    migrations: int = 0
    """Requests moved to another instance (services/controller/migration.py)."""
    migrations_waiting: int = 0
    """Of those, requests moved while waiting (no KV yet: nothing to recompute)."""
    migration_reasons: Counter = field(default_factory=Counter)
    """Of those, by the planner's reason (boundary, balance)."""
    migrations_aborted: int = 0
    """Migrations whose request ended (aborted, failed) before its first token at the
    destination."""
    migrations_refused: int = 0
    """Moves a planner asked for that the controller refused (the request in flight or gone,
    the destination not ready or short of free blocks)."""
    migration_recomputed_tokens: int = 0
    """Tokens the destinations re-prefilled for migrated requests."""
    migration_pause: Moments = field(default_factory=Moments)
    """Seconds from a running request's stop at the source (the move itself by recompute,
    the last copy round when live) to its first token at the destination."""
    migration_kv_bytes: int = 0
    """KV bytes the destinations' stages received in committed live migrations."""
    migration_copy: Moments = field(default_factory=Moments)
    """Seconds from a live migration's start to its commit (every copy round)."""
    length_spread: list[Moments] = field(default_factory=list)
    """Per instance, over its micro-batches of two decodes or more: the longest decode context
    less the mean one (tokens). What mixing lengths costs a padded attention, and what length
    groups narrow."""
    group_history: list[tuple[float, str]] = field(default_factory=list)
    """The length groups in force and since when (seconds since `started`): the first entry
    at start, then every change (the latest GROUP_HISTORY)."""
    length_group_changes: int = 0
    stages: dict[tuple[int, int], StageCounters] = field(default_factory=dict)
    pending: list[PendingClock] = field(default_factory=list)
    prefill_per_batch: Moments = field(default_factory=Moments)
    decode_per_batch: Moments = field(default_factory=Moments)
    slo_met: Counter = field(default_factory=Counter)
    """Requests that finished within their SLO, by class (SLO.label)."""
    slo_missed: Counter = field(default_factory=Counter)
    latency: dict[str, Histogram] = field(default_factory=_latency_histograms)
    lengths: dict[str, Histogram] = field(default_factory=_length_histograms)

    def __post_init__(self) -> None:
        self.pending = [PendingClock() for _ in range(self.num_instances)]
        self.length_spread = [Moments() for _ in range(self.num_instances)]

    def merge(self, other: ControllerMetrics) -> None:
        """Adds `other`'s counters, kept for a disjoint share of the instances and requests
        (the simulator's worker processes). Field by field over the dataclass, so a field
        added later cannot be dropped silently: an unknown kind is an error."""
        if other.num_instances != self.num_instances:
            raise ValueError(f"cannot merge metrics of {other.num_instances} instances into "
                             f"{self.num_instances}")
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name in ("started", "num_instances"):
                continue
            if isinstance(mine, Counter):
                mine.update(theirs)
            elif isinstance(mine, Moments):
                mine.merge(theirs)
            elif f.name in ("latency", "lengths"):
                for name, hist in mine.items():
                    hist.merge(theirs[name])
            elif f.name == "stages":
                for key, counters in theirs.items():
                    mine.setdefault(key, StageCounters()).merge(counters)
            elif f.name == "pending":
                for clock, other_clock in zip(mine, theirs):
                    clock.merge(other_clock)
            elif f.name == "length_spread":
                for moments, other_moments in zip(mine, theirs):
                    moments.merge(other_moments)
            elif f.name == "group_history":  # one worker routes by groups: the others' are []
                mine[:] = sorted(mine + theirs)[-GROUP_HISTORY:]
            elif isinstance(mine, (int, float)):
                setattr(self, f.name, mine + theirs)
            else:
                raise TypeError(f"ControllerMetrics.merge does not know how to merge {f.name}")

    def record_step(self, instance: int, stage: int, compute_s: float, wait_s: float) -> None:
        c = self.stages.get((instance, stage))
        if c is None:  # once per stage: this runs on every StepDone
            c = self.stages[(instance, stage)] = StageCounters()
        c.steps += 1
        c.busy_s += compute_s
        c.wait_s += wait_s

    def record_batch(self, prefill_tokens: int, decode_tokens: int) -> None:
        self.prefill_per_batch.add(prefill_tokens)
        self.decode_per_batch.add(decode_tokens)

    def record_spread(self, instance: int, decodes: int, context: int, longest: int) -> None:
        """A micro-batch's decodes: `context` the sum of their contexts, `longest` the
        longest."""
        if decodes > 1:
            self.length_spread[instance].add(longest - context / decodes)

    def record_groups(self, now: float, spec: str) -> None:
        """The length groups (LengthGroups.spec) in force from `now` on."""
        if self.group_history:
            self.length_group_changes += 1
        self.group_history.append((now - self.started, spec))
        del self.group_history[:-GROUP_HISTORY]

    def record_request(self, timings: dict[str, float], prompt_tokens: int | None = None,
                       generated_tokens: int | None = None) -> None:
        """A request that finished normally: its `latency_timings` and its lengths."""
        for name, seconds in request_times(timings).items():
            self.latency[name].add(seconds)
        if prompt_tokens is not None:
            self.lengths["prompt"].add(prompt_tokens)
        if generated_tokens is not None:
            self.lengths["generation"].add(generated_tokens)

    def record_slo(self, label: str, met: bool | None) -> None:
        if met is not None:
            (self.slo_met if met else self.slo_missed)[label] += 1

    def slo_attainment(self) -> dict[str, SLOAttainment]:
        """Per SLO class: requests that met and missed their targets, and the fraction met."""
        out = {}
        for label in sorted(set(self.slo_met) | set(self.slo_missed)):
            met, missed = self.slo_met[label], self.slo_missed[label]
            out[label] = SLOAttainment(met=met, missed=missed,
                                       attainment=round(met / (met + missed), 6))
        return out

    def snapshot(self, now: float, **live) -> ControllerStats:
        """The counters as of `now`; `live` fills the snapshot's other fields (model, policy,
        instances' gauges...), which only the controller or the simulator knows."""
        stages = []
        for (i, s), c in sorted(self.stages.items()):
            pending_s = self.pending[i].read(now) if i < len(self.pending) else 0.0
            stages.append(StageStats(instance=i, stage=s, steps=c.steps, busy_s=c.busy_s,
                                     wait_s=c.wait_s, pending_s=pending_s,
                                     idle_s=max(pending_s - c.busy_s, 0.0)))
        return ControllerStats(
            uptime_s=now - self.started, finished=dict(self.finished),
            prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens,
            micro_batches=self.micro_batches, preemptions=self.preemptions,
            pipeline_recoveries=self.pipeline_recoveries,
            requests_recovered=self.requests_recovered, restarts=dict(self.restarts),
            instances_given_up=self.instances_given_up, stages_silent=self.stages_silent,
            migrations=self.migrations,
            migrations_waiting=self.migrations_waiting,
            migration_reasons=dict(self.migration_reasons),
            migrations_aborted=self.migrations_aborted,
            migrations_refused=self.migrations_refused,
            migration_recomputed_tokens=self.migration_recomputed_tokens,
            migration_pause_s=self.migration_pause.snapshot(),
            migration_kv_bytes=self.migration_kv_bytes,
            migration_copy_s=self.migration_copy.snapshot(),
            length_spread=[m.snapshot() for m in self.length_spread],
            length_groups=[GroupChange(t_s=t, groups=g) for t, g in self.group_history],
            length_group_changes=self.length_group_changes, slo=self.slo_attainment(),
            stages=stages,
            batch_tokens=BatchTokens(prefill=self.prefill_per_batch.snapshot(),
                                     decode=self.decode_per_batch.snapshot()),
            latency={k: h.snapshot() for k, h in self.latency.items()},
            lengths={k: h.snapshot() for k, h in self.lengths.items()}, **live)
