"""The range DP (common/scheduling/range_dp.py) on hand-solved cases and against brute force,
and the refinement between its runs (group_refinement.py) converging on a shifted
distribution."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from common.scheduling.group_refinement import (GroupRefiner, LiveGroups, RefineSettings,
                                                ks_distance, nudge)
from common.scheduling.length_groups import LengthGroup, LengthGroups
from common.scheduling.range_dp import (DPSettings, LengthSample, expected_latency,
                                        group_cost, solve)


def by_longest(prefill, decode, context, longest):
    """A round of 10 ms plus 10 us per token of the longest context, whatever the load."""
    return 0.01 + 1e-5 * longest


def test_two_length_classes_get_a_group_each_hand_solved():
    # Half the requests decode contexts 10..19, half 1000..1009; one prefill round each.
    sample = LengthSample([10, 1000] * 50, [10, 10] * 50, rate=1e-6,
                          settings=DPSettings(grid=8, longest_quantile=1.0))
    result = solve(sample, 2, by_longest)
    lo, hi = result.groups.groups
    assert len(result.groups.groups) == 2 and lo.instances == (0,) and hi.instances == (1,)
    assert 20 <= lo.hi <= 1000
    # each group: 5 decodes + 0.5 prefill rounds per request at its own longest context
    assert result.expected_s == pytest.approx(5.5 * (0.01 + 1e-5 * 19)
                                              + 5.5 * (0.01 + 1e-5 * 1009))
    # one group for both: 11 rounds per request, every one at the longest context
    assert expected_latency(sample, LengthGroups.single(2), by_longest) == pytest.approx(
        11 * (0.01 + 1e-5 * 1009))


def test_a_boundary_every_request_crosses_costs_its_migration_so_one_group_wins():
    sample = LengthSample([100] * 40, [50] * 40, rate=1e-6, settings=DPSettings(grid=4))
    result = solve(sample, 3, by_longest, migration_s=lambda x: 1.0)
    assert result.groups == LengthGroups.single(3)


def loaded(prefill, decode, context, longest):
    """A round that grows with its batch and its context: load matters."""
    return 0.005 + 2e-5 * decode + 1e-8 * decode * longest + 1e-6 * prefill


def compositions(n, k):
    for cut in itertools.combinations(range(1, n), k - 1):
        edges = (0, *cut, n)
        yield [b - a for a, b in zip(edges, edges[1:])]


def test_the_dp_finds_what_brute_force_over_the_grid_finds():
    rng = np.random.default_rng(1)
    prompts = np.concatenate([rng.integers(10, 200, 60), rng.integers(800, 3000, 30)])
    outputs = rng.integers(20, 400, 90)
    sample = LengthSample(prompts, outputs, rate=40.0,
                          settings=DPSettings(grid=5, max_groups=3, chunk_tokens=512))
    move = lambda x: 1e-5 * x  # noqa: E731
    result = solve(sample, 4, loaded, move)
    grid = sample.grid()
    best = math.inf
    for k in (1, 2, 3):
        for bounds in itertools.combinations(grid, k - 1):
            for counts in compositions(4, k):
                edges = [0, *bounds, 1 << 62]
                first, gs = 0, []
                for j, n in enumerate(counts):
                    gs.append(LengthGroup(edges[j], edges[j + 1], tuple(range(first, first + n))))
                    first += n
                best = min(best, expected_latency(sample, LengthGroups(tuple(gs)), loaded, move))
    assert result.expected_s == pytest.approx(best, rel=1e-9)
    assert expected_latency(sample, result.groups, loaded, move) == pytest.approx(
        result.expected_s, rel=1e-9)


def test_an_overloaded_group_costs_more_the_more_it_is_overloaded():
    settings = DPSettings(max_batch=8)
    sample = LengthSample([100] * 10, [100] * 10, rate=1e4, settings=settings)
    stats = sample.stats(0, math.inf)
    total = stats.decode + stats.prefill
    one, four = (group_cost(stats, n, sample.rate, loaded, settings, total) for n in (1, 4))
    assert one > four > settings.overload_s  # both overloaded, one instance far worse
    assert math.isfinite(solve(sample, 4, loaded).expected_s)


def test_bad_samples_and_settings_are_refused():
    with pytest.raises(ValueError, match="matching, non-empty"):
        LengthSample([], [], 1.0)
    with pytest.raises(ValueError, match="rate must be > 0"):
        LengthSample([1], [1], 0.0)
    with pytest.raises(ValueError, match="invalid settings"):
        DPSettings(grid=0)


# ---- refinement ---------------------------------------------------------------------------------

def test_a_heavier_lower_group_gives_its_longest_lengths_to_the_next_and_the_band_holds():
    s = RefineSettings(hysteresis=0.2, step=0.1, align=16)
    groups = LengthGroups.parse("0-512:2,512-:1")
    moved = nudge(groups, [100, 100, 10], s)
    assert moved.spec() == "0-464:2,464-:1"  # 512 - 51, rounded to 16
    assert nudge(groups, [10, 10, 100], s).spec() == "0-560:2,560-:1"
    assert nudge(groups, [100, 100, 95], s) == groups  # inside the band: no move


def group_loads(groups, prompts, outputs):
    """Published load per instance if each request sat in the group holding its prompt."""
    loads = [0.0] * groups.num_instances
    for g in groups.groups:
        inside = (prompts >= g.lo) & (prompts < g.hi)
        per = float((prompts[inside] + outputs[inside]).sum()) / len(g.instances)
        for i in g.instances:
            loads[i] = per
    return loads


def test_refinement_converges_after_the_distribution_shifts():
    rng = np.random.default_rng(0)
    s = RefineSettings(hysteresis=0.2, step=0.1, align=16)
    groups = LengthGroups.parse("0-512:1,512-:1")  # balanced for prompts 0..1024
    prompts = rng.integers(1000, 3000, 2000)  # traffic moved to longer prompts
    outputs = rng.integers(10, 200, 2000)
    history = []
    for _ in range(300):
        groups = nudge(groups, group_loads(groups, prompts, outputs), s)
        history.append(groups.groups[0].hi)
    assert len(set(history[-50:])) == 1  # settled
    lo, hi = group_loads(groups, prompts, outputs)
    assert max(lo, hi) <= 1.2 * min(lo, hi)  # within the hysteresis band
    assert 1500 < history[-1] < 2500


def test_the_dp_reruns_when_the_prompts_drift():
    calls = []

    def resolve(prompts, outputs, span):
        calls.append(len(prompts))
        return LengthGroups.parse("0-2000:1,2000-:1")

    r = GroupRefiner(LengthGroups.parse("0-512:1,512-:1"),
                     RefineSettings(min_sample=10, window=50, drift=0.3), resolve)
    for i in range(20):
        r.finished(i * 0.1, 100 + i, 50)
    assert r.refine(2.0, [0, 0]).spec() == "0-2000:1,2000-:1" and r.replans == 1
    for i in range(20):  # the same kind of traffic: no drift, no rerun
        r.finished(2 + i * 0.1, 100 + i, 50)
    r.refine(4.0, [0, 0])
    assert r.replans == 1
    for i in range(50):  # much longer prompts
        r.finished(4 + i * 0.1, 3000 + i, 50)
    assert ks_distance([p for _, p, _ in r.recent], r.planned_on) == 1.0
    r.refine(9.0, [0, 0])
    assert r.replans == 2 and calls == [20, 50]


def test_a_boundary_that_reverses_widens_its_band_and_a_move_on_resets_it():
    r = GroupRefiner(LengthGroups.parse("0-512:1,512-:1"), RefineSettings(hysteresis=0.2))
    assert r.refine(0.0, [100, 10]).spec() == "0-464:1,464-:1"
    assert r.refine(1.0, [10, 100]).spec() == "0-512:1,512-:1"  # back: the band doubles
    assert r.bands == [pytest.approx(0.4)]
    assert r.refine(2.0, [130, 100]).spec() == "0-512:1,512-:1"  # 1.3 < 1.4: holds
    assert r.refine(3.0, [10, 100]).spec() == "0-560:1,560-:1"  # on the same way: reset
    assert r.bands == [pytest.approx(0.2)] and r.nudges == 3


class _Follower:
    groups = None

    def set_groups(self, groups: LengthGroups) -> None:
        self.groups = groups


def test_live_groups_look_on_their_interval_and_tell_their_followers():
    follower, changes = _Follower(), []
    live = LiveGroups(GroupRefiner(LengthGroups.parse("0-512:1,512-:1"), RefineSettings()),
                      [follower, None], 1.0, lambda t, g: changes.append((t, g.spec())),
                      start=0.0)
    live.routed(0, 1000)
    assert not live.tick(0.5)  # not due yet
    # all the work below 512: the boundary comes down a tenth of 512, to a block (16)
    assert live.tick(1.0)
    assert changes == [(1.0, "0-464:1,464-:1")] and follower.groups.spec() == "0-464:1,464-:1"
    assert live.groups == follower.groups
    assert not live.tick(2.5)  # nothing routed since: no evidence, no move
    live.routed(0, 100)
    live.routed(1, 110)
    assert not live.tick(3.5) and len(changes) == 1  # within the band
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        LiveGroups(GroupRefiner(LengthGroups.parse("0-:1")), [], 0.0)
