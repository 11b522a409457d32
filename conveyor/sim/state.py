"""A simulated instance: the instance core (common/instance/core.py) driven by the simulator's
event loop, plus the gauges the report draws.

It does what the controller's scheduling loop and step-done handler do around the same core:
whenever a micro-batch completes or requests arrive, it asks the policy for micro-batches
until `max_inflight` are in flight, times each on the cluster's stages and schedules its
completion; a completion hands the core each sampled request's token (the simulator's EOS at
the request's true length, an ordinary token otherwise), and the core applies the stop
conditions. With a dispatch latency the loop stops after each dispatch and goes on when it is
over, as the controller's waits out the allocation of the blocks.

Stage feedback without events of its own: the pipeline fixes a micro-batch's whole path at
dispatch and logs each stage's (end, compute, wait) on the batch (`CoreBatch.stage_ends`);
the instance hands a stage's entry to the core (`stage_done`, as the controller does on a
StepDone) the first time the loop runs at or after that end. So the feedback a policy sees is
never ahead of the clock, but may lag it until the next arrival or completion: the
controller sees a StepDone the moment it lands, the simulator at its next scheduling round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.instance.core import InstanceCore, PlanError
from common.scheduling.policy import waiting_need_of
from common.scheduling.types import WHOLE_QUEUE, WaitingNeed
from conveyor.sim.requests import SIM_EOS, SimRequest, SimulationError


def waiting_need(policy: Any, waiting_head: int) -> WaitingNeed:
    """simulator.waiting_head: 0 the policy's own declaration, -1 the whole queue, N the
    first N requests."""
    if waiting_head < 0:
        return WHOLE_QUEUE
    if waiting_head > 0:
        return WaitingNeed(whole=False, min_requests=waiting_head)
    return waiting_need_of(policy)


class SimInstance(InstanceCore):
    """One instance: the core, its policy and pipeline, and gauges."""

    def __init__(self, index: int, cfg: Any, policy: Any, timer: Any, pipeline: Any,
                 metrics: Any, push: Callable[[float, Callable, Any], None],
                 sample_points: int = 400):
        super().__init__(index, cfg.num_stages, cfg.max_inflight, cfg.block_size,
                         cfg.num_blocks, metrics, waiting_need(policy, cfg.waiting_head))
        self.policy = policy
        self.feeds_back = bool(getattr(policy, "reads_stage_feedback", False))
        """Stage reports go to the core's feedback only for a policy that reads it: the
        reports cost ~15% of a large run's time, and no one else reads them here."""
        self.logs_stages = self.feeds_back or cfg.stage_queue_samples
        """Each micro-batch's stage ends are logged (`CoreBatch.stage_ends`) only for the
        feedback or the stage-queue samples (simulator.stage_queue_samples)."""
        self.timer = timer
        self.pipeline = pipeline
        self.push = push
        self.dispatch_latency = cfg.dispatch_latency_s
        self.honors_eos = False
        """Some request here stops at EOS (bench's default workloads ignore it: then the tokens
        sampled cannot matter, and every one is an ordinary 0)."""
        self.busy_until = 0.0
        """The scheduling loop awaits a dispatch's allocation until then (dispatch_latency)."""
        # Gauges: time integrals since 0 and peaks of the waiting queue and the blocks in use.
        self._g_t = 0.0
        self.wait_area = 0.0
        self.used_area = 0.0
        self.inflight_area = 0.0
        self.max_inflight_seen = 0
        self.max_waiting = 0
        self.sample_points = sample_points
        self.sample_interval = 1e-3
        self._next_sample = 0.0
        self.stage_samples: list[tuple[float, tuple[int, ...], int, int]] = []
        """(time, each stage's queue, micro-batches allowed in flight, micro-batches completed
        so far), with `samples`, when simulator.stage_queue_samples is on."""
        self.samples_stages = cfg.stage_queue_samples
        self.completed = 0
        """Micro-batches that left the pipeline."""
        self.token_hooks: dict[int, Callable[[Any, float], None]] = {}
        """request id -> hook(req, now), called once when the request's token is back (and
        then dropped): a migration (conveyor/sim/cascade.py) stops a request leaving this
        instance then, and ends the pause of one that arrived here."""
        self.samples: list[tuple[float, int, int, int]] = [(0.0, 0, 0, 0)]
        """(time, waiting, running, blocks in use) after a scheduling round, every
        sample_interval seconds at most; the interval doubles (and every other sample goes)
        when there are 2 x sample_points."""

    # ---- gauges -----------------------------------------------------------------------------

    def _gauge(self, now: float) -> None:
        dt = now - self._g_t
        if dt > 0:
            self.wait_area += len(self.waiting) * dt
            self.used_area += (self.total_blocks - self.free_blocks) * dt
            self.inflight_area += len(self.inflight) * dt
            self._g_t = now

    def _sample(self, now: float) -> None:
        samples = self.samples
        samples.append((now, len(self.waiting), self.num_running,
                        self.total_blocks - self.free_blocks))
        if self.samples_stages:
            self.stage_samples.append((now, self.stage_queues_at(now), self.allowance,
                                       self.completed))
        if len(samples) >= 2 * self.sample_points:
            del samples[1::2]
            del self.stage_samples[1::2]
            self.sample_interval *= 2
        self._next_sample = now + self.sample_interval

    def close_gauges(self, now: float) -> None:
        self._gauge(now)
        self._sample(now)

    # ---- the loop ---------------------------------------------------------------------------

    def add(self, req: SimRequest, now: float, schedule: bool = True) -> None:
        """A request routed here arrives; the loop runs unless more requests arrive at the same
        instant (then it runs once after them, as the controller reads the submits already
        waiting on its socket before its scheduling task gets a turn)."""
        self._gauge(now)
        if req.stop_token_ids:
            self.honors_eos = True
        super().add(req, now)
        if len(self.waiting) > self.max_waiting:
            self.max_waiting = len(self.waiting)
        if schedule:
            self.schedule(now)

    def schedule(self, now: float) -> None:
        if now < self.busy_until:
            return
        self._gauge(now)
        if self.feeds_back:
            self.report_stages(now)
        policy = self.policy
        while True:
            try:
                plan = self.next_plan(policy, now)
                if len(self.waiting) > self.max_waiting:  # preemptions send requests back
                    self.max_waiting = len(self.waiting)
                if plan is None:
                    break
                batch = self.commit(plan, now, policy)
            except PlanError as e:
                raise SimulationError(str(e)) from None
            if len(self.inflight) > self.max_inflight_seen:
                self.max_inflight_seen = len(self.inflight)
            decode, prefill = batch.decode, batch.prefill
            durations, hops, corun = self.timer(prefill, decode,
                                               batch.context / decode if decode else 0.0,
                                               len(batch.sampling),
                                               batch.keys / prefill if prefill else 0.0,
                                               batch.longest)
            if self.logs_stages:
                batch.stage_ends = []
            self.pipeline.submit(now + self.dispatch_latency, durations, hops, self.on_complete,
                                 batch, corun, batch.stage_ends)
            if self.dispatch_latency:
                self.busy_until = now + self.dispatch_latency
                self.push(self.busy_until, self._resume, None)
                break
        if now >= self._next_sample:
            self._sample(now)

    @property
    def stage_queue_area(self) -> list[float]:
        """Time integral of each stage's queue (the pipeline's, Pipeline.queue_area)."""
        return self.pipeline.queue_area

    def stage_queues_at(self, now: float) -> tuple[int, ...]:
        """Each stage's queue at `now` as the stage feedback counts it, from the logs."""
        queues = [0] * self.depth
        last = self.depth - 1
        for batch in self.inflight.values():
            passed = 0
            for entry in batch.stage_ends or ():
                if entry[0] > now:
                    break
                passed += 1
            queues[passed if passed < last else last] += 1
        return tuple(queues)

    def report_stages(self, now: float) -> None:
        """Every stage end the clock has passed, to the core's stage feedback, in order."""
        for batch in list(self.inflight.values()):
            log = batch.stage_ends
            done = batch.stages_done
            while log is not None and done < len(log) and log[done][0] <= now:
                _, compute, wait = log[done]
                self.stage_done(batch.mb_id, done, compute, wait)
                done += 1

    def _resume(self, _: Any, now: float) -> None:
        self.schedule(now)

    def on_complete(self, batch: Any, now: float) -> None:
        """The last stage finished `batch`; then the loop runs."""
        self._gauge(now)
        if next(iter(self.inflight)) != batch.mb_id:
            raise SimulationError("micro-batches completed out of dispatch order")
        self.completed += 1
        if self.feeds_back:
            self.report_stages(now)  # this batch's last stage included
        # Each sampled request's token: EOS at its true length (SimRequest.true_output).
        sampling = batch.sampling
        if self.honors_eos:
            tokens = [SIM_EOS if r.out + 1 >= r.true_output else 0 for r in sampling]
        else:
            tokens = [0] * len(sampling)
        self.complete(batch.mb_id, tokens, now)
        if self.token_hooks:
            for r in batch.requests:
                if not r.inflight and r.req_id in self.token_hooks:
                    self.token_hooks.pop(r.req_id)(r, now)
        self.schedule(now)
