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

The class is written in three modules, by idea: this one (its state, requests coming and
ending, completion), dispatch.py (snapshot, plan, preemption, commit: `Dispatch`) and moves.py
(detach and adopt between instances: `Moves`).
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Callable, Sequence

from common.instance.batch import CoreBatch
from common.instance.dispatch import Dispatch, PlanError
from common.instance.feedback import StageFeedback
from common.instance.moves import Moves, remaining_load
from common.instance.request import CoreRequest, Finish, order_key as _order
from common.instance.waiting import WaitingHead
from common.scheduling.types import WHOLE_QUEUE, WaitingNeed
from common.stats import ControllerMetrics, Moments

__all__ = ["InstanceCore", "PlanError", "remaining_load"]


class InstanceCore(Dispatch, Moves):
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
        self.head.entered(req, pos)

    def finish(self, req: CoreRequest, reason: Finish, now: float, error: str = "") -> bool:
        """Ends a request (abort, error, or a stop condition). Its blocks are released now,
        or when the last micro-batch holding it returns. Returns False if it had ended."""
        if req.finished:
            return False
        req.finished = True
        req.finish = reason
        req.error = error
        self.load -= remaining_load(req)
        if req.running:
            if not req.awaiting:
                self._drop_ready(req)
        else:
            self.waiting.remove(req)
            self.head.left(req)
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
            left = r.inflight = r.inflight - 1
            if not left:
                r.in_flight = False
                if r.finished:
                    gone.append(r)
        back: list[CoreRequest] = []
        keep = back.append
        stopped = None
        dropped = 0
        for r, token in zip(sampling, tokens):
            # It awaited this very token, so no other micro-batch in flight holds it.
            r.inflight = 0
            r.in_flight = False
            if r.finished:  # ended while in flight: its token is dropped
                r.awaiting = False
                gone.append(r)
                dropped += 1
                continue
            out = r.out = r.out + 1
            r.num_tokens += 1
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
                r.in_flight = False
                r.awaiting = False
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
