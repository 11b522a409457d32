"""Counters the controller keeps while serving, reported through StatusReply.stats."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class StageCounters:
    steps: int = 0
    compute_s: float = 0.0
    wait_s: float = 0.0


@dataclass
class ControllerMetrics:
    started: float
    finished: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    micro_batches: int = 0
    preemptions: int = 0
    stages: dict[tuple[int, int], StageCounters] = field(default_factory=dict)

    def record_step(self, instance: int, stage: int, compute_s: float, wait_s: float) -> None:
        c = self.stages.setdefault((instance, stage), StageCounters())
        c.steps += 1
        c.compute_s += compute_s
        c.wait_s += wait_s

    def as_dict(self, now: float) -> dict:
        return {
            "uptime_s": round(now - self.started, 3),
            "finished": {k: v for k, v in self.finished.items()},
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "micro_batches": self.micro_batches,
            "preemptions": self.preemptions,
            "stages": [{"instance": i, "stage": s, "steps": c.steps,
                        "compute_s": round(c.compute_s, 6), "wait_s": round(c.wait_s, 6)}
                       for (i, s), c in sorted(self.stages.items())],
        }
