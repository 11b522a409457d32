"""Dispatch: a policy's snapshot, its plan, preemption and the commit of a micro-batch; part of
the InstanceCore (core.py), apart by idea. Everything here runs once per micro-batch, most of
it once per request in the micro-batch: the hottest code of a large simulation.

How many micro-batches may be in flight is one rule, here: the policy's
`inflight_allowance(max_inflight, stages)` (by default `max_inflight` itself, then asked
nothing; a feedback controller may move it), so the controller and the simulator obey the
same allowance. The policy is shown `waiting` as a head of the queue, sized by its own
declaration (`SchedulingPolicy.waiting_need`), and not asked at all when nothing is waiting and
every running request awaits a token (it could only return an empty plan). The requests in a
snapshot are the core's own, read through RequestView's names (request.py): no view is built
per request per micro-batch.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING

from common.instance.batch import CoreBatch
from common.instance.request import CoreRequest, order_key as _order
from common.instance.views import make_kv, make_snapshot
from common.scheduling.policy import SchedulingPolicy
from common.scheduling.types import MicroBatchPlan, SchedulerSnapshot

if TYPE_CHECKING:
    from common.instance.core import InstanceCore


class PlanError(RuntimeError):
    """A policy asked for something the core refuses (an unknown request, more tokens than
    are schedulable, blocks that are not free): a bug in the policy."""


def _name(policy) -> str:
    return type(policy).__name__ if policy is not None else "the policy"


class Dispatch:
    """InstanceCore's dispatch methods (the state they use is InstanceCore's)."""

    def stage_views(self: InstanceCore) -> tuple:
        return self.feedback.views(self.inflight.values())

    def snapshot(self: InstanceCore, now: float, stages: tuple | None = None) -> SchedulerSnapshot:
        # The requests are their own views (request.py): a snapshot is the queues' tuples.
        waiting = self.head.views_of(self.waiting, self.num_running, now)
        return make_snapshot(now, self.depth, waiting, tuple(self.ready), self.num_running,
                             tuple([b.iview for b in self.inflight.values()]),
                             make_kv(self.total_blocks, self.free_blocks, self.block_size),
                             stages)

    def _policy_traits(self: InstanceCore, policy) -> tuple:
        if self._traits[0] is not policy:
            allow = getattr(type(policy), "inflight_allowance", None)
            # The base class's allowance is `max_inflight` itself: no call per plan for it.
            if allow is SchedulingPolicy.inflight_allowance:
                allow = None
            else:
                allow = getattr(policy, "inflight_allowance", None)
            self._traits = (policy, bool(getattr(policy, "reads_stage_feedback", False)),
                            allow)
        return self._traits

    def inflight_limit(self: InstanceCore, policy, stages: tuple | None) -> int:
        """The one rule for how many micro-batches may be in flight: the policy's allowance
        given the stage feedback, `max_inflight` for a policy without one."""
        allow = self._policy_traits(policy)[2]
        self.allowance = (self.max_inflight if allow is None
                          else max(1, int(allow(self.max_inflight, stages))))
        return self.allowance

    def next_plan(self: InstanceCore, policy, now: float) -> MicroBatchPlan | None:
        """The policy's next micro-batch (its preemptions carried out), or None when the
        pipeline is full or the policy has nothing to dispatch."""
        if not (self.ready or self.waiting):
            return None
        traits = self._traits if self._traits[0] is policy else self._policy_traits(policy)
        if traits[1]:
            stages = self.stage_views()
            limit = self.inflight_limit(policy, stages)
        else:
            stages = None
            limit = self.max_inflight if traits[2] is None else \
                self.inflight_limit(policy, stages)
        while len(self.inflight) < limit and (self.ready or self.waiting):
            self.policy_calls += 1
            plan: MicroBatchPlan = policy.schedule(self.snapshot(now, stages))
            preempted = self.preempt(plan.preempt) if plan.preempt else 0
            if plan.chunks:
                return plan
            if not preempted:
                return None
        return None

    def preempt(self: InstanceCore, req_ids: Sequence[int]) -> int:
        """Victims lose their KV and wait to be recomputed; requests in flight are kept."""
        by_id = self.by_id
        victims = []
        for rid in sorted(set(req_ids)):
            r = by_id.get(rid)
            if r is not None and r.running and r.inflight == 0 and not r.finished:
                victims.append(r)
        if not victims:
            return 0
        gone = set(victims)
        self.ready = [r for r in self.ready if r not in gone]
        for r in victims:
            self.free_blocks += r.blocks
            self.load += r.computed
            r.blocks = 0
            r.computed = 0
            r.running = False
            r.preemptions += 1
            self._enqueue(r)
            if self.on_release is not None:
                self.on_release(r)
        self.num_running -= len(victims)
        self.preemptions += len(victims)
        self.metrics.preemptions += len(victims)
        return len(victims)

    def block_wants(self: InstanceCore, plan: MicroBatchPlan) -> list[tuple[int, int]]:
        """(req_id, blocks to add) for every chunk of the plan that needs more blocks."""
        bs = self.block_size
        wants = []
        for c in plan.chunks:
            r = self.by_id.get(c.req_id)
            if r is None:
                raise PlanError(f"the plan names request {c.req_id}, not live on instance "
                                f"{self.index}")
            need = (r.computed + c.num_tokens + bs - 1) // bs - r.blocks
            if need > 0:
                wants.append((r.req_id, need))
        return wants

    def commit(self: InstanceCore, plan: MicroBatchPlan, now: float, policy=None) -> CoreBatch:
        """Dispatches `plan`: its requests take their blocks and tokens go in flight."""
        by_id = self.by_id
        bs = self.block_size
        free = self.free_blocks
        sampling: list[CoreRequest] = []
        partial: list[CoreRequest] = []
        details = [] if self.keep_chunks else None
        started: list[CoreRequest] = []
        decode = prefill = context = keys = longest = 0
        for c in plan.chunks:
            r = by_id.get(c.req_id)
            if r is None or r.finished:
                raise PlanError(f"{_name(policy)} scheduled request {c.req_id}, which is not "
                                f"live on instance {self.index}")
            n = c.num_tokens
            start = r.computed
            end = start + n
            known = r.prompt + r.out
            blocks = r.blocks
            if end > known or n < 1:  # an awaiting request has nothing schedulable
                raise PlanError(f"{_name(policy)} scheduled {n} tokens of request {c.req_id}, "
                                f"which has {0 if r.awaiting else known - start} schedulable")
            if not r.running:
                started.append(r)
            need = 0
            if end > blocks * bs:
                need = (end + bs - 1) // bs - blocks
                free -= need
                r.blocks = blocks + need
            r.computed = end
            if end == known:
                r.awaiting = True
                sampling.append(r)
            else:
                partial.append(r)
            if n == 1 and start:  # counted as InflightView and BatchShape count tokens
                decode += 1
                context += start
                if start > longest:
                    longest = start
            else:
                prefill += n
                keys += n * start + n * (n + 1) // 2  # each token attends to its prefix
            r.inflight += 1
            r.in_flight = True
            r.last_scheduled = now
            if details is not None:
                details.append((r, start, n, need))
        if free < 0:
            raise PlanError(f"{_name(policy)} scheduled {self.free_blocks - free} blocks with "
                            f"only {self.free_blocks} free (instance {self.index})")
        self.free_blocks = free
        used = self.total_blocks - free
        if used > self.max_used:
            self.max_used = used
        if started:
            self._start(started, now)
        if sampling and self.ready:
            self.ready = [r for r in self.ready if not r.awaiting]
        batch = CoreBatch(next(self._mb_ids), sampling, partial, details, decode, prefill,
                          context, keys, longest, plan.deadline, now)
        self.inflight[batch.mb_id] = batch
        self.load -= prefill + decode
        self.metrics.record_batch(prefill, decode)
        if decode > 1:
            self.metrics.record_spread(self.index, decode, context, longest)
        self.tokens_per_batch.add(prefill + decode)
        return batch

    def _start(self: InstanceCore, started: list[CoreRequest], now: float) -> None:
        """Waiting requests given their first chunk take a seat."""
        waiting = self.waiting
        head = self.head
        for r in started:
            if waiting and waiting[0] is r:
                waiting.popleft()
            else:
                waiting.remove(r)
            head.left(r)
            r.running = True
            if r.first_scheduled is None:
                r.first_scheduled = now
            if not r.awaiting:  # a partial prompt chunk: still schedulable
                bisect.insort(self.ready, r, key=_order)
        self.num_running += len(started)
