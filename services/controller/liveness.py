"""Is every stage of an instance answering? The controller notes when each micro-batch was
dispatched and which stage last reported it; one still in flight past the step timeout marks
its instance degraded in health, naming the stage it waits on. A stage that stops answering
(stopped, wedged, or dead on a host that closed nothing) shows there, where the processes
themselves look alive."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Liveness:
    timeout_s: float
    """A micro-batch in flight longer than this is overdue (deployment.step_timeout_s)."""
    _dispatched: dict[int, float] = field(default_factory=dict)
    _reached: dict[int, int] = field(default_factory=dict)
    """Per micro-batch in flight, the last stage that reported it done (-1: none yet)."""
    last_answer: dict[int, float] = field(default_factory=dict)
    """Per stage, when it last reported a micro-batch done."""

    def dispatched(self, mb_id: int, now: float) -> None:
        self._dispatched[mb_id] = now
        self._reached[mb_id] = -1

    def stage_done(self, mb_id: int, stage: int, last_stage: bool, now: float) -> None:
        self.last_answer[stage] = now
        if last_stage:
            self._dispatched.pop(mb_id, None)
            self._reached.pop(mb_id, None)
        elif mb_id in self._reached:
            self._reached[mb_id] = max(self._reached[mb_id], stage)

    def overdue(self, now: float) -> str | None:
        """Why the instance is degraded, or None when every micro-batch is within time."""
        if not self._dispatched:
            return None
        mb_id, since = min(self._dispatched.items(), key=lambda item: item[1])
        waited = now - since
        if waited <= self.timeout_s:
            return None
        stage = self._reached[mb_id] + 1
        answered = self.last_answer.get(stage)
        last = f"last answered {now - answered:.1f}s ago" if answered is not None else \
            "has not answered yet"
        return (f"stage {stage} is overdue: micro-batch {mb_id} has waited {waited:.1f}s on it "
                f"(step timeout {self.timeout_s:g}s; stage {stage} {last})")
