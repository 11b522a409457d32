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
from dataclasses import dataclass, replace

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
    load: int = 0
    """What it adds to its instance's load (tokens still to process): what moving it moves."""


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
    """Why: "boundary" (outgrew its group), "balance" (evening load within a group) or
    "recovery" (its instance lost its pipeline: services/controller/migration.py)."""


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


class Balance(MigrationPlanner):
    """Llumnix's balancing within a group: the most-loaded instance sends its shortest running
    request (the fewest KV blocks: the cheapest copy) to the least-loaded one of the same
    group when that narrows the gap between them, i.e. 0 < request load < gap; the second
    most loaded to the second least, and so on. A gap under `min_gap` tokens is left alone
    (moving costs a copy and a pause; a small imbalance evens out by itself). Without length
    groups (`LengthGroups.single`) this is Llumnix's balancing over every instance."""

    name = "balance"

    def __init__(self, groups: LengthGroups, min_gap: int = 0):
        if min_gap < 0:
            raise ValueError(f"balance planner: min_gap must be >= 0, got {min_gap}")
        self.groups = groups
        self.min_gap = min_gap

    def plan(self, instances: Sequence[InstanceState]) -> list[Move]:
        moves = []
        by_group: dict[int, list[InstanceState]] = {}
        for s in instances:
            if not s.busy and s.ready:
                by_group.setdefault(self.groups.group_of_instance(s.index), []).append(s)
        for members in by_group.values():
            members.sort(key=lambda s: (s.load, s.index))
            lo, hi = 0, len(members) - 1
            while lo < hi:
                dst, src = members[lo], members[hi]
                gap = src.load - dst.load
                if gap <= self.min_gap or gap <= 0:
                    break
                fits = [c for c in src.candidates if c.running and 0 < c.load < gap
                        and c.blocks <= dst.free_blocks]
                if fits:
                    c = min(fits, key=lambda c: (c.blocks, c.context, c.req_id))
                    moves.append(Move(c.req_id, src.index, dst.index, "balance"))
                lo, hi = lo + 1, hi - 1
        return moves


class Combined(MigrationPlanner):
    """Planners in order (CrossBoundary before Balance: a request out of its range matters more
    than an even load); an instance a move already uses is busy for the later ones."""

    def __init__(self, planners: Sequence[MigrationPlanner]):
        self.planners = list(planners)
        self.name = "+".join(p.name for p in self.planners)

    def plan(self, instances: Sequence[InstanceState]) -> list[Move]:
        moves: list[Move] = []
        states = list(instances)
        for planner in self.planners:
            new = planner.plan(states)
            moves += new
            used = {i for m in new for i in (m.src, m.dst)}
            states = [replace(s, busy=True) if s.index in used else s for s in states]
        return moves

    def set_groups(self, groups: LengthGroups) -> None:
        for p in self.planners:
            p.groups = groups


PLANNERS = ("boundary", "balance")


def make_planner(names: Sequence[str], groups: LengthGroups, min_gap: int = 0
                 ) -> Combined | None:
    """The planners named (boundary, balance), combined in that order; None for none."""
    unknown = [n for n in names if n not in PLANNERS]
    if unknown:
        raise ValueError(f"unknown migration planner {unknown[0]!r}; choose from "
                         f"{', '.join(PLANNERS)}")
    planners: list[MigrationPlanner] = []
    if "boundary" in names:
        planners.append(CrossBoundary(groups))
    if "balance" in names:
        planners.append(Balance(groups, min_gap))
    return Combined(planners) if planners else None
