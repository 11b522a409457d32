"""Length groups refined while serving: the range DP re-run on recent traffic on a period or
when the length distribution drifted, and between runs each boundary nudged toward balanced
load per instance, with hysteresis.

Local refinement (`nudge`): for each pair of neighbouring groups, the mean load per instance
of each: the work (prompt plus cap, in tokens) routed to it since the last refinement — what
the current boundaries send where. (The published backlog, InstanceCore.load, would keep a
boundary moving long after it went far enough: the backlog of the old boundaries drains
slowly.) When the lower group carries
more than (1 + hysteresis) times the upper one's, their boundary moves down by `step` of the
lower group's width (the lower group gives the upper one its longest lengths), and up when the
upper one is the heavier; within the band nothing moves. A boundary that reverses (it moved
one way, the load now pushes it back: the balance lies within one step, and noise tips it)
doubles its own band, up to 8 times the setting, and a move on in the same way sets it back: so
a boundary settles instead of stepping back and forth, and still follows a real shift. A
boundary stays at least `align` tokens inside its neighbours.

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


MAX_BAND_GROWTH = 8.0
"""A boundary's hysteresis grows at most to this many times the setting."""


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


def nudge(groups: LengthGroups, loads: Sequence[float], settings: RefineSettings,
          bands: Sequence[float] | None = None) -> LengthGroups:
    """One local refinement step of every boundary (module docstring); `loads` per instance:
    the work routed to each since the last step; `bands` each boundary's hysteresis (None:
    settings.hysteresis for all)."""
    gs = groups.groups
    per = [sum(loads[i] for i in g.instances) / len(g.instances) for g in gs]
    bounds = [g.lo for g in gs[1:]]
    a = settings.align
    for k, b in enumerate(bounds):
        h = settings.hysteresis if bands is None else bands[k]
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
        self._reset_bands()

    def _reset_bands(self) -> None:
        n = len(self.groups.groups) - 1
        self.bands = [self.settings.hysteresis] * n
        """Each boundary's hysteresis: doubled (up to MAX_BAND_GROWTH x) when it reverses,
        back to the setting when it moves on the same way: a boundary that steps back and
        forth over noise (one aligned step either side of the balance) stops."""
        self.last_move = [0] * n

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
            new = nudge(self.groups, loads, s, self.bands)
            if new != self.groups:
                self.nudges += 1
                self._moved(new)
        if new != self.groups:
            if len(new.groups) != len(self.groups.groups):
                self.groups = new
                self._reset_bands()
            self.groups = new
        return self.groups

    def _moved(self, new: LengthGroups) -> None:
        for k, (old, now) in enumerate(zip(self.groups.groups[1:], new.groups[1:])):
            step = (now.lo > old.lo) - (now.lo < old.lo)
            if not step:
                continue
            base = self.settings.hysteresis
            if step == -self.last_move[k]:
                self.bands[k] = min(max(2 * self.bands[k], base or 0.05),
                                    MAX_BAND_GROWTH * max(base, 0.05))
            else:
                self.bands[k] = base
            self.last_move[k] = step


class LiveGroups:
    """The groups a deployment or a simulation routes by while serving, kept current by a
    GroupRefiner. The driver reports the work it routes (`routed`: prompt plus cap, per
    instance) and the requests that end (`finished`), and calls `tick(now)` whenever it likes
    (a completion, an arrival): every `interval_s` the refiner looks at the work routed since
    its last look, and a change of groups goes to each follower's `set_groups` (the router,
    the migration planner) and to `on_change(now, groups)` (the metrics). No arrivals since
    the last look, no evidence: the groups stay."""

    def __init__(self, refiner: GroupRefiner, followers: Sequence, interval_s: float,
                 on_change: Callable[[float, LengthGroups], None] | None = None,
                 start: float = 0.0):
        if interval_s <= 0:
            raise ValueError(f"group refinement: interval_s must be > 0, got {interval_s}")
        self.refiner = refiner
        self.followers = [f for f in followers if f is not None]
        self.interval_s = interval_s
        self.on_change = on_change
        self.next_look = start + interval_s
        self.routed_work = [0] * refiner.groups.num_instances

    @property
    def groups(self) -> LengthGroups:
        return self.refiner.groups

    def routed(self, instance: int, work: int) -> None:
        self.routed_work[instance] += work

    def finished(self, now: float, prompt: int, output: int) -> None:
        if output:
            self.refiner.finished(now, prompt, output)

    def tick(self, now: float) -> bool:
        """Refines the groups if a look is due; True when they changed."""
        if now < self.next_look:
            return False
        self.next_look = now + self.interval_s
        routed, self.routed_work = self.routed_work, [0] * len(self.routed_work)
        before = self.refiner.groups
        if not any(routed) or self.refiner.refine(now, routed) == before:
            return False
        for follower in self.followers:
            follower.set_groups(self.refiner.groups)
        if self.on_change is not None:
            self.on_change(now, self.refiner.groups)
        return True
