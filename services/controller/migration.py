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

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from common.config import MigrationConfig
from common.instance import CoreRequest, Finish, pool_misfit
from common.instance.core import remaining_load
from common.log import get_logger
from common.scheduling.migration import Candidate, InstanceState, MigrationPlanner, Move
from common.stats import ControllerMetrics
from common.wire.internal_messages import KVMoved
from services.controller.instance import ServedInstance
from services.controller.live_migration import LiveCopy, LiveRounds

log = get_logger()


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
    copy: LiveCopy | None = None
    """Its KV copy while the source still holds it (live migration), else None."""
    paused_at: float | None = None
    """When it stopped at the source (live: the last round; recompute: the move)."""
    cancel: tuple | None = None
    """(Finish, error) of an end asked for while it was in no core (the last round)."""


class Migrations:
    def __init__(self, cfg: MigrationConfig, instances: list[ServedInstance],
                 metrics: ControllerMetrics, planner: MigrationPlanner | None,
                 send: Callable | None = None, assign: Callable | None = None,
                 free: Callable | None = None, end: Callable | None = None):
        self.cfg = cfg
        self.instances = instances
        self.metrics = metrics
        self.planner = planner
        self.active: dict[int, Migration] = {}
        """Migrations in progress, by request id."""
        self.live = (LiveRounds(cfg, send, assign, free)
                     if cfg.mode == "live" and send is not None else None)
        self.end = end
        """end(req, Finish, error): ends a request through the service (a cancel that came
        while it was in no core is carried out once it is adopted)."""
        self._mig_ids = itertools.count(1)
        self.stay: set[int] = set()
        """Requests whose live copy aborted: they finish where they are (no retry storm
        against a destination that refuses, or a link that fails)."""

    def busy(self, index: int) -> bool:
        """The instance takes part in as many migrations as it may at once."""
        n = sum(1 for m in self.active.values() if index in (m.src, m.dst))
        return n >= self.cfg.max_per_instance

    def states(self) -> list[InstanceState]:
        """What the planner sees of each instance."""
        states = []
        for inst in self.instances:
            core = inst.core
            cands = [Candidate(r.req_id, r.num_tokens, r.blocks, r.running, remaining_load(r))
                     for r in core.by_id.values()
                     if not r.finished and r.inflight == 0 and r.req_id not in self.active
                     and r.req_id not in self.stay]
            states.append(InstanceState(inst.index, core.load, core.free_blocks, cands,
                                        busy=self.busy(inst.index), ready=inst.ready))
        return states

    def round(self, now: float) -> list[Migration]:
        """Asks the planner for moves and carries out those it may; returns them."""
        if not self.cfg.enabled or len(self.instances) < 2 or self.planner is None:
            return []
        self.check_copies(now)
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

    def check_copies(self, now: float) -> None:
        """Moves every live copy on that can move, aborting one whose round is overdue: between
        micro-batches, and on the controller's timer, so that a destination gone silent ends
        its copy even when no micro-batch completes to notice (an idle deployment)."""
        for m in list(self.active.values()):
            if m.copy is not None:
                self._advance(m, now)

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
        """Starts the move: a running request's KV copy (live), or at once by recompute
        (detached from the source, its blocks freed; adopted by the destination)."""
        src, dst = self.instances[move.src], self.instances[move.dst]
        req = src.core.by_id[move.req_id]
        running = req.running
        m = Migration(req.req_id, move.src, move.dst, move.reason, now, running, req.out)
        self.active[req.req_id] = m
        self.metrics.migrations += 1
        self.metrics.migrations_waiting += 0 if running else 1
        self.metrics.migration_reasons[move.reason] += 1
        why = (self.live.cannot_copy(src, dst, req) if self.live is not None and running
               else "recompute")
        log.info("request migrating", req_id=req.req_id, src=move.src, dst=move.dst,
                 reason=move.reason, context=req.num_tokens, blocks=req.blocks,
                 state="running" if running else "waiting", how=why or "live")
        if not why:
            m.copy = LiveCopy(next(self._mig_ids), req, src, dst)
            # Few blocks (or one round allowed): stop and copy at once, as Llumnix does.
            m.copy.pause_wanted = (req.blocks <= self.cfg.pause_blocks
                                   or self.cfg.max_stages == 1)
            if m.copy.pause_wanted or self.live.send_round(m.copy, now):
                self._advance(m, now)
                return m
            m.copy = None  # nothing to copy after all
        self._recompute(m, src.core.detach(req.req_id, now), dst, now)
        src.wake.set()
        return m

    def rehome(self, inst: ServedInstance, now: float) -> int:
        """`inst` lost its pipeline and its requests wait there for recompute: each goes to
        the least-loaded ready instance whose pool could hold it instead (reason "recovery"),
        so that its client waits for a recompute, not for a stage's restart. Returns how
        many moved."""
        others = [o for o in self.instances if o is not inst and o.ready]
        moved = 0
        for req in list(inst.core.waiting) if others else ():
            if req.req_id in self.active or req.finished:
                continue
            fits = [o for o in others if not pool_misfit(req.prompt, req.max_tokens,
                                                         o.core.block_size,
                                                         o.core.total_blocks)]
            if fits:
                dst = min(fits, key=lambda o: o.core.load)
                self.start(Move(req.req_id, inst.index, dst.index, "recovery"), now)
                moved += 1
        return moved

    def _recompute(self, m: Migration, req: CoreRequest, at: ServedInstance,
                   now: float) -> None:
        """A detached request waits at `at` to be recomputed."""
        req.blocks = 0  # its KV is not carried: adopt queues it to be recomputed
        at.core.adopt(req, now)
        m.dst = at.index
        if m.paused_at is None:
            m.paused_at = now
        if m.running:
            self.metrics.migration_recomputed_tokens += req.num_tokens
        at.wake.set()
        self._carry_out_cancel(m, req)

    def _carry_out_cancel(self, m: Migration, req: CoreRequest) -> None:
        if m.cancel is not None and self.end is not None:
            reason, error = m.cancel
            m.cancel = None
            self.end(req, reason, error)

    # ---- live copies --------------------------------------------------------------------

    def kv_moved(self, msg: KVMoved, now: float) -> None:
        """A stage's answer to a MoveKV round."""
        m = next((m for m in self.active.values()
                  if m.copy is not None and m.copy.mig_id == msg.mig_id), None)
        if m is not None and self.live.answered(m.copy, msg):
            self._advance(m, now)

    def _advance(self, m: Migration, now: float) -> None:
        """Moves a live copy on: the next round, the pause, the commit, or its abort."""
        c, live = m.copy, self.live
        live.overdue(c, now)
        if c.waiting:
            return
        if c.failed:
            self._abort_copy(m, now)
        elif c.paused:
            live.commit(c, now)
            self.metrics.migration_kv_bytes += c.nbytes
            self.metrics.migration_copy.add(now - m.started)
            log.info("migration committed", req_id=m.req_id, src=m.src, dst=m.dst,
                     rounds=c.round, kv_bytes=c.nbytes, seconds=round(now - m.started, 4))
            m.copy = None
            c.dst.wake.set()
            self._carry_out_cancel(m, c.req)
        elif c.pause_wanted or live.next_is_last(c):
            c.pause_wanted = True
            if c.req.inflight == 0 and not c.req.running:  # preempted there meanwhile
                c.failed = "the source preempted it"
                self._abort_copy(m, now)
            elif c.req.inflight == 0:  # between micro-batches: stop it at the source now
                c.paused, c.paused_computed, c.paused_blocks = True, c.req.computed, c.req.blocks
                c.src.core.detach(m.req_id, now)
                m.paused_at = now
                c.src.wake.set()
                if not live.send_round(c, now):  # nothing new since the last round
                    self._advance(m, now)
        elif not live.send_round(c, now):
            self._advance(m, now)

    def _abort_copy(self, m: Migration, now: float) -> None:
        c = m.copy
        m.copy = None
        self.live.release(c)
        self.metrics.migrations_aborted += 1
        log.warning("live migration aborted", req_id=m.req_id, src=m.src, dst=m.dst,
                    round=c.round, paused=c.paused, why=c.failed)
        if not c.req.finished:
            self.stay.add(m.req_id)
        if not c.paused or c.req.finished:  # it never stopped: it goes on at the source
            del self.active[m.req_id]
        else:  # its source KV is gone: recomputed at the source (else the destination)
            self._recompute(m, c.req, c.src if c.src.ready else c.dst, now)

    def pipeline_lost(self, inst: ServedInstance, now: float) -> None:
        """`inst`'s stages restarted: copies to or from it fail."""
        for m in list(self.active.values()):
            if m.copy is not None and inst in (m.copy.src, m.copy.dst):
                self.live.lost(m.copy, inst)
                self._advance(m, now)

    def cancel(self, req: CoreRequest, reason: Finish, error: str) -> bool:
        """A request in no core (its last round in flight) is to end: it ends once adopted.
        False when it is in a core (the caller ends it there)."""
        m = self.active.get(req.req_id)
        if m is None or m.copy is None or not m.copy.paused:
            return False
        m.cancel = (reason, error)
        return True

    def took_token(self, req: CoreRequest, now: float) -> None:
        """A request was given a token (call after `InstanceCore.complete`): its first at the
        destination ends its migration."""
        m = self.active.get(req.req_id)
        if m is not None and m.copy is None and req.instance == m.dst and req.out > m.out:
            del self.active[req.req_id]
            if m.running:
                self.metrics.migration_pause.add(now - m.paused_at)

    def ended(self, req: CoreRequest, now: float) -> None:
        """A request ended (the core's on_finish): a migration it was in ends with it. Its
        last token ends it normally (`Finish.STOP`, `LENGTH`); anything else aborts it."""
        self.stay.discard(req.req_id)
        m = self.active.get(req.req_id)
        if m is None:
            return
        if m.copy is not None:  # it ended at the source while its KV was copied
            m.copy.failed = m.copy.failed or f"the request ended ({req.finish.name.lower()})"
            self._advance(m, now)
            return
        if req.finish in (Finish.STOP, Finish.LENGTH):
            self.took_token(req, now)
            return
        del self.active[req.req_id]
        self.metrics.migrations_aborted += 1
        log.info("migration aborted", req_id=req.req_id, src=m.src, dst=m.dst,
                 finish=req.finish.name.lower())
