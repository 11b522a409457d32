"""CascadeInfer in the simulator: the length groups (given, or chosen by the range DP on the
workload), the router over them, the migration planners and their moves carried out between
the simulated instances' cores with Llumnix's live-migration cost, and the groups' refinement.
The same router, planners, DP and refinement as a deployment's (common/scheduling); this
module only times what they decide.

A move, on a running request (Llumnix, OSDI '24): its KV is copied while it keeps decoding at
the source, in stages (each copies the blocks added since the last one: the first all of
them), at most `migration_stages`; once at most `pause_blocks` blocks are left (or the stages
are spent) the source stops it when its next token is back (InstanceCore.detach), reserves
its blocks at the destination and copies the rest: the pause. Then the destination takes it
(InstanceCore.adopt) and it decodes on there. A copy of b blocks takes migration_latency + the
largest stage's share of b blocks over the link (stage s copies to stage s, all at once). A
waiting request holds no KV and moves at once. The move is aborted, the request staying at
the source, when it ends there meanwhile or the destination has no room for it at the pause.
One move at a time per instance, as Llumnix's default. A request preempted at the source
meanwhile (its KV dropped, the copy stale) aborts its move too.

The planners and the refinement run every `plan_interval_ms` while any request is in the
cluster (a tick that reschedules itself; it stops when the cluster is empty, so the event
queue drains), and the planners again whenever a move ends (its two instances are free).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

from common.instance.core import remaining_load
from common.scheduling.group_refinement import GroupRefiner, LiveGroups, RefineSettings
from common.scheduling.length_groups import LengthGroups
from common.scheduling.length_routing import LengthGroupRouter
from common.scheduling.migration import Candidate, InstanceState, Move, make_planner
from common.scheduling.range_dp import DPSettings, LengthSample, pipeline_round_s, solve


BALANCE_OFFER = 8
"""Running requests per instance offered to the balance rule (the fewest blocks first)."""


@dataclass
class _Migration:
    move: Move
    req: Any
    started: float
    copied: int = 0
    """Blocks copied so far."""
    stage: int = 0
    preemptions: int = 0
    """The request's preemptions when the move began: one more, and the copy is stale."""
    nbytes: int = 0
    """KV bytes copied so far, every stage's."""


def link_bytes_s(cfg: Any, cost: Any) -> float:
    """Bandwidth between stage s of two instances: cascade's, the cluster link's, else the
    cost model's link."""
    if cfg.cascade.migration_bandwidth_gbps > 0:
        return cfg.cascade.migration_bandwidth_gbps * 1e9
    if cfg.link_bandwidth_bytes_s > 0:
        return cfg.link_bandwidth_bytes_s
    bw = getattr(cost, "link_bandwidth", None) or getattr(cost, "link_bandwidth_bytes_s", None)
    if not bw:
        raise ValueError("migration needs a link bandwidth: set cascade.migration_bandwidth_gbps"
                         " or link.bandwidth_gbps")
    return float(bw)


def dp_groups(cfg: Any, cost: Any, prompts: list[int], outputs: list[int], span_s: float,
              copy_s: Any = None) -> LengthGroups:
    """The range DP's groups for a length sample on this cluster (its stages, KV pool and
    policy's batch limits)."""
    cs = cfg.cascade
    policy = cfg.make_policy()
    settings = DPSettings(grid=cs.dp_grid, max_groups=cs.dp_max_groups,
                          chunk_tokens=int(getattr(policy, "max_prefill_tokens", 0)
                                           or getattr(policy, "max_num_batched_tokens", 0)
                                           or 2048),
                          max_batch=int(getattr(policy, "max_num_seqs", 256)),
                          kv_tokens=cfg.num_blocks * cfg.block_size,
                          longest_quantile=cs.dp_longest_quantile, seed=cfg.seed)
    sample = LengthSample(prompts, outputs, max(len(prompts) / max(span_s, 1e-9), 1e-9),
                          settings)
    hop = float(cost.transfer_s(1)) if hasattr(cost, "transfer_s") else 0.0
    # What a move adds to its request's latency: the pause for the last blocks (the rest is
    # copied while it decodes on).
    last = cs.pause_blocks
    migration_s = (lambda x: copy_s(min(last, math.ceil(x / cfg.block_size))) if copy_s
                   else 0.0)
    return solve(sample, cfg.instances, pipeline_round_s(cost, cfg.stages, hop),
                 migration_s).groups


