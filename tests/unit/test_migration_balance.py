"""Llumnix's balancing within a length group (common/scheduling/migration.py's Balance) and
its combination with the boundary rule, on hand-checked cases."""

from __future__ import annotations

import pytest

from common.scheduling.length_groups import LengthGroups
from common.scheduling.migration import (Balance, Candidate, Combined, InstanceState, Move,
                                         make_planner)


def state(i, load, cands=(), busy=False, free=100):
    """cands: (req_id, context, blocks, running, load)"""
    return InstanceState(i, load, free, [Candidate(*c) for c in cands], busy=busy)


def test_the_most_loaded_sends_its_shortest_running_request_to_the_least_loaded():
    planner = Balance(LengthGroups.single(3))
    moves = planner.plan([state(0, 500, [(1, 300, 19, True, 120), (2, 40, 3, True, 90),
                                         (3, 10, 0, False, 60)]),
                          state(1, 100), state(2, 300)])
    assert moves == [Move(2, 0, 1, "balance")]  # 3 blocks: the cheapest copy; waiting stays


def test_no_move_unless_it_narrows_the_gap():
    planner = Balance(LengthGroups.single(2))
    # moving 150 tokens of load across a gap of 100 would widen it (to 200 the other way)
    assert planner.plan([state(0, 200, [(1, 50, 4, True, 150)]), state(1, 100)]) == []
    assert planner.plan([state(0, 200, [(1, 50, 4, True, 40)]), state(1, 100)]) == [
        Move(1, 0, 1, "balance")]
    # a small gap is left alone with min_gap, and a full destination takes nothing
    assert Balance(LengthGroups.single(2), min_gap=150).plan(
        [state(0, 200, [(1, 50, 4, True, 40)]), state(1, 100)]) == []
    assert planner.plan([state(0, 200, [(1, 50, 4, True, 40)]), state(1, 100, free=3)]) == []


def test_balance_pairs_heaviest_with_lightest_and_stays_within_each_group():
    groups = LengthGroups.parse("0-512:4,512-:2")
    big = [(10 + i, 100, 2 + i, True, 30) for i in range(3)]
    moves = Balance(groups).plan([
        state(0, 900, big), state(1, 10), state(2, 700, [(20, 90, 1, True, 50)]),
        state(3, 300), state(4, 5000, [(30, 900, 60, True, 100)]), state(5, 0)])
    assert sorted(moves, key=lambda m: m.req_id) == [
        Move(10, 0, 1, "balance"), Move(20, 2, 3, "balance"), Move(30, 4, 5, "balance")]


def test_the_boundary_rule_goes_first_and_its_instances_are_busy_for_balance():
    groups = LengthGroups.parse("0-512:2,512-:1")
    planner = make_planner(["balance", "boundary"], groups)
    assert isinstance(planner, Combined) and planner.name == "boundary+balance"
    moves = planner.plan([state(0, 900, [(1, 600, 38, True, 80), (2, 50, 3, True, 20)]),
                          state(1, 100), state(2, 50)])
    assert moves == [Move(1, 0, 2, "boundary")]  # instance 0 is then busy: no balance move
    moves = planner.plan([state(0, 900, [(2, 50, 3, True, 20)]), state(1, 100), state(2, 50)])
    assert moves == [Move(2, 0, 1, "balance")]
    planner.set_groups(LengthGroups.parse("0-40:2,40-:1"))
    assert planner.plan([state(0, 900, [(2, 50, 3, True, 20)]), state(1, 100),
                         state(2, 50)])[0] == Move(2, 0, 2, "boundary")


def test_unknown_planners_are_named():
    assert make_planner([], LengthGroups.single(1)) is None
    with pytest.raises(ValueError, match="unknown migration planner 'llumnix'"):
        make_planner(["llumnix"], LengthGroups.single(1))
