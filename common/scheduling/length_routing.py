"""CascadeInfer's router: an arrival goes to the length group whose range holds its length
(routing.arrival_length: the prompt, plus the predicted output once predicted), and within the
group to the less loaded of `choices` instances drawn at random (the power of two choices over
published loads: no central view of every instance is needed, and a stale or equal load does
not herd every arrival onto one instance). The draws come from a generator seeded once, so a
simulation is reproducible.

The groups can be replaced while serving (`set_groups`: the range DP re-ran, or the refinement
moved a boundary); requests already placed stay where they are.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from common.scheduling.length_groups import LengthGroups
from common.scheduling.routing import Router


class LengthGroupRouter(Router):
    name = "length-groups"
    reads_length = True

    def __init__(self, groups: LengthGroups, seed: int = 0, choices: int = 2):
        if choices < 1:
            raise ValueError(f"length-groups router: choices must be >= 1, got {choices}")
        self.groups = groups
        self.choices = choices
        self._rng = random.Random(seed)

    def set_groups(self, groups: LengthGroups) -> None:
        if groups.num_instances != self.groups.num_instances:
            raise ValueError(f"length groups name {groups.num_instances} instance(s), the "
                             f"router serves {self.groups.num_instances}")
        self.groups = groups

    def route(self, loads: Sequence[int], ready: Sequence[bool] | None = None,
              length: int | None = None) -> int:
        if len(loads) != self.groups.num_instances:
            raise ValueError(f"length-groups router: {len(loads)} loads for "
                             f"{self.groups.num_instances} instances (it routes over all of "
                             f"them at once)")
        group = self.groups.groups[self.groups.group_for(length or 0)]
        members = list(group.instances)
        if ready is not None:
            up = [i for i in members if ready[i]]
            if up:
                members = up
            elif any(ready):  # the whole group is down: the nearest ready instance serves
                members = [min((i for i, r in enumerate(ready) if r),
                               key=lambda i: (abs(self.groups.group_of_instance(i)
                                                  - self.groups.groups.index(group)), loads[i]))]
        if len(members) > self.choices:
            members = self._rng.sample(members, self.choices)
        return min(members, key=lambda i: (loads[i], i))
