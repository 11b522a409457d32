"""A minimal pipeline driver for policy tests: carries out plans the way the controller does
(blocks granted, chunks in flight, the oldest micro-batch completing first) without processes,
so properties such as "nobody starves" can be checked over whole workloads."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.scheduling.policy import SchedulingPolicy
from common.scheduling.types import InflightView, KVView, RequestView, SchedulerSnapshot


@dataclass(eq=False)
class SimRequest:
    rid: int
    arrival: float
    prompt: int
    max_out: int
    out: int = 0
    computed: int = 0
    blocks: int = 0
    inflight: int = 0
    awaiting: bool = False
    done: bool = False
    last_scheduled: float = float("-inf")

    def view(self) -> RequestView:
        return RequestView(self.rid, self.arrival, self.prompt, self.prompt + self.out,
                           self.computed, self.blocks, self.max_out, self.out,
                           self.inflight > 0, self.last_scheduled)


@dataclass
class Batch:
    chunks: list[tuple[SimRequest, int, bool]] = field(default_factory=list)
    decode_tokens: int = 0
    prefill_tokens: int = 0


@dataclass
class MiniDriver:
    policy: SchedulingPolicy
    depth: int
    total_blocks: int
    block_size: int = 16
    requests: list[SimRequest] = field(default_factory=list)
    inflight: list[Batch] = field(default_factory=list)
    history: list[Batch] = field(default_factory=list)
    now: float = 0.0
    preemptions: int = 0

    def __post_init__(self) -> None:
        self.free = self.total_blocks

    def add(self, prompt: int, max_out: int) -> SimRequest:
        req = SimRequest(len(self.requests) + 1, self.now, prompt, max_out)
        self.requests.append(req)
        return req

    def snapshot(self) -> SchedulerSnapshot:
        live = [r for r in self.requests if not r.done]
        return SchedulerSnapshot(
            now=self.now, pipeline_depth=self.depth,
            waiting=tuple(r.view() for r in live if r.blocks == 0),
            ready=tuple(r.view() for r in live if r.blocks > 0 and not r.awaiting),
            num_running=sum(1 for r in live if r.blocks > 0),
            inflight=tuple(InflightView(b.decode_tokens, b.prefill_tokens)
                           for b in self.inflight),
            kv=KVView(self.total_blocks, self.free, self.block_size))

    def step(self) -> bool:
        """Fills the pipeline, then completes its oldest micro-batch. False when idle."""
        self.now += 1.0
        while len(self.inflight) < self.depth:
            plan = self.policy.schedule(self.snapshot())
            by_id = {r.rid: r for r in self.requests}
            for rid in plan.preempt:
                victim = by_id[rid]
                assert victim.inflight == 0, "a policy preempted a request in flight"
                self.preemptions += 1
                self.free += victim.blocks
                victim.blocks = victim.computed = 0
            if not plan.chunks:
                if plan.preempt:
                    continue
                break
            batch = Batch()
            for c in plan.chunks:
                req = by_id[c.req_id]
                need = -(-(req.computed + c.num_tokens) // self.block_size) - req.blocks
                assert need <= self.free, "a policy scheduled more blocks than are free"
                req.blocks += max(need, 0)
                self.free -= max(need, 0)
                if c.num_tokens == 1 and req.computed > 0:
                    batch.decode_tokens += 1
                else:
                    batch.prefill_tokens += c.num_tokens
                req.computed += c.num_tokens
                sample = req.computed == req.prompt + req.out
                req.awaiting = req.awaiting or sample
                req.inflight += 1
                req.last_scheduled = self.now
                batch.chunks.append((req, c.num_tokens, sample))
            self.inflight.append(batch)
            self.history.append(batch)
        if not self.inflight:
            return False
        for req, _, sampled in self.inflight.pop(0).chunks:
            req.inflight -= 1
            if sampled:
                req.awaiting = False
                req.out += 1
                if req.out >= req.max_out:
                    req.done = True
                    self.free += req.blocks
                    req.blocks = 0
        return True

    def run(self, max_steps: int = 100_000) -> int:
        steps = 0
        while self.step():
            steps += 1
            assert steps < max_steps, "the workload did not finish"
        unfinished = [r.rid for r in self.requests if not r.done]
        assert not unfinished, f"requests never finished (starved): {unfinished}"
        return steps
