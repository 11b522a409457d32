"""One instance's scheduling state: its requests, queues and micro-batches in flight.

No I/O here: the service asks for a snapshot, runs the policy, and hands the plan back to be
turned into per-stage StepPlan messages once the kv-cache manager has granted the blocks.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from common.scheduling.types import (InflightView, KVView, MicroBatchPlan, SchedulerSnapshot)
from common.wire.internal_messages import Chunk, StepPlan
from services.controller.requests import Request, Status

_mb_ids = itertools.count(1)


@dataclass
class InflightBatch:
    mb_id: int
    requests: list[Request]
    sampling: list[Request]
    """Requests that get a token from this micro-batch, in chunk order."""
    num_decode_tokens: int
    num_prefill_tokens: int
    dispatched_at: float


@dataclass
class Instance:
    index: int
    num_stages: int
    max_inflight: int
    block_size: int = 16
    total_blocks: int = 0
    free_blocks: int = 0
    stage_identities: dict[int, bytes] = field(default_factory=dict)
    stage_blocks: dict[int, int] = field(default_factory=dict)
    pool_ready: bool = False
    waiting: list[Request] = field(default_factory=list)
    running: list[Request] = field(default_factory=list)
    inflight: dict[int, InflightBatch] = field(default_factory=dict)
    to_release: list[int] = field(default_factory=list)
    """Finished or preempted requests the stages may forget (sent with the next StepPlan)."""

    @property
    def all_stages_registered(self) -> bool:
        return len(self.stage_identities) == self.num_stages

    @property
    def ready(self) -> bool:
        return self.all_stages_registered and self.pool_ready

    @property
    def load(self) -> int:
        """Routing weight: tokens still to process for the requests placed here."""
        return sum(r.num_tokens - r.num_computed + r.max_tokens - len(r.output_token_ids)
                   for r in itertools.chain(self.waiting, self.running))

    def stats(self) -> dict:
        """Live queue lengths and KV use, for the controller's status and metrics."""
        used = 1 - self.free_blocks / self.total_blocks if self.total_blocks else 0.0
        return {"instance": self.index, "ready": self.ready, "waiting": len(self.waiting),
                "running": len(self.running), "inflight": len(self.inflight),
                "kv_total_blocks": self.total_blocks, "kv_free_blocks": self.free_blocks,
                "kv_utilization": round(used, 6)}

    def add(self, req: Request) -> None:
        req.instance = self.index
        bisect.insort(self.waiting, req, key=lambda r: r.arrival)

    def snapshot(self, now: float) -> SchedulerSnapshot:
        # Finished requests linger in `running` until their last micro-batch returns.
        ready = tuple(r.view() for r in self.running if not r.awaiting_token and not r.finished)
        return SchedulerSnapshot(
            now=now, pipeline_depth=self.num_stages,
            waiting=tuple(r.view() for r in self.waiting), ready=ready,
            num_running=len(self.running),
            inflight=tuple(InflightView(b.num_decode_tokens, b.num_prefill_tokens)
                           for b in self.inflight.values()),
            kv=KVView(self.total_blocks, self.free_blocks, self.block_size))

    def preempt(self, req_ids: tuple[int, ...]) -> list[Request]:
        """Sends running requests back to waiting; returns them so their blocks get freed."""
        victims = [r for r in self.running if r.req_id in set(req_ids) and r.inflight == 0]
        for req in victims:
            self.running.remove(req)
            self.free_blocks += req.num_blocks
            req.reset_for_recompute()
            bisect.insort(self.waiting, req, key=lambda r: r.arrival)
            self.to_release.append(req.req_id)
        return victims

    def block_wants(self, plan: MicroBatchPlan, by_id: dict[int, Request]
                    ) -> list[tuple[int, int]]:
        """(req_id, blocks to add) for every chunk of the plan that needs more blocks."""
        wants = []
        for c in plan.chunks:
            req = by_id[c.req_id]
            needed = -(-(req.num_computed + c.num_tokens) // self.block_size) - req.num_blocks
            if needed > 0:
                wants.append((req.req_id, needed))
        return wants

    def commit(self, plan: MicroBatchPlan, by_id: dict[int, Request],
               granted: dict[int, list[int]], now: float) -> tuple[StepPlan, StepPlan]:
        """Marks the plan's chunks in flight and builds its StepPlan messages: the one for
        stage 0 (with token ids) and the one for the other stages (without)."""
        chunks_first: list[Chunk] = []
        chunks_rest: list[Chunk] = []
        batch = InflightBatch(next(_mb_ids), [], [], 0, 0, now)
        for c in plan.chunks:
            req = by_id[c.req_id]
            if req.status is Status.WAITING:
                self.waiting.remove(req)
                bisect.insort(self.running, req, key=lambda r: r.arrival)
                req.status = Status.RUNNING
            if req.first_scheduled is None:
                req.first_scheduled = now
            req.last_scheduled = now
            new_blocks = granted.get(req.req_id, [])
            req.num_blocks += len(new_blocks)
            self.free_blocks -= len(new_blocks)
            start = req.num_computed
            if not req.blocks_sent:
                # The stages learn (or relearn, after preemption) the table from scratch.
                assert start == 0, "a request's first chunk must start at token 0"
                req.blocks_sent = True
            req.num_computed += c.num_tokens
            sample = req.sample_spec() if req.num_computed == req.num_tokens else None
            if sample is not None:
                req.awaiting_token = True
                batch.sampling.append(req)
            if c.num_tokens == 1 and start > 0:
                batch.num_decode_tokens += 1
            else:
                batch.num_prefill_tokens += c.num_tokens
            req.inflight += 1
            batch.requests.append(req)
            chunks_first.append(Chunk(req.req_id, start, c.num_tokens,
                                      req.tokens(start, c.num_tokens), new_blocks, sample))
            chunks_rest.append(Chunk(req.req_id, start, c.num_tokens, [], new_blocks, sample))
        self.inflight[batch.mb_id] = batch
        released, self.to_release = self.to_release, []
        return (StepPlan(batch.mb_id, chunks_first, released),
                StepPlan(batch.mb_id, chunks_rest, released))

    def complete(self, mb_id: int) -> InflightBatch | None:
        """The last stage finished `mb_id`: its requests leave the pipeline."""
        batch = self.inflight.pop(mb_id, None)
        if batch is not None:
            for req in batch.requests:
                req.inflight -= 1
            for req in batch.sampling:
                req.awaiting_token = False
        return batch

    def remove(self, req: Request) -> bool:
        """Takes a finished request out of the queues once nothing in flight uses its blocks.
        Returns whether its blocks may be freed now."""
        if req.inflight > 0:
            return False
        if req in self.waiting:
            self.waiting.remove(req)
        elif req in self.running:
            self.running.remove(req)
            self.free_blocks += req.num_blocks
            self.to_release.append(req.req_id)
        return True
