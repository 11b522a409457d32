"""`ControllerStats`: the one typed snapshot of what the controller measures. StatusReply
carries it, the Prometheus page renders it (services/ingress/prometheus.py), `conveyor bench`
differences two of them (`ControllerStats.since`) and the simulator's report produces one.
Every figure is cumulative since start (seconds, tokens, counts), so the figures of any window
are the difference of two snapshots.

Bubble ratio: a stage is idle whenever it is not computing while its instance has unfinished
requests; idle / pending wall time is the fraction of the pipeline lost to bubbles (the figure
gLLM and Planck report). Time with nothing to serve is not counted as a bubble.
"""

from __future__ import annotations

import math

import msgspec

REQUEST_LATENCIES = ("queue_s", "prefill_s", "decode_s", "ttft_s", "tpot_s", "e2e_s")
"""The per-request times kept as histograms (see `request_times`)."""

# ---- the typed snapshot ---------------------------------------------------------------------

class _Snapshot(msgspec.Struct, kw_only=True):
    """Every field has a default, so a snapshot missing a section (a simulator's, which has
    no live gauges) still converts."""


class MomentsStats(_Snapshot):
    count: int = 0
    sum: float = 0.0
    sumsq: float = 0.0

    def since(self, before: MomentsStats) -> MomentsStats:
        return MomentsStats(count=self.count - before.count, sum=self.sum - before.sum,
                            sumsq=self.sumsq - before.sumsq)

    def mean_std(self) -> tuple[float | None, float | None]:
        return mean_std(self.count, self.sum, self.sumsq)


class HistogramStats(_Snapshot):
    """Counts per bucket (not cumulative; the last one is above every bound) and moments."""

    buckets: list[float] = []
    counts: list[int] = []
    count: int = 0
    sum: float = 0.0
    sumsq: float = 0.0

    def since(self, before: HistogramStats) -> HistogramStats:
        counts = ([a - b for a, b in zip(self.counts, before.counts)]
                  if len(before.counts) == len(self.counts) else list(self.counts))
        return HistogramStats(buckets=list(self.buckets), counts=counts,
                              count=self.count - before.count, sum=self.sum - before.sum,
                              sumsq=self.sumsq - before.sumsq)


class StageStats(_Snapshot):
    instance: int
    stage: int
    steps: int = 0
    busy_s: float = 0.0
    wait_s: float = 0.0
    """Time the stage reported waiting for its input activations (stage > 0)."""
    pending_s: float = 0.0
    """Wall time its instance had unfinished requests."""
    idle_s: float = 0.0
    """pending_s - busy_s: the stage's bubbles."""

    def since(self, before: StageStats) -> StageStats:
        return StageStats(instance=self.instance, stage=self.stage,
                          steps=self.steps - before.steps, busy_s=self.busy_s - before.busy_s,
                          wait_s=self.wait_s - before.wait_s,
                          pending_s=self.pending_s - before.pending_s,
                          idle_s=self.idle_s - before.idle_s)

    @property
    def bubble_ratio(self) -> float | None:
        return self.idle_s / self.pending_s if self.pending_s > 0 else None


class StageLive(_Snapshot):
    """Live gauges of one stage (the stage feedback, common/instance/feedback.py)."""

    stage: int
    queue: int = 0
    """Micro-batches the stage has received and not finished."""
    step_s: float = 0.0
    """Recent mean compute time of its steps."""
    budget_s: float | None = None
    """The stage's SLO budget for its tightest micro-batch (an SLO-aware policy's; None
    without one)."""
    target_queue: float | None = None
    """The stage controller's target queue (None without a controller)."""


class InstanceStats(_Snapshot):
    """Live gauges of one instance (not cumulative)."""

    instance: int
    ready: bool = True
    given_up: bool = False
    """A stage of it kept dying: its requests fail (deployment.stage_restarts)."""
    waiting: int = 0
    running: int = 0
    inflight: int = 0
    kv_total_blocks: int = 0
    kv_free_blocks: int = 0
    kv_leased_blocks: int = 0
    kv_utilization: float = 0.0
    inflight_allowed: int = 0
    """Micro-batches the policy allows in flight now (InstanceCore.inflight_limit)."""
    stages: list[StageLive] = []


