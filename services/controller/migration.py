"""Moving requests between the controller's instances: the migration state machine.

On each scheduling round (a micro-batch completed, a request arrived) the controller asks the
planner (common/scheduling/migration.py) for moves, showing it every instance's load, free
blocks and movable requests: those no micro-batch in flight holds, waiting or running. A move
the controller accepts is carried out at once, between micro-batches, by recompute: the
request leaves the source's core (`InstanceCore.detach`: its blocks go back to the source's
pool through the kv-cache manager's bookkeeping, its stages forget its table) and waits at the
destination (`InstanceCore.adopt`), which re-prefills its prompt plus every token it generated
and samples its next token from there. The request's id, tokens and client are unchanged, and
no token of it was in flight, so the stream goes on without a gap in its tokens or a repeat.

A migration is in progress from the move until the request's first token at the destination
(the pause its client sees, counted in `migration_pause`); while it is, it counts against
`migration.max_per_instance` of both instances. It is aborted if the request ends before then
(the client cancels, an error). No I/O here: the service frees the blocks it is told of and
wakes the instances.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import MigrationConfig
from common.instance import CoreRequest, Finish
from common.log import get_logger
from common.scheduling.migration import (Candidate, CrossBoundary, InstanceState,
                                         MigrationPlanner, Move)
from common.stats import ControllerMetrics
from services.controller.instance import ServedInstance

log = get_logger()


def make_planner(cfg: MigrationConfig, num_instances: int) -> MigrationPlanner:
    if cfg.planner == "boundary":
        return CrossBoundary(cfg.length_groups(num_instances))
    raise ValueError(f"unknown migration planner {cfg.planner!r}")


@dataclass
class Migration:
    """One move in progress."""

    req_id: int
    src: int
    dst: int
    reason: str
    started: float
    running: bool
    """It held KV at the source (a waiting request's move costs its client no pause)."""
    out: int
    """Its output tokens at the move: the next one comes from the destination."""


class Migrations:
    def __init__(self, cfg: MigrationConfig, instances: list[ServedInstance],
                 metrics: ControllerMetrics, planner: MigrationPlanner | None = None):
        self.cfg = cfg
        self.instances = instances
        self.metrics = metrics
        self.planner = planner or make_planner(cfg, len(instances))
        self.active: dict[int, Migration] = {}
        """Migrations in progress, by request id."""

    def busy(self, index: int) -> bool:
        """The instance takes part in as many migrations as it may at once."""
        n = sum(1 for m in self.active.values() if index in (m.src, m.dst))
        return n >= self.cfg.max_per_instance

    def states(self) -> list[InstanceState]:
        """What the planner sees of each instance."""
        states = []
        for inst in self.instances:
            core = inst.core
            cands = [Candidate(r.req_id, r.num_tokens, r.blocks, r.running)
                     for r in core.by_id.values()
                     if not r.finished and r.inflight == 0 and r.req_id not in self.active]
            states.append(InstanceState(inst.index, core.load, core.free_blocks, cands,
                                        busy=self.busy(inst.index), ready=inst.ready))
        return states

    def round(self, now: float) -> list[Migration]:
        """Asks the planner for moves and carries out those it may; returns them."""
        if not self.cfg.enabled or len(self.instances) < 2:
            return []
        started = []
        for move in self.planner.plan(self.states()):
            why = self.refusal(move)
            if why:
                self.metrics.migrations_refused += 1
                log.warning("migration refused", req_id=move.req_id, src=move.src,
                            dst=move.dst, reason=move.reason, why=why)
                continue
            started.append(self.start(move, now))
        return started

    def refusal(self, move: Move) -> str:
        """Why the controller will not carry `move` out now ("" when it will): the planner
        decided on a view that a request arriving or a micro-batch dispatched since may have
        changed, and a planner may be wrong."""
        n = len(self.instances)
        if not (0 <= move.src < n and 0 <= move.dst < n) or move.src == move.dst:
            return f"no move from instance {move.src} to {move.dst}"
        src, dst = self.instances[move.src].core, self.instances[move.dst]
        req = src.by_id.get(move.req_id)
        if req is None or req.finished:
            return f"request {move.req_id} is not live on instance {move.src}"
        if req.inflight:
            return "a micro-batch in flight holds it"
        if move.req_id in self.active:
            return "it is migrating already"
        if self.busy(move.src) or self.busy(move.dst):
            return f"migration.max_per_instance ({self.cfg.max_per_instance}) reached"
        if not dst.ready:
            return f"instance {move.dst} is not ready"
        need = -(-req.num_tokens // dst.core.block_size)
        if need > dst.core.free_blocks:
            return (f"instance {move.dst} has {dst.core.free_blocks} free blocks, the request "
                    f"needs {need}")
        return ""

    def start(self, move: Move, now: float) -> Migration:
        """Moves the request now: detached from the source (its blocks freed), adopted by the
        destination to be recomputed."""
        src, dst = self.instances[move.src], self.instances[move.dst]
        req, blocks = src.core.detach(move.req_id, now)
        running = blocks > 0
        dst.core.adopt(req, now)
        m = Migration(req.req_id, move.src, move.dst, move.reason, now, running, req.out)
        self.active[req.req_id] = m
        self.metrics.migrations += 1
        if not running:
            self.metrics.migrations_waiting += 1
        self.metrics.migration_recomputed_tokens += req.num_tokens if running else 0
        log.info("request migrating", req_id=req.req_id, src=move.src, dst=move.dst,
                 reason=move.reason, context=req.num_tokens, blocks=blocks,
                 state="running" if running else "waiting")
        src.wake.set()
        dst.wake.set()
        return m

    def took_token(self, req: CoreRequest, now: float) -> None:
        """A request was given a token (call after `InstanceCore.complete`): its first at the
        destination ends its migration."""
        m = self.active.get(req.req_id)
        if m is not None and req.instance == m.dst and req.out > m.out:
            del self.active[req.req_id]
            if m.running:
                self.metrics.migration_pause.add(now - m.started)

    def ended(self, req: CoreRequest, now: float) -> None:
        """A request ended (the core's on_finish): a migration it was in ends with it. Its
        last token ends it normally (`Finish.STOP`, `LENGTH`); anything else aborts it."""
        if req.req_id not in self.active:
            return
        if req.finish in (Finish.STOP, Finish.LENGTH):
            self.took_token(req, now)
            return
        m = self.active.pop(req.req_id)
        self.metrics.migrations_aborted += 1
        log.info("migration aborted", req_id=req.req_id, src=m.src, dst=m.dst,
                 finish=req.finish.name.lower())
