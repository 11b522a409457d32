"""Length groups refined while serving: the range DP re-run on recent traffic on a period or
when the length distribution drifted, and between runs each boundary nudged toward balanced
load per instance, with hysteresis.

Local refinement (`nudge`): for each pair of neighbouring groups, the mean published load per
instance of each (InstanceCore.load, tokens still to process). When the lower group carries
more than (1 + hysteresis) times the upper one's, their boundary moves down by `step` of the
lower group's width (the lower group gives the upper one its longest lengths), and up when the
upper one is the heavier; within the band nothing moves, so equal loads, or noise, never make
the boundary oscillate. A boundary stays at least `align` tokens inside its neighbours.

Drift (`drifted`): the Kolmogorov-Smirnov distance between the prompt lengths of the recent
window and those the DP last ran on; above `drift` the DP runs again (so does it every
`replan_s`, when set).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from common.scheduling.length_groups import UNBOUNDED, LengthGroup, LengthGroups


@dataclass(frozen=True)
class RefineSettings:
    hysteresis: float = 0.2
    step: float = 0.1
    align: int = 16
    drift: float = 0.2
    replan_s: float = 0.0
    """Re-run the DP this often (seconds; 0: only on drift)."""
    window: int = 2000
    """Recent finished requests kept as the DP's sample."""
    min_sample: int = 200
    """No DP re-run on fewer requests than this."""

    def __post_init__(self) -> None:
        if self.hysteresis < 0 or not 0 < self.step < 1 or self.align < 1 \
                or not 0 < self.drift <= 1 or self.replan_s < 0 or self.window < 1:
            raise ValueError(f"group refinement: invalid settings {self}")


def ks_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the CDFs."""
    x, y = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    if not len(x) or not len(y):
        return 0.0
    grid = np.concatenate([x, y])
    fx = np.searchsorted(x, grid, side="right") / len(x)
    fy = np.searchsorted(y, grid, side="right") / len(y)
    return float(np.abs(fx - fy).max())


def nudge(groups: LengthGroups, loads: Sequence[float], settings: RefineSettings
          ) -> LengthGroups:
    """One local refinement step of every boundary (module docstring); `loads` per instance."""
    gs = groups.groups
    if len(gs) < 1:
        return groups
    per = [sum(loads[i] for i in g.instances) / len(g.instances) for g in gs]
    bounds = [g.lo for g in gs[1:]]
    h, a = settings.hysteresis, settings.align
    for k, b in enumerate(bounds):
        lo_edge = bounds[k - 1] if k else 0  # already moved: boundaries never cross
        hi_edge = gs[k + 1].hi if gs[k + 1].hi < UNBOUNDED else math.inf
        width = b - lo_edge
        if per[k] > (1 + h) * per[k + 1]:
            b = b - max(a, int(settings.step * width))
        elif per[k + 1] > (1 + h) * per[k]:
            b = b + max(a, int(settings.step * width))
        b = int(round(b / a) * a)
        b = max(lo_edge + a, min(b, hi_edge - a if hi_edge < math.inf else b))
        bounds[k] = b
    edges = [0, *bounds, gs[-1].hi]
    return LengthGroups(tuple(LengthGroup(edges[k], edges[k + 1], g.instances)
                              for k, g in enumerate(gs)))


class GroupRefiner:
    """Keeps the groups of a deployment or simulation current: `finished` records each
    request that ends (its prompt and output), `refine(now, loads)` returns the groups to use
    from now on (the same object when nothing changed). `solve(prompts, outputs, span_s)` runs
    the range DP on a sample (None: never re-run, local refinement only)."""

    def __init__(self, groups: LengthGroups, settings: RefineSettings = RefineSettings(),
                 solve: Callable[[list[int], list[int], float], LengthGroups] | None = None):
        self.groups = groups
        self.settings = settings
        self.solve = solve
        self.recent: deque[tuple[float, int, int]] = deque(maxlen=settings.window)
        self.planned_on: list[int] = []
        """Prompt lengths the DP last ran on (the drift reference)."""
        self.last_plan = 0.0
        self.replans = 0
        self.nudges = 0

    def finished(self, now: float, prompt: int, output: int) -> None:
        self.recent.append((now, prompt, output))

    def drifted(self) -> bool:
        if not self.planned_on:
            return len(self.recent) >= self.settings.min_sample
        return ks_distance([p for _, p, _ in self.recent], self.planned_on) > self.settings.drift

    def refine(self, now: float, loads: Sequence[float]) -> LengthGroups:
        s = self.settings
        if self.solve is not None and len(self.recent) >= s.min_sample and (
                self.drifted() or (s.replan_s and now - self.last_plan >= s.replan_s)):
            span = max(self.recent[-1][0] - self.recent[0][0], 1e-9)
            prompts = [p for _, p, _ in self.recent]
            new = self.solve(prompts, [o for _, _, o in self.recent], span)
            self.planned_on, self.last_plan = prompts, now
            self.replans += 1
        else:
            new = nudge(self.groups, loads, s)
            if new != self.groups:
                self.nudges += 1
        if new != self.groups:
            self.groups = new
        return self.groups
