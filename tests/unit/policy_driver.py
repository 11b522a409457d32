"""A minimal driver of the instance core for policy tests: fill the pipeline, complete its
oldest micro-batch, repeat, without processes or a cost model, so properties such as "nobody
starves" can be checked over whole workloads. The state machine is the core's own
(common/instance/core.py); this is only the loop around it."""

from __future__ import annotations

from common.instance import CoreBatch, CoreRequest, InstanceCore
from common.scheduling.policy import SchedulingPolicy, waiting_need_of
from common.stats import ControllerMetrics


class MiniDriver:
    def __init__(self, policy: SchedulingPolicy, depth: int, total_blocks: int,
                 block_size: int = 16):
        self.policy = policy
        self.core = InstanceCore(0, depth, depth, block_size, total_blocks,
                                 ControllerMetrics(started=0.0), waiting_need_of(policy))
        self.requests: list[CoreRequest] = []
        self.history: list[CoreBatch] = []
        self.now = 0.0

    @property
    def preemptions(self) -> int:
        return self.core.preemptions

    def add(self, prompt: int, max_out: int) -> CoreRequest:
        req = CoreRequest(len(self.requests) + 1, self.now, prompt, max_out, 1 << 30)
        self.requests.append(req)
        self.core.add(req, self.now)
        return req

    def step(self) -> bool:
        """Fills the pipeline, then completes its oldest micro-batch. False when idle."""
        self.now += 1.0
        core = self.core
        while (plan := core.next_plan(self.policy, self.now)) is not None:
            self.history.append(core.commit(plan, self.now, self.policy))
        if not core.inflight:
            return False
        oldest = next(iter(core.inflight.values()))
        core.complete(oldest.mb_id, [7] * len(oldest.sampling), self.now)
        return True

    def run(self, max_steps: int = 100_000) -> int:
        steps = 0
        while self.step():
            steps += 1
            assert steps < max_steps, "the workload did not finish"
        unfinished = [r.req_id for r in self.requests if not r.finished]
        assert not unfinished, f"requests never finished (starved): {unfinished}"
        return steps
