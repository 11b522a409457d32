"""CascadeInfer's length groups: the instances of one model split into groups, each serving a
range of context lengths (prompt plus tokens generated so far). Pure data and lookups, shared
by the router (where an arrival goes), the migration planner (where a request that outgrew
its group goes) and the range dynamic program (which chooses the ranges).

A spec names the ranges and how many instances serve each, in instance order:
``"0-512:2,512-4096:1"`` puts instances 0 and 1 on contexts below 512 tokens and instance 2
on 512 up to 4096; the last range may be open (``"512-:1"``, or ``"512-inf:1"``). Ranges must
start at 0 and touch end to start, so every length belongs to exactly one group.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

UNBOUNDED = 1 << 62
"""The upper bound of an open last range."""


@dataclass(frozen=True, slots=True)
class LengthGroup:
    lo: int
    """Smallest context length this group serves."""
    hi: int
    """First context length it no longer serves (UNBOUNDED for an open last range)."""
    instances: tuple[int, ...]
    """The instance indices serving this range, ascending."""

    def holds(self, length: int) -> bool:
        return self.lo <= length < self.hi


@dataclass(frozen=True, slots=True)
class LengthGroups:
    groups: tuple[LengthGroup, ...]

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("length groups: at least one group is needed")
        if self.groups[0].lo != 0:
            raise ValueError(f"length groups: the first range must start at 0, not "
                             f"{self.groups[0].lo}")
        for a, b in zip(self.groups, self.groups[1:]):
            if a.hi != b.lo:
                raise ValueError(f"length groups: range {a.lo}-{a.hi} must end where the next "
                                 f"starts ({b.lo})")
        for g in self.groups:
            if g.hi <= g.lo:
                raise ValueError(f"length groups: empty range {g.lo}-{g.hi}")
            if not g.instances:
                raise ValueError(f"length groups: range {g.lo}-{g.hi} has no instance")
        seen = [i for g in self.groups for i in g.instances]
        if sorted(seen) != list(range(len(seen))):
            raise ValueError("length groups: every instance must be in exactly one group")

    @classmethod
    def parse(cls, spec: str, num_instances: int | None = None) -> LengthGroups:
        """Groups from a spec such as ``"0-512:2,512-4096:1"`` (instances assigned in order);
        `num_instances`, when given, must equal the instances the spec names."""
        groups, next_instance = [], 0
        for part in (p.strip() for p in spec.split(",")):
            try:
                rng, count_s = part.split(":")
                lo_s, hi_s = rng.split("-")
                lo = int(lo_s)
                hi = UNBOUNDED if hi_s.strip() in ("", "inf") else int(hi_s)
                count = int(count_s)
            except ValueError:
                raise ValueError(f"length groups: {part!r} is not LO-HI:INSTANCES "
                                 f"(for example 0-512:2)") from None
            if count < 1:
                raise ValueError(f"length groups: {part!r} needs at least one instance")
            groups.append(LengthGroup(lo, hi, tuple(range(next_instance,
                                                          next_instance + count))))
            next_instance += count
        result = cls(tuple(groups))
        if num_instances is not None and next_instance != num_instances:
            raise ValueError(f"length groups {spec!r} name {next_instance} instance(s), the "
                             f"deployment has {num_instances}")
        return result

    @classmethod
    def single(cls, num_instances: int) -> LengthGroups:
        """One group over every length: no length specialization."""
        return cls((LengthGroup(0, UNBOUNDED, tuple(range(num_instances))),))

    @property
    def num_instances(self) -> int:
        return sum(len(g.instances) for g in self.groups)

    def group_for(self, length: int) -> int:
        """The index of the group whose range holds `length` (the last one past every range)."""
        starts = [g.lo for g in self.groups]
        return max(0, min(len(self.groups) - 1, bisect.bisect_right(starts, length) - 1))

    def group_of_instance(self, instance: int) -> int:
        for k, g in enumerate(self.groups):
            if instance in g.instances:
                return k
        raise ValueError(f"instance {instance} is in no length group")

    def spec(self) -> str:
        """The spec string that parses back to these groups."""
        return ",".join(f"{g.lo}-{'' if g.hi == UNBOUNDED else g.hi}:{len(g.instances)}"
                        for g in self.groups)
