"""Is every stage of an instance answering? One of the instance's micro-batches still in flight
past the step timeout marks the instance degraded in health, naming the stage it waits on (the
core's CoreBatch keeps when it was dispatched and how many stages reported it done). A stage
that stops answering (stopped, wedged, or dead on a host that closed nothing) shows there,
where the processes themselves look alive."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from common.instance import CoreBatch


@dataclass
class Liveness:
    timeout_s: float
    """A micro-batch in flight longer than this is overdue (deployment.step_timeout_s)."""
    last_answer: dict[int, float] = field(default_factory=dict)
    """Per stage, when it last reported a micro-batch done."""

    def answered(self, stage: int, now: float) -> None:
        self.last_answer[stage] = now

    def overdue(self, inflight: Iterable[CoreBatch], now: float) -> str | None:
        """Why the instance is degraded, or None when every micro-batch is within time."""
        oldest = min(inflight, key=lambda b: b.dispatched, default=None)
        if oldest is None or now - oldest.dispatched <= self.timeout_s:
            return None
        stage = oldest.stages_done
        answered = self.last_answer.get(stage)
        last = f"last answered {now - answered:.1f}s ago" if answered is not None else \
            "has not answered yet"
        return (f"stage {stage} is overdue: micro-batch {oldest.mb_id} has waited "
                f"{now - oldest.dispatched:.1f}s on it (step timeout {self.timeout_s:g}s; "
                f"stage {stage} {last})")
