"""Simulated request and instance state, carrying out plans exactly as the controller does.

`SimInstance` mirrors services/controller/instance.py and the scheduling loop of
services/controller/service.py:

* a snapshot (`common.scheduling.types.SchedulerSnapshot`, the very type the controller
  builds) holds the waiting requests (no KV, arrival order), the ready ones (holding KV and not
  awaiting a token, arrival order), the seats taken, the micro-batches in flight and the pool;
* while fewer than `max_inflight` micro-batches are in flight, the instance's own policy object
  is asked for a plan; preempted requests lose their blocks and go back to waiting (recompute),
  chunks get their blocks and advance `num_computed` at dispatch (it counts in-flight tokens);
  a chunk that reaches the end of the known tokens samples, and its request awaits its token
  and is not ready until that micro-batch returns;
* a micro-batch completes when the last stage finishes it: its sampled requests get a token,
  stop at max_tokens or the context length, and a finished request frees its blocks at once;
* the loop runs again whenever a micro-batch completes or a request arrives.

Two liberties, neither visible to a policy:

* `waiting` in a snapshot is a head of the queue, not all of it (simulator.waiting_head = 0,
  the default): the shortest prefix holding at least as many requests as the free seats could
  admit (plus one, and at least 2) and at least `ClusterConfig.head_tokens` pending prompt
  tokens. The built-in policies make the same plans with it as with the whole queue: fcfs and
  sarathi admit in order and stop at a request that does not fit, at the token budget or when
  the seats are taken; throttle's prefill budget reads the pending tokens W of the queue only
  through min(max(W / prefill_iterations, min), cap <= max_prefill_tokens), which a head of
  prefill_iterations x max_prefill_tokens tokens already saturates. Under overload this keeps
  a snapshot O(seats) instead of O(queue); the controller could pass the same head.
  waiting_head = N passes the first N, -1 the whole queue.
* When nothing is waiting and every running request awaits a token, the policy is not asked:
  it could only return an empty plan (a plan may name only requests of the snapshot).
Views of requests and snapshots come from `views.py`, cached on the request until its state
changes.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable
from operator import attrgetter
from typing import Any

from common.scheduling.types import MicroBatchPlan, SchedulerSnapshot
from conveyor.sim.requests import SimBatch, SimRequest, SimulationError
from conveyor.sim.views import make_kv, make_snapshot, view as _view
from services.controller.metrics import Moments


_rid = attrgetter("rid")


class SimInstance:
    """One instance: its queues, pool, policy, pipeline and gauges.

    Request ids grow with arrival time (the workload is in arrival order), so "arrival order"
    is id order here, ties included: the controller's monotonic clock never ties, and a request
    preempted back into the queue goes behind those that arrived before it, as there."""

    def __init__(self, index: int, cfg: Any, policy: Any, timer: Any, pipeline: Any,
                 metrics: Any, push: Callable[[float, Callable, Any], None],
                 sample_points: int = 400):
        self.index = index
        self.policy = policy
        self.timer = timer
        self.pipeline = pipeline
        self.metrics = metrics
        self.push = push
        self.depth = cfg.num_stages
        self.max_inflight = cfg.max_inflight
        self.block_size = cfg.block_size
        self.total_blocks = cfg.num_blocks
        self.free_blocks = cfg.num_blocks
        self.dispatch_latency = cfg.dispatch_latency_s
        self.busy_until = 0.0
        """The scheduling loop awaits a dispatch's allocation until then (dispatch_latency)."""
        # The waiting head (see the module docstring): by seats and tokens, fixed, or all.
        self.head_seats = cfg.waiting_head == 0
        self.head_min = 2 if cfg.waiting_head == 0 else (
            cfg.waiting_head if cfg.waiting_head > 0 else 1 << 62)
        self.head_tokens = cfg.head_tokens if cfg.waiting_head == 0 else 0
        self.max_num_seqs = cfg.max_num_seqs
        self.waiting: deque[SimRequest] = deque()
        """Requests holding no KV, in arrival order."""
        self.ready: list[SimRequest] = []
        """Requests holding KV and not awaiting a token, in arrival order."""
        self.num_running = 0
        """Requests holding KV (ready or awaiting a token)."""
        self.by_id: dict[int, SimRequest] = {}
        self.inflight: deque[SimBatch] = deque()
        self._head: tuple = ()
        self._head_valid = True
        self._head_whole = True
        """The cached head is the whole queue."""
        self.load = 0
        """Tokens still to process for the requests placed here (Instance.load)."""
        self.finished = 0
        self.preemptions = 0
        self.policy_calls = 0
        self.tokens_per_batch = Moments()
        """Prefill plus decode tokens of each micro-batch (their sum's spread: not derivable
        from the per-phase moments the metrics keep)."""
        # Gauges: time integrals since 0 and peaks of the waiting queue and the blocks in use.
        self._g_t = 0.0
        self.wait_area = 0.0
        self.used_area = 0.0
        self.inflight_area = 0.0
        self.max_inflight_seen = 0
        self.max_waiting = 0
        self.max_used = 0
        self.sample_points = sample_points
        self.sample_interval = 1e-3
        self._next_sample = 0.0
        self.samples: list[tuple[float, int, int, int]] = [(0.0, 0, 0, 0)]
        """(time, waiting, running, blocks in use) after a scheduling round, every
        sample_interval seconds at most; the interval doubles (and every other sample goes)
        when there are 2 x sample_points."""

    # ---- gauges ---------------------------------------------------------------------------------

    def _gauge(self, now: float) -> None:
        dt = now - self._g_t
        if dt > 0:
            self.wait_area += len(self.waiting) * dt
            self.used_area += (self.total_blocks - self.free_blocks) * dt
            self.inflight_area += len(self.inflight) * dt
            self._g_t = now

    def _sample(self, now: float) -> None:
        """The gauges as a scheduling round leaves them, every sample_interval at most."""
        samples = self.samples
        samples.append((now, len(self.waiting), self.num_running,
                        self.total_blocks - self.free_blocks))
        if len(samples) >= 2 * self.sample_points:
            del samples[1::2]
            self.sample_interval *= 2
        self._next_sample = now + self.sample_interval

    def close_gauges(self, now: float) -> None:
        self._gauge(now)
        self._sample(now)

    # ---- requests -------------------------------------------------------------------------------

    def add(self, req: SimRequest, now: float, schedule: bool = True) -> None:
        """A request routed here arrives (Controller._on_submit); the scheduling loop runs
        unless more requests arrive at the same instant (then it runs once after them)."""
        self._gauge(now)
        req.instance = self.index
        self.by_id[req.rid] = req
        self.load += req.prompt + req.max_tokens
        self._enqueue(req)
        if len(self.waiting) > self.max_waiting:
            self.max_waiting = len(self.waiting)
        self.metrics.pending[self.index].update(True, now)
        if schedule:
            self.schedule(now)

    def _enqueue(self, req: SimRequest) -> None:
        waiting = self.waiting
        if not waiting or waiting[-1].rid < req.rid:
            waiting.append(req)
            pos = len(waiting) - 1
        else:
            pos = bisect.bisect_left(waiting, req.rid, key=_rid)
            waiting.insert(pos, req)
        if self._head_whole or pos < len(self._head):
            self._head_valid = False

    # ---- scheduling -----------------------------------------------------------------------------

    def snapshot(self, now: float) -> SchedulerSnapshot:
        """What the policy is shown now (Instance.snapshot)."""
        return self._snapshot(now, self._ready_views())

    def _ready_views(self) -> tuple:
        views = []
        add = views.append
        for r in self.ready:
            v = r.view
            add(v if v is not None else _view(r))
        return tuple(views)

    def _waiting_head(self) -> tuple:
        head = self._head
        if self._head_valid:
            if not self.head_seats or self._head_whole:
                return head
            if len(head) > self.max_num_seqs - self.num_running:  # still enough seats
                return head
        seats = max(self.max_num_seqs - self.num_running + 1, self.head_min) \
            if self.head_seats else self.head_min
        tokens_needed = self.head_tokens
        views = []
        add = views.append
        tokens = 0
        whole = True
        for r in self.waiting:
            v = r.view
            add(v if v is not None else _view(r))
            tokens += r.prompt + r.out - r.computed
            if len(views) >= seats and tokens >= tokens_needed:
                whole = len(views) == len(self.waiting)
                break
        head = self._head = tuple(views)
        self._head_valid = True
        self._head_whole = whole
        return head

    def _snapshot(self, now: float, ready: tuple) -> SchedulerSnapshot:
        return make_snapshot(now, self.depth, self._waiting_head(), ready, self.num_running,
                             tuple([b.iview for b in self.inflight]),
                             make_kv(self.total_blocks, self.free_blocks, self.block_size))

    def schedule(self, now: float) -> None:
        """Controller._schedule_loop for one wake-up. With a dispatch latency the loop stops
        after each dispatch and goes on when it is over (`_resume`), as the controller's awaits
        the KV allocation; a wake-up meanwhile is left to that."""
        if now < self.busy_until:
            return
        inflight = self.inflight
        policy = self.policy
        while len(inflight) < self.max_inflight and (self.ready or self.waiting):
            self.policy_calls += 1
            plan: MicroBatchPlan = policy.schedule(self._snapshot(now, self._ready_views()))
            preempted = self._preempt(plan.preempt, now) if plan.preempt else 0
            if not plan.chunks:
                if preempted:
                    continue
                break
            self._dispatch(plan.chunks, now)
            if self.dispatch_latency:
                self.busy_until = now + self.dispatch_latency
                self.push(self.busy_until, self._resume, None)
                break
        if now >= self._next_sample:
            self._sample(now)

    def _resume(self, _: Any, now: float) -> None:
        self.schedule(now)

    def _preempt(self, req_ids: tuple[int, ...], now: float) -> int:
        """Instance.preempt: victims lose their KV and wait to be recomputed."""
        by_id = self.by_id
        victims = []
        for rid in sorted(set(req_ids)):
            r = by_id.get(rid)
            if r is not None and r.running and r.inflight == 0:
                victims.append(r)
        if not victims:
            return 0
        self._gauge(now)
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
        self.num_running -= len(victims)
        if len(self.waiting) > self.max_waiting:
            self.max_waiting = len(self.waiting)
        self.preemptions += len(victims)
        self.metrics.preemptions += len(victims)
        return len(victims)

    def _dispatch(self, chunks: tuple, now: float) -> None:
        """Instance.commit, then the stages run the micro-batch."""
        self._gauge(now)
        by_id = self.by_id
        bs = self.block_size
        free = self.free_blocks
        sampling: list[SimRequest] = []
        partial: list[SimRequest] = []
        started: list[SimRequest] = []
        to_sample = sampling.append
        decode = prefill = context = keys = longest = 0
        for c in chunks:
            r = by_id.get(c.req_id)
            if r is None:
                raise SimulationError(f"policy {type(self.policy).__name__} scheduled "
                                      f"request {c.req_id}, which is not live on instance "
                                      f"{self.index}")
            n = c.num_tokens
            start = r.computed
            end = start + n
            known = r.prompt + r.out
            blocks = r.blocks
            if end > known or n < 1:
                raise SimulationError(f"policy {type(self.policy).__name__} scheduled {n} "
                                      f"tokens of request {c.req_id}, which has "
                                      f"{0 if r.awaiting else known - start} schedulable")
            if not blocks:
                started.append(r)
            if end > blocks * bs:
                need = (end + bs - 1) // bs - blocks
                free -= need
                r.blocks = blocks + need
            r.computed = end
            if end == known:
                r.awaiting = True
                to_sample(r)
            else:
                partial.append(r)
            if n == 1 and start:  # counted as the controller counts InflightView tokens
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
        if free < 0:
            raise SimulationError(f"policy {type(self.policy).__name__} scheduled "
                                  f"{self.free_blocks - free} blocks with only "
                                  f"{self.free_blocks} free (instance {self.index})")
        self.free_blocks = free
        used = self.total_blocks - free
        if used > self.max_used:
            self.max_used = used
        if started:
            self._start(started, now)
        if sampling and self.ready:
            self.ready = [r for r in self.ready if not r.awaiting]
        tokens = prefill + decode
        self.load -= tokens
        batch = SimBatch(sampling, partial, decode, prefill)
        inflight = self.inflight
        inflight.append(batch)
        if len(inflight) > self.max_inflight_seen:
            self.max_inflight_seen = len(inflight)
        self.metrics.record_batch(prefill, decode)
        self.tokens_per_batch.add(tokens)
        durations, hop, corun = self.timer(prefill, decode, context / decode if decode else 0.0,
                                           len(sampling), keys / prefill if prefill else 0.0,
                                           longest)
        self.pipeline.submit(now + self.dispatch_latency, durations, hop, self.on_complete, batch,
                             corun)

    def _start(self, started: list[SimRequest], now: float) -> None:
        """Waiting requests given their first chunk take a seat (WAITING -> RUNNING)."""
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
                bisect.insort(self.ready, r, key=_rid)
        self.num_running += len(started)
        self._head_valid = False

    # ---- completion -----------------------------------------------------------------------------

    def on_complete(self, batch: SimBatch, now: float) -> None:
        """The last stage finished `batch` (Controller._on_step_done), then scheduling runs."""
        self._gauge(now)
        if self.inflight.popleft() is not batch:
            raise SimulationError("micro-batches completed out of dispatch order")
        self.metrics.micro_batches += 1
        for r in batch.partial:
            r.inflight -= 1
            r.view = None
        finished = None
        back: list[SimRequest] = []
        keep = back.append
        sampling = batch.sampling
        for r in sampling:
            # It awaited this very token, so no other micro-batch in flight holds it.
            r.inflight = 0
            r.awaiting = False
            out = r.out = r.out + 1
            last = r.last_token
            if last is None:
                r.first_token = now
            else:
                r.itl.append(now - last)
            r.last_token = now
            if out < r.max_tokens:  # make_request clamped it to the context left
                keep(r)
            elif finished is None:
                finished = [r]
            else:
                finished.append(r)
        self.metrics.generated_tokens += len(sampling)
        if finished:
            for r in finished:
                self._finish(r, now)
        if back:
            ready = self.ready
            if ready:
                ready += back
                ready.sort(key=_rid)
            else:
                back.sort(key=_rid)
                self.ready = back
        self.schedule(now)

    def _finish(self, r: SimRequest, now: float) -> None:
        """Controller._finish + Instance.remove: the blocks are free at once (nothing else in
        flight holds the request: it awaited this very token)."""
        r.finished = True
        self.num_running -= 1
        self.free_blocks += r.blocks
        self.load -= (r.prompt + r.out - r.computed) + (r.max_tokens - r.out)
        r.blocks = 0
        r.running = False
        r.view = None
        del self.by_id[r.rid]
        self.finished += 1
        m = self.metrics
        m.finished["length"] += 1
        m.record_request(r.timings())
        if not self.num_running and not self.waiting:
            m.pending[self.index].update(False, now)
