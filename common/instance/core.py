"""The instance core: one instance's requests, queues, KV blocks and micro-batches in flight,
and the state machine that carries a policy's plans out. Pure Python: no sockets, no asyncio,
the clock passed in. The controller wraps it with sockets and wire messages
(services/controller), the simulator with an event loop and gauges (conveyor/sim), so both
make the same plans by construction.

The cycle, driven by the wrapper:

* `add` queues a request (waiting: no KV, arrival order);
* `next_plan` asks the policy for the next micro-batch while fewer than `max_inflight` are in
  flight, and carries out its preemptions (victims lose their KV and wait to be recomputed);
* `commit` dispatches a plan: chunks take their blocks and advance `computed` (it counts
  in-flight tokens); a chunk that reaches the last known token samples, and its request awaits
  that token (not schedulable until the micro-batch returns);
* `stage_done` takes one stage's report of a micro-batch (its compute and wait time) into the
  stage feedback (feedback.py): per-stage step-time models and queue lengths, shown to a
  policy that reads them (`SchedulingPolicy.reads_stage_feedback`) as `snapshot.stages`;
* `complete` takes the last stage's sampled tokens and applies the stop conditions (stop
  tokens, max_tokens, the context length); `finish` ends a request for any other reason
  (abort, error). A finished request's blocks are released once no micro-batch in flight
  still holds it.

How many micro-batches may be in flight is one rule, here: the policy's
`inflight_allowance(max_inflight, stages)` (by default `max_inflight` itself; a feedback
controller may move it), so the controller and the simulator obey the same allowance.

The policy is shown `waiting` as a head of the queue, sized by the policy's own declaration
(`SchedulingPolicy.waiting_need`), and not asked at all when nothing is waiting and every
running request awaits a token (it could only return an empty plan). Views of requests are
cached on the request until its state changes (views.py).
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from operator import attrgetter

from common.instance.batch import CoreBatch
from common.instance.feedback import StageFeedback
from common.instance.request import CoreRequest, Finish
from common.instance.views import make_kv, make_snapshot, view as _view
from common.instance.waiting import WaitingHead
from common.scheduling.types import (WHOLE_QUEUE, MicroBatchPlan, SchedulerSnapshot,
                                     WaitingNeed)
from common.stats import ControllerMetrics, Moments

_order = attrgetter("order")


def remaining_load(req: CoreRequest) -> int:
    """What a request adds to its instance's `load`: its known tokens not yet computed plus
    the tokens it may still generate."""
    return (req.prompt + req.out - req.computed) + (req.max_tokens - req.out)


def _name(policy) -> str:
    return type(policy).__name__ if policy is not None else "the policy"


class PlanError(RuntimeError):
    """A policy asked for something the core refuses (an unknown request, more tokens than
    are schedulable, blocks that are not free): a bug in the policy."""


class InstanceCore:
    """One instance (a pipeline of `depth` stages) and its requests."""

    def __init__(self, index: int, depth: int, max_inflight: int, block_size: int,
                 total_blocks: int, metrics: ControllerMetrics,
                 waiting_need: WaitingNeed = WHOLE_QUEUE, keep_chunks: bool = False,
                 on_release: Callable[[CoreRequest], None] | None = None,
                 on_finish: Callable[[CoreRequest], None] | None = None):
        self.index = index
        self.depth = depth
        self.max_inflight = max_inflight
        self.block_size = block_size
        self.total_blocks = total_blocks
        self.free_blocks = total_blocks
        self.metrics = metrics
        self.keep_chunks = keep_chunks
        self.on_release = on_release
        """Called when a request's blocks go back to the pool (finished or preempted)."""
        self.on_finish = on_finish
        """Called once when a request ends, whatever the reason."""
        self.waiting: deque[CoreRequest] = deque()
        """Requests holding no KV, in arrival order."""
        self.ready: list[CoreRequest] = []
        """Requests holding KV and not awaiting a token, in arrival order."""
        self.num_running = 0
        """Requests holding KV (ready, awaiting a token, or finished with a batch in flight)."""
        self.by_id: dict[int, CoreRequest] = {}
        self.inflight: dict[int, CoreBatch] = {}
        self._mb_ids = itertools.count(1)
        self.load = 0
        """Routing weight: tokens still to process for the requests placed here."""
        self.finished = 0
        self.preemptions = 0
        self.policy_calls = 0
        self.max_used = 0
        self.tokens_per_batch = Moments()
        """Prefill plus decode tokens of each micro-batch."""
        self.head = WaitingHead(waiting_need)
        self.lengths = None
        """A common.prediction.RequestLengths: fills predicted lengths as requests are added
        and learns from those that end at EOS (None: no predictor)."""
        self.feedback = StageFeedback(depth)
        self.allowance = max_inflight
        """Micro-batches the policy last allowed in flight (`inflight_allowance`)."""
        self._traits: tuple = (None, False, None)
        """(policy, reads_stage_feedback, inflight_allowance) of the last policy seen: looked
        up once per policy, not on every plan."""

    def resize_pool(self, total_blocks: int) -> None:
        """The pool is known (the controller learns it once every stage has registered)."""
        self.free_blocks += total_blocks - self.total_blocks
        self.total_blocks = total_blocks

    # ---- requests ---------------------------------------------------------------------------

    def add(self, req: CoreRequest, now: float) -> None:
        """Queues a request placed here; the wrapper then runs the scheduling loop."""
        if req.req_id in self.by_id:
            raise ValueError(f"request {req.req_id} is already on instance {self.index}")
        req.instance = self.index
        self.by_id[req.req_id] = req
        if self.lengths is not None:
            self.lengths.admit(req)
        self.load += req.prompt + req.max_tokens
        self._enqueue(req)
        self.metrics.prompt_tokens += req.prompt
        self.metrics.pending[self.index].update(True, now)

    def _enqueue(self, req: CoreRequest) -> None:
        waiting = self.waiting
        if not waiting or waiting[-1].order < req.order:
            waiting.append(req)
            pos = len(waiting) - 1
        else:
            pos = bisect.bisect_left(waiting, req.order, key=_order)
            waiting.insert(pos, req)
        self.head.queued_at(pos)

    def finish(self, req: CoreRequest, reason: Finish, now: float, error: str = "") -> bool:
        """Ends a request (abort, error, or a stop condition). Its blocks are released now,
        or when the last micro-batch holding it returns. Returns False if it had ended."""
        if req.finished:
            return False
        req.finished = True
        req.finish = reason
        req.error = error
        req.view = None
        self.load -= remaining_load(req)
        if req.running:
            if not req.awaiting:
                self._drop_ready(req)
        else:
            self.waiting.remove(req)
            self.head.valid = False
        m = self.metrics
        m.finished[reason.name.lower()] += 1
        self.finished += 1
        if reason is Finish.STOP or reason is Finish.LENGTH:
            m.record_request(req.timings(), req.prompt, req.out)
            if req.slo is not None:
                m.record_slo(req.slo.label, req.slo_met())
        if self.lengths is not None:
            self.lengths.finished(req)
        if self.on_finish is not None:
            self.on_finish(req)
        if req.inflight == 0:
            self._remove(req, now)
        return True

    def _drop_ready(self, req: CoreRequest) -> None:
        ready = self.ready
        i = bisect.bisect_left(ready, req.order, key=_order)
        if i < len(ready) and ready[i] is req:
            del ready[i]

    def _remove(self, req: CoreRequest, now: float) -> None:
        """A finished request with nothing in flight leaves; its blocks go back."""
        del self.by_id[req.req_id]
        if req.running:
            req.running = False
            self.num_running -= 1
            self.free_blocks += req.blocks
            req.blocks = 0
            if self.on_release is not None:
                self.on_release(req)
        if not self.by_id:
            self.metrics.pending[self.index].update(False, now)

    # ---- moving a request between instances (migration) --------------------------------------

    def detach(self, req_id: int, now: float) -> CoreRequest:
        """Takes a live request out of this instance to move it to another (`adopt`): it leaves
        its queue, its blocks go back to this pool (through on_release, as a finished
        request's do) and its load leaves with it. It keeps `computed` and `blocks`: the KV it
        carries, which the destination takes. Refused while a micro-batch in flight holds it
        (its token is not back yet)."""
        req = self.by_id.get(req_id)
        if req is None or req.finished:
            raise ValueError(f"request {req_id} is not live on instance {self.index}")
        if req.inflight:
            raise ValueError(f"request {req_id} is in a micro-batch in flight on instance "
                             f"{self.index}: detach it once its token is back")
        self.load -= remaining_load(req)
        if req.running:
            self._drop_ready(req)
            self.free_blocks += req.blocks
            self.num_running -= 1
            if self.on_release is not None:
                self.on_release(req)
            req.running = False
        else:
            self.waiting.remove(req)
        self.head.valid = False
        req.view = None
        del self.by_id[req_id]
        if not self.by_id:
            self.metrics.pending[self.index].update(False, now)
        return req

    def adopt(self, req: CoreRequest, now: float) -> None:
        """Takes a request detached from another instance, with the KV it carries
        (`req.blocks` blocks, `req.computed` tokens): running if it has KV, waiting
        otherwise. Its prediction and timings travel with it."""
        if req.req_id in self.by_id:
            raise ValueError(f"request {req.req_id} is already on instance {self.index}")
        if req.blocks > self.free_blocks:
            raise ValueError(f"request {req.req_id} brings {req.blocks} KV blocks, instance "
                             f"{self.index} has {self.free_blocks} free")
        req.instance = self.index
        req.view = None
        self.by_id[req.req_id] = req
        if not req.blocks:  # no KV carried: recomputed from its first token
            req.computed = 0
        self.load += remaining_load(req)
        if req.blocks:
            req.running = True
            self.free_blocks -= req.blocks
            self.max_used = max(self.max_used, self.total_blocks - self.free_blocks)
            self.num_running += 1
            bisect.insort(self.ready, req, key=_order)
            self.head.valid = False
        else:
            self._enqueue(req)
        self.metrics.pending[self.index].update(True, now)

    def reserve(self, count: int) -> None:
        """Takes `count` free blocks out of the pool for a request arriving by live migration
        (its KV is copied into them before it is adopted); `unreserve` gives them back."""
        if not 0 <= count <= self.free_blocks:
            raise ValueError(f"instance {self.index} has {self.free_blocks} free blocks, "
                             f"cannot reserve {count}")
        self.free_blocks -= count

    def unreserve(self, count: int) -> None:
        self.free_blocks += count

    # ---- scheduling -------------------------------------------------------------------------

    def stage_views(self) -> tuple:
        return self.feedback.views(self.inflight.values())

    def snapshot(self, now: float, stages: tuple | None = None) -> SchedulerSnapshot:
        views = []
        add = views.append
        for r in self.ready:
            v = r.view
            add(v if v is not None else _view(r))
        waiting = self.head.views_of(self.waiting, self.num_running)
        return make_snapshot(now, self.depth, waiting, tuple(views), self.num_running,
                             tuple([b.iview for b in self.inflight.values()]),
                             make_kv(self.total_blocks, self.free_blocks, self.block_size),
                             stages)

    def _policy_traits(self, policy) -> tuple:
        if self._traits[0] is not policy:
            self._traits = (policy, bool(getattr(policy, "reads_stage_feedback", False)),
                            getattr(policy, "inflight_allowance", None))
        return self._traits

    def inflight_limit(self, policy, stages: tuple | None) -> int:
        """The one rule for how many micro-batches may be in flight: the policy's allowance
        given the stage feedback, `max_inflight` for a policy without one."""
        allow = self._policy_traits(policy)[2]
        self.allowance = (self.max_inflight if allow is None
                          else max(1, int(allow(self.max_inflight, stages))))
        return self.allowance

    def next_plan(self, policy, now: float) -> MicroBatchPlan | None:
        """The policy's next micro-batch (its preemptions carried out), or None when the
        pipeline is full or the policy has nothing to dispatch."""
        if not (self.ready or self.waiting):
            return None
        stages = self.stage_views() if self._policy_traits(policy)[1] else None
        limit = self.inflight_limit(policy, stages)
        while len(self.inflight) < limit and (self.ready or self.waiting):
            self.policy_calls += 1
            plan: MicroBatchPlan = policy.schedule(self.snapshot(now, stages))
            preempted = self.preempt(plan.preempt) if plan.preempt else 0
            if plan.chunks:
                return plan
            if not preempted:
                return None
        return None

    def preempt(self, req_ids: Sequence[int]) -> int:
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
            r.view = None
            self._enqueue(r)
            if self.on_release is not None:
                self.on_release(r)
        self.num_running -= len(victims)
        self.preemptions += len(victims)
        self.metrics.preemptions += len(victims)
        return len(victims)

    def block_wants(self, plan: MicroBatchPlan) -> list[tuple[int, int]]:
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

    def commit(self, plan: MicroBatchPlan, now: float, policy=None) -> CoreBatch:
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
            r.last_scheduled = now
            r.view = None
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

    def _start(self, started: list[CoreRequest], now: float) -> None:
        """Waiting requests given their first chunk take a seat."""
        waiting = self.waiting
        for r in started:
            if waiting and waiting[0] is r:
                waiting.popleft()
            else:
                waiting.remove(r)
            r.running = True
            if r.first_scheduled is None:
                r.first_scheduled = now
            if not r.awaiting:  # a partial prompt chunk: still schedulable
                bisect.insort(self.ready, r, key=_order)
        self.num_running += len(started)
        self.head.valid = False

    # ---- completion -------------------------------------------------------------------------

    def stage_done(self, mb_id: int, stage: int, compute_s: float, wait_s: float) -> None:
        """Stage `stage` reports micro-batch `mb_id` done (call it before `complete` for the
        last stage): its step time feeds that stage's model, its progress the queues. A
        report of a micro-batch no longer in flight (failed, or completed) is dropped: its
        shape is gone."""
        batch = self.inflight.get(mb_id)
        if batch is None or not 0 <= stage < self.depth:
            return
        self.feedback.step_done(stage, batch.prefill, batch.decode, compute_s, wait_s)
        batch.stage_reported(stage)

    def complete(self, mb_id: int, tokens: Sequence[int], now: float) -> CoreBatch:
        """The last stage finished `mb_id`, sampling `tokens` (one per `batch.sampling`, in
        order). Requests take their tokens and stop conditions apply; requests that ended while
        it was in flight drop theirs and let go of their blocks."""
        batch = self.inflight.pop(mb_id)
        sampling = batch.sampling
        if len(tokens) != len(sampling):
            raise ValueError(f"micro-batch {mb_id} samples {len(sampling)} sequences, got "
                             f"{len(tokens)} tokens")
        m = self.metrics
        m.micro_batches += 1
        gone: list[CoreRequest] = []
        for r in batch.partial:
            r.inflight -= 1
            r.view = None
            if r.finished and r.inflight == 0:
                gone.append(r)
        back: list[CoreRequest] = []
        keep = back.append
        stopped = None
        dropped = 0
        for r, token in zip(sampling, tokens):
            # It awaited this very token, so no other micro-batch in flight holds it (and its
            # view, reset at dispatch, was not rebuilt: an awaiting request is in no queue).
            r.inflight = 0
            if r.finished:  # ended while in flight: its token is dropped
                r.awaiting = False
                gone.append(r)
                dropped += 1
                continue
            out = r.out = r.out + 1
            ids = r.output_token_ids
            if ids is not None:
                ids.append(token)
            last = r.last_token
            if last is None:
                r.first_token = now
            else:
                itl = r.itl
                if itl is not None:
                    itl.append(now - last)
            r.last_token = now
            if token in r.stop_token_ids:
                reason = Finish.STOP
            elif out >= r.length_stop:
                reason = Finish.LENGTH
            else:
                r.awaiting = False
                keep(r)
                continue
            if stopped is None:
                stopped = [(r, reason)]
            else:
                stopped.append((r, reason))
        m.generated_tokens += len(sampling) - dropped
        if back:
            ready = self.ready
            if ready:
                ready += back
                ready.sort(key=_order)
            else:
                back.sort(key=_order)
                self.ready = back
        if stopped:
            for r, reason in stopped:
                self.finish(r, reason, now)  # still awaiting: it is in no queue to leave
                r.awaiting = False
        for r in gone:
            if r.req_id in self.by_id:
                self._remove(r, now)
        return batch

    def reset_pipeline(self, now: float) -> int:
        """The instance's stages lost their state (one died; they start afresh): the
        micro-batches in flight are dropped without their tokens, and every running request
        loses its KV and waits to be recomputed, keeping what it has generated (its client sees
        a pause, not an error). Returns how many requests wait again."""
        for batch in self.inflight.values():
            for r in batch.requests:
                r.inflight = 0
                r.awaiting = False
                r.view = None
                if r.finished and r.req_id in self.by_id:
                    self._remove(r, now)  # ended while in flight: its blocks go back now
        self.inflight.clear()
        return self.preempt([r.req_id for r in self.by_id.values() if r.running])

    def fail_batch(self, mb_id: int, error: str, now: float) -> CoreBatch | None:
        """A stage failed `mb_id`: its requests end with `error` and it leaves the pipeline."""
        batch = self.inflight.get(mb_id)
        if batch is None:
            return None
        for r in batch.requests:
            self.finish(r, Finish.ERROR, now, error)
        return self.complete(mb_id, [0] * len(batch.sampling), now)
