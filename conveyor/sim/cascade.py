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
from common.scheduling.group_refinement import GroupRefiner, RefineSettings
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
    def __init__(self, cfg: Any, cost: Any, instances: list[Any], push: Any, workload: Any):
        cs = cfg.cascade
        self.cfg, self.cost, self.push = cfg, cost, push
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
        self.refiner = None
        if cs.refine and self.router is not None:
            settings = RefineSettings(cs.hysteresis, cs.refine_step, cfg.block_size, cs.drift,
                                      cs.replan_s, cs.window)
            copy = self.copy_s if self.bandwidth else None
            resolve = (lambda p, o, span: dp_groups(cfg, cost, p, o, span, copy)) \
                if cfg.groups == "auto" else None
            self.refiner = GroupRefiner(groups, settings, resolve)
            for inst in instances:
                inst.on_finish = self._finished
        self.next_refine = cs.refine_interval_s
        self.routed = [0] * len(instances)
        """Tokens routed to each instance since the last refinement: the load the refinement
        balances (what the current boundaries send where, not the backlog of earlier ones,
        which would keep pushing a boundary long after it moved far enough)."""
        self.active: dict[int, _Migration] = {}
        """Moves in progress by request id."""
        self.busy: set[int] = set()
        self.ticking = False
        self.moves = {"boundary": 0, "balance": 0}
        self.aborted = 0
        self.bytes = 0
        self.pauses: list[float] = []
        self.boundaries: list[tuple[float, str]] = [(0.0, groups.spec())]

    # ---- timing -----------------------------------------------------------------------------

    def copy_s(self, blocks: int) -> float:
        if blocks <= 0:
            return 0.0
        return self.copy_latency + blocks * max(self.bytes_per_block) / self.bandwidth

    def _copied(self, blocks: int) -> None:
        self.bytes += blocks * sum(self.bytes_per_block)

    # ---- the tick ---------------------------------------------------------------------------

    def arrived(self, now: float, instance: int, work: int) -> None:
        """A request of `work` tokens (prompt and cap) was routed to `instance`."""
        self.routed[instance] += work
        if not self.ticking and (self.planner is not None or self.refiner is not None):
            self.ticking = True
            self.push(now + self.interval, self._tick, None)

    def _tick(self, _: Any, now: float) -> None:
        if not self.active and not any(inst.by_id for inst in self.instances):
            self.ticking = False  # empty: the next arrival starts it again
            return
        if self.refiner is not None and now >= self.next_refine:
            self.next_refine = now + self.cfg.cascade.refine_interval_s
            routed, self.routed = self.routed, [0] * len(self.instances)
            if any(routed):  # no arrivals, no evidence: the boundaries stay
                self._set_groups(self.refiner.refine(now, routed), now)
        self._plan(None, now)
        self.push(now + self.interval, self._tick, None)

    def _set_groups(self, groups: LengthGroups, now: float) -> None:
        if groups == self.groups:
            return
        self.groups = groups
        self.router.set_groups(groups)
        if self.planner is not None:
            self.planner.set_groups(groups)
        self.boundaries.append((now, groups.spec()))

    def _finished(self, req: Any) -> None:
        if req.out and self.refiner is not None:
            self.refiner.finished(req.last_token or 0.0, req.prompt, req.out)

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
        if not req.running and not req.inflight:  # no KV: it moves at once
            dst.adopt(src.detach(req.req_id, now), now)
            self.moves[move.reason] += 1
            self.pauses.append(0.0)
            dst.schedule(now)
            return
        m = _Migration(move, req, now, preemptions=req.preemptions)
        self.active[req.req_id] = m
        self.busy.update((move.src, move.dst))
        self._next_stage(m, now)

    def _next_stage(self, m: _Migration, now: float) -> None:
        blocks = max(0, m.req.blocks - m.copied)
        m.stage += 1
        self._copied(blocks)
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
            src.migration_stops[req.req_id] = self._stop
        else:
            self._stop(req, now)

    def _stop(self, req: Any, now: float) -> None:
        """The source stops the request (its token is back): the last blocks are copied."""
        m = self.active[req.req_id]
        src, dst = self.by_index[m.move.src], self.by_index[m.move.dst]
        src.migration_stops.pop(req.req_id, None)
        if req.finished or dst.free_blocks < req.blocks or req.preemptions != m.preemptions:
            return self._end(m, True, now)
        left = max(0, req.blocks - m.copied)
        src.detach(req.req_id, now)
        dst.free_blocks -= req.blocks  # reserved for it during the pause
        self._copied(left)
        # nothing left to copy still takes the commit's round trip
        pause = self.copy_s(left) if left > 0 else self.copy_latency
        self.pauses.append(pause)
        self.push(now + pause, self._commit, m)

    def _commit(self, m: _Migration, now: float) -> None:
        dst = self.by_index[m.move.dst]
        dst.free_blocks += m.req.blocks
        dst.adopt(m.req, now)
        self.moves[m.move.reason] += 1
        self._end(m, False, now)
        dst.schedule(now)

    def _end(self, m: _Migration, aborted: bool, now: float) -> None:
        self.active.pop(m.req.req_id, None)
        self.busy.difference_update((m.move.src, m.move.dst))
        self.by_index[m.move.src].migration_stops.pop(m.req.req_id, None)
        if aborted:
            self.aborted += 1
        # the two instances are free again: the planners look at once, not at the next tick
        self.push(now, self._plan, None)

    def _plan(self, _: Any, now: float) -> None:
        if self.planner is not None:
            for move in self.planner.plan(self._states()):
                self._start(move, now)

    # ---- report -----------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        pauses = sorted(self.pauses)
        return {"groups": self.groups.spec(), "boundaries": self.boundaries,
                "migrations": dict(self.moves), "aborted": self.aborted,
                "migrated_bytes": self.bytes,
                "mean_pause_s": sum(pauses) / len(pauses) if pauses else None,
                "max_pause_s": pauses[-1] if pauses else None,
                "refinements": ({"nudges": self.refiner.nudges, "replans": self.refiner.replans}
                                if self.refiner else None)}


def _dtype_bytes(dtype: str) -> int:
    from conveyor.sim.cluster import DTYPE_BYTES

    return DTYPE_BYTES[dtype]
