"""Is every stage of an instance answering? One of the instance's micro-batches still in flight
past the step timeout marks the instance degraded in health, naming the stage it waits on (the
core's CoreBatch keeps when it was dispatched and how many stages reported it done). A stage
that stops answering (stopped, wedged, or dead on a host that closed nothing) shows there,
where the processes themselves look alive. Past `dead_after_s` the stage is treated as dead
(`silent`: membership.py ends the generation as for a process that exited)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from common.instance import CoreBatch


@dataclass
class Liveness:
    timeout_s: float
    """A micro-batch in flight longer than this is overdue (deployment.step_timeout_s)."""
    dead_after_s: float = 0.0
    """A micro-batch in flight longer than this declares its stage dead (0: never;
    deployment.dead_after_s)."""
    last_answer: dict[int, float] = field(default_factory=dict)
    """Per stage, when it last reported a micro-batch done."""

    def fresh(self) -> "Liveness":
        """The same timeouts, nothing answered yet (a new generation of the group)."""
        return Liveness(self.timeout_s, self.dead_after_s)

    def answered(self, stage: int, now: float) -> None:
        self.last_answer[stage] = now

    def silent(self, inflight: Iterable[CoreBatch], now: float) -> tuple[int, float] | None:
        """(stage, seconds waited) when the oldest micro-batch has waited past dead_after_s on
        the stage it is at; None while every one is within it (or the check is off)."""
        oldest = _oldest(inflight)
        if not self.dead_after_s or oldest is None:
            return None
        waited = now - oldest.dispatched
        return (oldest.stages_done, waited) if waited > self.dead_after_s else None

    def overdue(self, inflight: Iterable[CoreBatch], now: float) -> str | None:
        """Why the instance is degraded, or None when every micro-batch is within time."""
        oldest = _oldest(inflight)
        if oldest is None or now - oldest.dispatched <= self.timeout_s:
            return None
        stage = oldest.stages_done
        answered = self.last_answer.get(stage)
        last = f"last answered {now - answered:.1f}s ago" if answered is not None else \
            "has not answered yet"
        return (f"stage {stage} is overdue: micro-batch {oldest.mb_id} has waited "
                f"{now - oldest.dispatched:.1f}s on it (step timeout {self.timeout_s:g}s; "
                f"stage {stage} {last})")


def _oldest(inflight: Iterable[CoreBatch]) -> CoreBatch | None:
    """The micro-batch in flight the longest: the one a silent stage holds up first."""
    return min(inflight, key=lambda b: b.dispatched, default=None)