class SimCascade:
    """What it does is counted in the controller's own metrics (`metrics`, common/stats):
    migrations by reason, aborted, KV bytes, pause and copy times, and the groups over time,
    by the controller's definitions."""

    def __init__(self, cfg: Any, cost: Any, instances: list[Any], push: Any, workload: Any,
                 metrics: Any):
        cs = cfg.cascade
        self.cfg, self.cost, self.push, self.metrics = cfg, cost, push, metrics
        self.instances = instances
        self.by_index = {inst.index: inst for inst in instances}
        self.interval = cs.plan_interval_ms * 1e-3
        self.copy_latency = cs.migration_latency_us * 1e-6
        self.bytes_per_block = [cfg.shape.kv_bytes_per_block(cfg.block_size, s.num_layers,
                                                             _dtype_bytes(cfg.dtype))
                                for s in cfg.stages]
        self.bandwidth = link_bytes_s(cfg, cost) if cs.migration else 0.0
        if cfg.routing == "length-groups" and cfg.groups == "auto":
            span = max(workload.arrival_s[-1] - workload.arrival_s[0], 1e-9) \
                if len(workload) > 1 else 1.0
            groups = dp_groups(cfg, cost, list(workload.prompt_len), list(workload.output_len),
                               span, self.copy_s if self.bandwidth else None)
        elif cfg.routing == "length-groups":
            groups = LengthGroups.parse(cfg.groups, cfg.instances)
        else:
            groups = LengthGroups.single(cfg.instances)
        self.groups = groups
        self.router = LengthGroupRouter(groups, cfg.seed, cs.choices) \
            if cfg.routing == "length-groups" else None
        self.planner = make_planner(cs.migration, groups, cs.balance_min_gap)
        if self.router is not None:
            metrics.record_groups(0.0, groups.spec())
        self.live: LiveGroups | None = None
        """The refinement (it counts the work routed to each instance since its last look:
        what the current boundaries send where)."""
        if cs.refine and self.router is not None:
            settings = RefineSettings(cs.hysteresis, cs.refine_step, cfg.block_size, cs.drift,
                                      cs.replan_s, cs.window)
            copy = self.copy_s if self.bandwidth else None
            resolve = (lambda p, o, span: dp_groups(cfg, cost, p, o, span, copy)) \
                if cfg.groups == "auto" else None
            self.live = LiveGroups(GroupRefiner(groups, settings, resolve),
                                   [self.router, self.planner], cs.refine_interval_s,
                                   self._set_groups)
            for inst in instances:
                inst.on_finish = self._finished
        self.active: dict[int, _Migration] = {}
        """Moves in progress by request id."""
        self.busy: set[int] = set()
        self.ticking = False

    # ---- timing -----------------------------------------------------------------------------

    def copy_s(self, blocks: int) -> float:
        if blocks <= 0:
            return 0.0
        return self.copy_latency + blocks * max(self.bytes_per_block) / self.bandwidth

    # ---- the tick ---------------------------------------------------------------------------

    def arrived(self, now: float, instance: int, work: int) -> None:
        """A request of `work` tokens (prompt and cap) was routed to `instance`."""
        if self.live is not None:
            self.live.routed(instance, work)
        if not self.ticking and (self.planner is not None or self.live is not None):
            self.ticking = True
            self.push(now + self.interval, self._tick, None)

    def _tick(self, _: Any, now: float) -> None:
        if not self.active and not any(inst.by_id for inst in self.instances):
            self.ticking = False  # empty: the next arrival starts it again
            return
        if self.live is not None:
            self.live.tick(now)
        self._plan(None, now)
        self.push(now + self.interval, self._tick, None)

    def _set_groups(self, now: float, groups: LengthGroups) -> None:
        """The refinement changed the groups (the router and planner follow them already)."""
        self.groups = groups
        self.metrics.record_groups(now, groups.spec())

    def _finished(self, req: Any) -> None:
        self.live.finished(req.last_token or 0.0, req.prompt, req.out)

    def _states(self) -> list[InstanceState]:
        """Each instance's load and the requests a planner could move: those out of their
        instance's range (the boundary rule's) and the `BALANCE_OFFER` running ones with the
        fewest blocks (the balance rule takes the fewest that fits), not every request: the
        planners run every tick over every instance."""
        states = []
        names = self.cfg.cascade.migration
        boundary, balance = "boundary" in names, "balance" in names
        for inst in self.instances:
            hi = self.groups.groups[self.groups.group_of_instance(inst.index)].hi
            live = [r for r in inst.by_id.values()
                    if not r.finished and r.req_id not in self.active]
            offer = [r for r in live if r.prompt + r.out >= hi] if boundary else []
            if balance:
                running = [r for r in live if r.running]
                offer += heapq.nsmallest(BALANCE_OFFER, running, key=lambda r: r.blocks)
            cands = [Candidate(r.req_id, r.prompt + r.out, r.blocks, r.running,
                               remaining_load(r)) for r in dict.fromkeys(offer)]
            states.append(InstanceState(inst.index, inst.load, inst.free_blocks, cands,
                                        busy=inst.index in self.busy))
        return states

    # ---- a move -----------------------------------------------------------------------------

    def _start(self, move: Move, now: float) -> None:
        src, dst = self.by_index[move.src], self.by_index[move.dst]
        req = src.by_id.get(move.req_id)
        if req is None or req.finished:
            return
        m = self.metrics
        m.migrations += 1
        m.migration_reasons[move.reason] += 1
        if not req.running and not req.inflight:  # no KV: it moves at once
            m.migrations_waiting += 1
            dst.adopt(src.detach(req.req_id, now), now)
            dst.schedule(now)
            return
        m = _Migration(move, req, now, preemptions=req.preemptions)
        self.active[req.req_id] = m
        self.busy.update((move.src, move.dst))
        self._next_stage(m, now)

    def _next_stage(self, m: _Migration, now: float) -> None:
        blocks = max(0, m.req.blocks - m.copied)
        m.stage += 1
        m.nbytes += blocks * sum(self.bytes_per_block)
        m.copied = m.req.blocks
        self.push(now + self.copy_s(blocks), self._stage_done, m)

    def _stage_done(self, m: _Migration, now: float) -> None:
        req, src = m.req, self.by_index[m.move.src]
        if req.finished or req.instance != src.index or req.preemptions != m.preemptions:
            return self._end(m, True, now)
        left = max(0, req.blocks - m.copied)
        if left > self.cfg.cascade.pause_blocks and m.stage < self.cfg.cascade.migration_stages:
            return self._next_stage(m, now)
        if req.inflight:  # stop it when its token is back (SimInstance.on_complete)
            src.token_hooks[req.req_id] = self._stop
        else:
            self._stop(req, now)

    def _stop(self, req: Any, now: float) -> None:
        """The source stops the request (its token is back): the last blocks are copied."""
        m = self.active[req.req_id]
        src, dst = self.by_index[m.move.src], self.by_index[m.move.dst]
        src.token_hooks.pop(req.req_id, None)
        if req.finished or dst.free_blocks < req.blocks or req.preemptions != m.preemptions:
            return self._end(m, True, now)
        left = max(0, req.blocks - m.copied)
        src.detach(req.req_id, now)
        dst.free_blocks -= req.blocks  # reserved for it during the pause
        m.nbytes += left * sum(self.bytes_per_block)
        # nothing left to copy still takes the commit's round trip
        pause = self.copy_s(left) if left > 0 else self.copy_latency
        self.push(now + pause, self._commit, (m, now))

    def _commit(self, moved: tuple[_Migration, float], now: float) -> None:
        m, paused_at = moved
        dst = self.by_index[m.move.dst]
        dst.free_blocks += m.req.blocks
        dst.adopt(m.req, now)
        self.metrics.migration_kv_bytes += m.nbytes
        self.metrics.migration_copy.add(now - m.started)
        # The pause, as the controller counts it: the stop at the source to the request's
        # first token at the destination.
        dst.token_hooks[m.req.req_id] = \
            lambda _req, t: self.metrics.migration_pause.add(t - paused_at)
        self._end(m, False, now)
        dst.schedule(now)

    def _end(self, m: _Migration, aborted: bool, now: float) -> None:
        self.active.pop(m.req.req_id, None)
        self.busy.difference_update((m.move.src, m.move.dst))
        self.by_index[m.move.src].token_hooks.pop(m.req.req_id, None)
        if aborted:
            self.metrics.migrations_aborted += 1
        # the two instances are free again: the planners look at once, not at the next tick
        self.push(now, self._plan, None)

    def _plan(self, _: Any, now: float) -> None:
        if self.planner is not None:
            for move in self.planner.plan(self._states()):
                self._start(move, now)

    # ---- report -----------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """What only the simulation's cascade knows (the migrations and the groups' history
        are in the metrics)."""
        r = self.live.refiner if self.live is not None else None
        return {"groups": self.groups.spec(),
                "refinements": {"nudges": r.nudges, "replans": r.replans} if r else None}


def _dtype_bytes(dtype: str) -> int:
    from conveyor.sim.cluster import DTYPE_BYTES

    return DTYPE_BYTES[dtype]
