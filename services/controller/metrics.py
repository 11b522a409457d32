"""What the controller measures while serving, reported through StatusReply.stats and the
Prometheus endpoint. Every figure is cumulative since start (seconds, tokens, counts), so a
client such as `conveyor bench` gets the figures of any window by differencing two snapshots.

Bubble ratio: a stage is idle whenever it is not computing while its instance has unfinished
requests; idle / pending wall time is the fraction of the pipeline lost to bubbles (the figure
gLLM and Planck report). Time with nothing to serve is not counted as a bubble.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass, field

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0,
                     300.0)


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

    def as_dict(self) -> dict:
        return {"count": self.count, "sum": self.sum, "sumsq": self.sumsq}


def mean_std(count: float, total: float, sumsq: float) -> tuple[float | None, float | None]:
    """Mean and population standard deviation from a count, sum and sum of squares."""
    if count <= 0:
        return None, None
    mean = total / count
    return mean, math.sqrt(max(0.0, sumsq / count - mean * mean))


@dataclass
class Histogram:
    """A Prometheus-style cumulative histogram of latencies in seconds."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    total: Moments = field(default_factory=Moments)

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.total.add(seconds)

    def as_dict(self) -> dict:
        return {"buckets": list(LATENCY_BUCKETS_S), "counts": list(self.counts),
                **self.total.as_dict()}


@dataclass
class StageCounters:
    steps: int = 0
    busy_s: float = 0.0
    wait_s: float = 0.0
    """Time the stage reported waiting for its input activations (stage > 0)."""


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


@dataclass
class ControllerMetrics:
    started: float
    num_instances: int = 1
    finished: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    micro_batches: int = 0
    preemptions: int = 0
    stages: dict[tuple[int, int], StageCounters] = field(default_factory=dict)
    pending: list[PendingClock] = field(default_factory=list)
    prefill_per_batch: Moments = field(default_factory=Moments)
    decode_per_batch: Moments = field(default_factory=Moments)
    ttft: Histogram = field(default_factory=Histogram)
    tpot: Histogram = field(default_factory=Histogram)
    e2e: Histogram = field(default_factory=Histogram)

    def __post_init__(self) -> None:
        self.pending = [PendingClock() for _ in range(self.num_instances)]

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

    def record_request(self, timings: dict[str, float]) -> None:
        for key, hist in (("ttft_s", self.ttft), ("tpot_s", self.tpot), ("e2e_s", self.e2e)):
            if key in timings:
                hist.add(timings[key])

    def as_dict(self, now: float) -> dict:
        stages = []
        for (i, s), c in sorted(self.stages.items()):
            pending_s = self.pending[i].read(now) if i < len(self.pending) else 0.0
            stages.append({"instance": i, "stage": s, "steps": c.steps,
                           "busy_s": round(c.busy_s, 6), "wait_s": round(c.wait_s, 6),
                           "pending_s": round(pending_s, 6),
                           "idle_s": round(max(pending_s - c.busy_s, 0.0), 6)})
        return {
            "uptime_s": round(now - self.started, 3),
            "finished": dict(self.finished),
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "micro_batches": self.micro_batches,
            "preemptions": self.preemptions,
            "stages": stages,
            "batch_tokens": {"prefill": self.prefill_per_batch.as_dict(),
                             "decode": self.decode_per_batch.as_dict()},
            "latency": {"ttft_s": self.ttft.as_dict(), "tpot_s": self.tpot.as_dict(),
                        "e2e_s": self.e2e.as_dict()},
        }
