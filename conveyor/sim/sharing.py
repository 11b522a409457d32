"""One instance's pipeline when its stage processes share a machine's CPU cores.

The default CPU deployment runs every stage as a single-threaded process (devices.py gives
each `cpu_count // stages` threads, at least one) on one machine: two or three stage processes
on two cores, next to the controller and the ingress. The kernel shares the cores fairly, so
while k stages are computing each advances at min(1, cores / k) of its own speed — processor
sharing; and while two or more compute, each also runs at its micro-batch's co-run speed, a
fraction of its speed alone (shared caches and memory bandwidth: a measured property of the
machine, given per micro-batch by the StepTimer since decode work contends more than a long
prefill's, 1 when unknown). A
stage's step is not a fixed duration any more: a micro-batch dispatched later slows
down one already running. So, unlike `Pipeline`, this one cannot fix a micro-batch's path at
dispatch; it keeps each stage's remaining work (in seconds of a dedicated core, what the cost
model gives) and steps from event to event: an input arriving at a stage, or the running step
closest to its end finishing. Every change of the running set moves the next finish, so a
version number retires the stale finish events.

Busy time is wall time from a step's start to its end, as a stage worker measures and reports
it in StepDone; input wait is counted as `Pipeline` counts it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

Push = Callable[[float, Callable[[Any, float], None], Any], None]

_DONE = 1e-9
"""Seconds of work left below which a step counts as finished (floating-point slack)."""


class _Job:
    __slots__ = ("durations", "hops", "on_done", "arg", "dispatched", "corun", "stage_log",
                 "waited", "reached")

    def __init__(self, durations: tuple[float, ...], hops: tuple[float, ...],
                 on_done: Callable[[Any, float], None], arg: Any, dispatched: float,
                 corun: float, stage_log: list | None = None):
        self.durations = durations
        self.hops = hops
        self.on_done = on_done
        self.arg = arg
        self.dispatched = dispatched
        self.corun = corun
        """Its speed while another stage computes, before the sharing of cores."""
        self.stage_log = stage_log
        """(end, compute, wait) per stage as each finishes (Pipeline.submit's)."""
        self.waited = 0.0
        self.reached = dispatched
        """When it reached its current stage (Pipeline.queue_area's convention)."""


class SharedHostPipeline:
    """The P stages of one instance as single-threaded processes on `cores` shared cores."""

    def __init__(self, num_stages: int, cores: int, push: Push):
        if cores < 1:
            raise ValueError("a shared host needs at least one core")
        self.num_stages = num_stages
        self.cores = cores
        self.push = push
        self.queued: list[deque[_Job]] = [deque() for _ in range(num_stages)]
        """Micro-batches whose input reached the stage while it was busy, in order."""
        self.running: list[_Job | None] = [None] * num_stages
        self.left = [0.0] * num_stages
        """Dedicated-core seconds left of each running step."""
        self.started = [0.0] * num_stages
        self.idle_since = [0.0] * num_stages
        self.updated = 0.0
        """When `left` was last brought up to date."""
        self.version = 0
        self.busy = [0.0] * num_stages
        self.wait = [0.0] * num_stages
        self.queue_area = [0.0] * num_stages
        """As Pipeline.queue_area."""
        self.steps = 0

    def submit(self, now: float, durations: tuple[float, ...], hops: tuple[float, ...],
               on_done: Callable[[Any, float], None], arg: Any, corun: float = 1.0,
               stage_log: list | None = None) -> None:
        """A micro-batch dispatched to stage 0 at `now`; `on_done(arg, t)` runs when the last
        stage finishes it. corun: its speed while another stage computes (caches, memory
        bandwidth), before the sharing of cores. stage_log: as Pipeline.submit's, each entry
        added when its stage finishes."""
        self.push(now, self._arrive, (0, _Job(durations, hops, on_done, arg, now, corun,
                                              stage_log)))

    # ---- events ---------------------------------------------------------------------------------

    def _arrive(self, item: tuple[int, _Job], now: float) -> None:
        stage, job = item
        self._advance(now)
        if self.running[stage] is None:
            if stage:
                since = self.idle_since[stage]
                job.waited = now - (since if since > job.dispatched else job.dispatched)
                self.wait[stage] += job.waited
            self._start(stage, job, now)
        else:
            self.queued[stage].append(job)
        self._plan_finish(now)

    def _finish(self, version: int, now: float) -> None:
        if version != self.version:
            return  # the running set changed since this finish was planned
        self._advance(now)
        last = self.num_stages - 1
        for stage in range(self.num_stages):
            job = self.running[stage]
            if job is None or self.left[stage] > _DONE:
                continue
            self.busy[stage] += now - self.started[stage]
            self.queue_area[stage] += now - job.reached
            job.reached = now
            if job.stage_log is not None:
                job.stage_log.append((now, now - self.started[stage], job.waited))
            job.waited = 0.0
            self.running[stage] = None
            self.idle_since[stage] = now
            if stage == last:
                self.steps += 1
                self.push(now, job.on_done, job.arg)
            else:
                self.push(now + job.hops[stage], self._arrive, (stage + 1, job))
            if self.queued[stage]:
                self._start(stage, self.queued[stage].popleft(), now)
        self._plan_finish(now)

    # ---- bookkeeping ----------------------------------------------------------------------------

    def _start(self, stage: int, job: _Job, now: float) -> None:
        self.running[stage] = job
        self.left[stage] = job.durations[stage]
        self.started[stage] = now

    def _speeds(self) -> list[tuple[int, float]]:
        """(stage, speed) of every computing stage."""
        active = [(s, job.corun) for s, job in enumerate(self.running) if job is not None]
        if len(active) < 2:
            return [(s, 1.0) for s, _ in active]
        share = min(1.0, self.cores / len(active))
        return [(s, share * corun) for s, corun in active]

    def _advance(self, now: float) -> None:
        elapsed = now - self.updated
        if elapsed > 0:
            for s, speed in self._speeds():
                self.left[s] -= elapsed * speed
        self.updated = now

    def _plan_finish(self, now: float) -> None:
        speeds = self._speeds()
        if not speeds:
            return
        self.version += 1
        soonest = min(max(self.left[s], 0.0) / speed for s, speed in speeds)
        self.push(now + soonest, self._finish, self.version)
