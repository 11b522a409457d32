"""Which requests move between instances: the migration planner seam. Pure, as the router
and the policies are; the controller and the simulator ask it on each scheduling round and
carry its moves out (the controller with a live KV copy between the instances' stages, the
simulator by charging the copy's cost). A planner sees each instance's published load and
its movable requests, and returns moves; it never sees true output lengths.

CascadeInfer moves a request whose context outgrew its group's range to the next group
(`CrossBoundary`); Llumnix's balancing within a group is a planner of its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from common.scheduling.length_groups import LengthGroups


@dataclass(frozen=True, slots=True)
class Candidate:
    """A request an instance could give away."""

    req_id: int
    context: int
    """Its tokens so far: prompt plus generated."""
    blocks: int
    """KV blocks it holds (0 while waiting: moving it copies nothing)."""
    running: bool
    """True once it holds KV (it has been scheduled); False while it waits."""


@dataclass(frozen=True, slots=True)
class InstanceState:
    index: int
    load: int
    """Tokens still to process for the requests placed there (InstanceCore.load)."""
    free_blocks: int
    candidates: Sequence[Candidate]
    busy: bool = False
    """A migration to or from it is in progress (one at a time per instance by default)."""
    ready: bool = True


@dataclass(frozen=True, slots=True)
class Move:
    req_id: int
    src: int
    dst: int
    reason: str
    """Why: "boundary" (outgrew its group) or "balance" (evening load within a group)."""


class MigrationPlanner(ABC):
    name: str = ""

    @abstractmethod
    def plan(self, instances: Sequence[InstanceState]) -> list[Move]:
        """Moves to start now, at most one per source and per destination."""


class CrossBoundary(MigrationPlanner):
    """A request whose context reached its group's upper bound moves to the least-loaded ready
    instance of the group that holds its context now (one per idle source and destination;
    the longest context first, as it is the furthest out of range)."""

    name = "boundary"

    def __init__(self, groups: LengthGroups):
        self.groups = groups

    def plan(self, instances: Sequence[InstanceState]) -> list[Move]:
        by_index = {s.index: s for s in instances}
        taken: set[int] = {s.index for s in instances if s.busy}
        moves = []
        for s in instances:
            if s.index in taken:
                continue
            hi = self.groups.groups[self.groups.group_of_instance(s.index)].hi
            out = [c for c in s.candidates if c.context >= hi]
            if not out:
                continue
            c = max(out, key=lambda c: c.context)
            target = self.groups.groups[self.groups.group_for(c.context)]
            dests = [by_index[i] for i in target.instances
                     if i in by_index and i not in taken and by_index[i].ready
                     and by_index[i].free_blocks >= c.blocks]
            if not dests:
                continue
            dst = min(dests, key=lambda d: (d.load, d.index))
            moves.append(Move(c.req_id, s.index, dst.index, "boundary"))
            taken.update((s.index, dst.index))
        return moves
