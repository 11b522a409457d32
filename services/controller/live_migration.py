"""Live migration's copy rounds (Llumnix's): the controller's side of moving a running
request's KV from the source instance's stages to the destination's while it keeps decoding.

Round 1 copies every block the request holds; each later round copies the blocks filled since
(from the first block that was not full when the previous round was sent). Once at most
`migration.pause_blocks` are left to copy, or after round `migration.max_stages` - 1, the
request is paused: at its next moment between micro-batches it leaves the source's core
(detach: its source blocks are freed, after the source stages took their copy, which they do
in message order) and the last round copies the rest. When every side of the last round has
reported, the destination adopts it with its KV (the P stages commit together: nothing is
dispatched there until each holds its blocks) and it decodes on there.

Failures: a round that fails (a stage refuses, the pair group cannot be built, a peer died,
no answer within twice `timeout_s`) aborts the copy. Before the pause the request never
stopped: it goes on at the source untouched. After the pause (its source blocks are freed)
it is recomputed at the source, or at the destination if the source's pipeline is gone; it
is not moved again. The destination's reserved blocks are freed
once nothing can still write them: when every live side of the round in flight has answered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from common.config import MigrationConfig
from common.instance import CoreRequest
from common.wire.internal_messages import KVMoved, MoveKV
from services.controller.instance import ServedInstance


@dataclass
class LiveCopy:
    mig_id: int
    req: CoreRequest
    src: ServedInstance
    dst: ServedInstance
    round: int = 0
    computed_sent: int = 0
    """The source's computed tokens when the round in flight was sent (their KV is in it)."""
    dst_blocks: list[int] = field(default_factory=list)
    waiting: set[tuple[int, int]] = field(default_factory=set)
    """(instance, stage) sides of the round in flight that have not answered."""
    round_sent: float = 0.0
    nbytes: int = 0
    pause_wanted: bool = False
    paused: bool = False
    paused_computed: int = 0
    paused_blocks: int = 0
    failed: str = ""


class LiveRounds:
    """Sends rounds and reads their answers; no I/O: `send(inst, stage, msg)` queues a message
    to a stage, `assign(inst, {req_id: blocks})` and `free(inst, req_id)` keep the kv-cache
    manager's books of the destination's blocks."""

    def __init__(self, cfg: MigrationConfig, send: Callable, assign: Callable, free: Callable):
        self.cfg = cfg
        self.send, self.assign, self.free = send, assign, free

    @staticmethod
    def cannot_copy(src: ServedInstance, dst: ServedInstance, req: CoreRequest) -> str:
        """Why this request cannot be copied live now ("" when it can)."""
        if len(src.kv_endpoints) < src.core.depth or len(dst.kv_endpoints) < dst.core.depth:
            return "a stage has no migration endpoint"
        if req.blocks > len(dst.lease) or req.blocks > dst.core.free_blocks:
            return f"the destination has too few free blocks for {req.blocks}"
        return ""

    def send_round(self, c: LiveCopy, now: float) -> bool:
        """Sends the next round; False when there is nothing left to copy."""
        req, bs = c.req, c.src.core.block_size
        first = c.computed_sent // bs if c.round else 0
        held = c.paused_blocks if c.paused else req.blocks
        if held <= first:
            return False
        extra = held - len(c.dst_blocks)
        if extra > 0:  # the destination's blocks for those filled since
            if extra > len(c.dst.lease) or extra > c.dst.core.free_blocks:
                c.failed = f"the destination ran out of free blocks ({extra} more needed)"
                return False
            granted = c.dst.draw([(req.req_id, extra)])
            c.dst.core.reserve(extra)
            self.assign(c.dst, granted)
            c.dst_blocks += granted[req.req_id]
        c.round += 1
        c.computed_sent = c.paused_computed if c.paused else req.computed
        c.round_sent = now
        c.waiting = {(i.index, s) for i in (c.src, c.dst) for s in range(i.core.depth)}
        for s in range(c.src.core.depth):
            self.send(c.src, s, MoveKV(c.mig_id, req.req_id, c.round, True, first, held - first))
            host, port = c.src.kv_endpoints[s]
            self.send(c.dst, s, MoveKV(c.mig_id, req.req_id, c.round, False, first,
                                       held - first, f"{host}:{port}", c.dst_blocks[first:held],
                                       list(c.dst_blocks)))
        return True

    def answered(self, c: LiveCopy, msg: KVMoved) -> bool:
        """Takes one side's answer; True once the round in flight is over (or failed)."""
        if msg.round != c.round or (msg.instance, msg.stage) not in c.waiting:
            return False
        c.waiting.discard((msg.instance, msg.stage))
        if msg.error and not c.failed:
            c.failed = f"instance {msg.instance} stage {msg.stage}: {msg.error}"
        if msg.instance == c.dst.index:
            c.nbytes += msg.nbytes
        return not c.waiting

    def next_is_last(self, c: LiveCopy) -> bool:
        """After a round: pause for the last one (few blocks left, or the rounds spent)?"""
        left = c.req.blocks - c.computed_sent // c.src.core.block_size
        return left <= self.cfg.pause_blocks or c.round >= self.cfg.max_stages - 1

    def lost(self, c: LiveCopy, inst: ServedInstance) -> None:
        """`inst`'s stages are gone: none of its sides will answer."""
        c.failed = c.failed or f"instance {inst.index} lost its pipeline"
        c.waiting = {w for w in c.waiting if w[0] != inst.index}

    def overdue(self, c: LiveCopy, now: float) -> bool:
        """The round in flight has gone unanswered past twice the stages' own timeout (by
        then their copy has given up, so the blocks are safe to free)."""
        if c.waiting and now - c.round_sent > 2 * self.cfg.timeout_s:
            c.failed = c.failed or f"no answer in {2 * self.cfg.timeout_s:g} s"
            c.waiting.clear()
            return True
        return False

    def release(self, c: LiveCopy) -> None:
        """The copy is over without a commit: the destination's blocks go back."""
        if c.dst_blocks:
            self.free(c.dst, c.req.req_id)
            c.dst.core.unreserve(len(c.dst_blocks))
            c.dst_blocks = []

    def commit(self, c: LiveCopy, now: float) -> None:
        """Every side of the last round answered: the destination takes the request, its KV
        in the reserved blocks."""
        c.dst.core.unreserve(len(c.dst_blocks))
        c.req.computed, c.req.blocks = c.paused_computed, len(c.dst_blocks)
        c.dst.core.adopt(c.req, now)