class SLOAttainment(_Snapshot):
    met: int = 0
    missed: int = 0
    attainment: float = 0.0


class BatchTokens(_Snapshot):
    prefill: MomentsStats = msgspec.field(default_factory=MomentsStats)
    decode: MomentsStats = msgspec.field(default_factory=MomentsStats)


class IngressStats(_Snapshot):
    """What the ingress adds to the controller's snapshot (`conveyor stats`, /metrics)."""

    active_requests: int = 0
    awaiting_admission: int = 0
    queued_requests: int = 0
    """Received and not yet given their first token (admission control bounds these)."""
    queued_prompt_tokens: int = 0
    rejected: dict[str, int] = {}
    """Requests refused, by reason: overloaded, invalid, unauthorized, draining."""
    disconnects: int = 0
    """Requests aborted because their client went away."""
    draining: bool = False


class GroupChange(_Snapshot):
    """Length groups (LengthGroups.spec, e.g. "0-512:2,512-:1") in force from `t_s`, seconds
    since the controller's start (the simulation's)."""

    t_s: float = 0.0
    groups: str = ""


class ControllerStats(_Snapshot):
    uptime_s: float = 0.0
    finished: dict[str, int] = {}
    """Requests finished, by reason (stop, length, abort, error)."""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    micro_batches: int = 0
    preemptions: int = 0
    pipeline_recoveries: int = 0
    """Times an instance's pipeline broke (a stage died, or restarted) and its requests were
    taken back."""
    requests_recovered: int = 0
    """Requests re-queued for recompute by those recoveries."""
    restarts: dict[str, int] = {}
    """Processes the controller saw come back as a new process, by role: "stage" (a hello
    from a new process of a registered stage), "ingress" (likewise), "kvcache" (its pools
    rebuilt after its connection came back)."""
    instances_given_up: int = 0
    """Times an instance was given up on: a stage died more than deployment.stage_restarts
    times within restart_window_s."""
    stages_silent: int = 0
    """Stages treated as dead for answering no micro-batch within deployment.dead_after_s
    (each also counts as a death and a pipeline recovery)."""
    migrations: int = 0
    """Requests moved to another instance (running or waiting)."""
    migrations_waiting: int = 0
    migration_reasons: dict[str, int] = {}
    """Migrations by the planner's reason (boundary, balance)."""
    migrations_aborted: int = 0
    """Migrations whose request ended before its first token at the destination."""
    migrations_refused: int = 0
    """Moves the planner asked for that the controller refused."""
    migration_recomputed_tokens: int = 0
    migration_pause_s: MomentsStats = msgspec.field(default_factory=MomentsStats)
    """A running request's stop at the source to its first token at the destination, in
    seconds."""
    migration_kv_bytes: int = 0
    """KV bytes received by the destinations of committed live migrations."""
    migration_copy_s: MomentsStats = msgspec.field(default_factory=MomentsStats)
    """A live migration's start to its commit, in seconds."""
    length_spread: list[MomentsStats] = []
    """Per instance (by index), over its micro-batches of two decodes or more: the longest
    decode context less the mean one, in tokens."""
    length_groups: list[GroupChange] = []
    """With length groups: the groups in force and since when, the first at start, the last
    the current ones (the latest changes only: `length_group_changes` counts them all)."""
    length_group_changes: int = 0
    slo: dict[str, SLOAttainment] = {}
    """Per SLO class (SLO.label)."""
    stages: list[StageStats] = []
    batch_tokens: BatchTokens = msgspec.field(default_factory=BatchTokens)
    latency: dict[str, HistogramStats] = {}
    """Per-request times by name (REQUEST_LATENCIES), in seconds."""
    lengths: dict[str, HistogramStats] = {}
    """Per-request token counts: prompt and generation."""
    model: str = ""
    policy: str = ""
    pipeline_depth: int = 0
    instances: list[InstanceStats] = []
    kv_lease_waits: int = 0
    ingress: IngressStats | None = None

    @classmethod
    def from_builtins(cls, raw: dict) -> ControllerStats:
        """The snapshot of a `StatsReply` map (what the SDK's `stats()` returns)."""
        return msgspec.convert(raw, cls)

    def to_builtins(self) -> dict:
        return msgspec.to_builtins(self)

    def since(self, before: ControllerStats) -> ControllerStats:
        """The counters of the window from `before` to this snapshot (stages present in
        both); gauges, names, the ingress section and the groups' history are this
        snapshot's."""
        start = {(s.instance, s.stage): s for s in before.stages}
        slo = {}
        for label, a in self.slo.items():
            b = before.slo.get(label, SLOAttainment())
            met, missed = a.met - b.met, a.missed - b.missed
            slo[label] = SLOAttainment(met=met, missed=missed,
                                       attainment=met / (met + missed) if met + missed else 0.0)
        return msgspec.structs.replace(
            self, uptime_s=self.uptime_s - before.uptime_s,
            finished={k: v - before.finished.get(k, 0) for k, v in self.finished.items()},
            prompt_tokens=self.prompt_tokens - before.prompt_tokens,
            generated_tokens=self.generated_tokens - before.generated_tokens,
            micro_batches=self.micro_batches - before.micro_batches,
            preemptions=self.preemptions - before.preemptions,
            pipeline_recoveries=self.pipeline_recoveries - before.pipeline_recoveries,
            requests_recovered=self.requests_recovered - before.requests_recovered,
            restarts={k: v - before.restarts.get(k, 0) for k, v in self.restarts.items()},
            instances_given_up=self.instances_given_up - before.instances_given_up,
            stages_silent=self.stages_silent - before.stages_silent,
            migrations=self.migrations - before.migrations,
            migrations_waiting=self.migrations_waiting - before.migrations_waiting,
            migration_reasons={k: v - before.migration_reasons.get(k, 0)
                               for k, v in self.migration_reasons.items()},
            migrations_aborted=self.migrations_aborted - before.migrations_aborted,
            migrations_refused=self.migrations_refused - before.migrations_refused,
            migration_recomputed_tokens=(self.migration_recomputed_tokens
                                         - before.migration_recomputed_tokens),
            migration_pause_s=self.migration_pause_s.since(before.migration_pause_s),
            migration_kv_bytes=self.migration_kv_bytes - before.migration_kv_bytes,
            migration_copy_s=self.migration_copy_s.since(before.migration_copy_s),
            length_spread=[a.since(b) for a, b in zip(self.length_spread, before.length_spread)]
            if len(before.length_spread) == len(self.length_spread) else self.length_spread,
            length_group_changes=self.length_group_changes - before.length_group_changes,
            slo=slo,
            stages=[s.since(start[(s.instance, s.stage)]) for s in self.stages
                    if (s.instance, s.stage) in start],
            batch_tokens=BatchTokens(
                prefill=self.batch_tokens.prefill.since(before.batch_tokens.prefill),
                decode=self.batch_tokens.decode.since(before.batch_tokens.decode)),
            latency=_histograms_since(self.latency, before.latency),
            lengths=_histograms_since(self.lengths, before.lengths),
            kv_lease_waits=self.kv_lease_waits - before.kv_lease_waits)


def _histograms_since(after: dict[str, HistogramStats], before: dict[str, HistogramStats]
                      ) -> dict[str, HistogramStats]:
    return {k: h.since(before[k]) if k in before else h for k, h in after.items()}


def mean_std(count: float, total: float, sumsq: float) -> tuple[float | None, float | None]:
    """Mean and population standard deviation from a count, sum and sum of squares."""
    if count <= 0:
        return None, None
    mean = total / count
    return mean, math.sqrt(max(0.0, sumsq / count - mean * mean))


def request_times(timings: dict[str, float]) -> dict[str, float]:
    """A finished request's times by REQUEST_LATENCIES name, from `latency_timings`'s: prefill
    runs from its first scheduling to its first token, decode from there to its last."""
    out = dict(timings)
    if "queue_s" in timings and "ttft_s" in timings:
        out["prefill_s"] = timings["ttft_s"] - timings["queue_s"]
    if "ttft_s" in timings and "e2e_s" in timings:
        out["decode_s"] = timings["e2e_s"] - timings["ttft_s"]
    return out
