"""Length groups (CascadeInfer) and the boundary migration planner, on hand-checked cases."""

import pytest

from common.scheduling.length_groups import UNBOUNDED, LengthGroups
from common.scheduling.migration import Candidate, CrossBoundary, InstanceState, Move


def test_parse_assigns_instances_in_order_and_round_trips():
    g = LengthGroups.parse("0-512:2,512-4096:1,4096-:1", num_instances=4)
    assert [x.instances for x in g.groups] == [(0, 1), (2,), (3,)]
    assert g.groups[-1].hi == UNBOUNDED
    assert [g.group_for(n) for n in (0, 511, 512, 4095, 4096, 10**9)] == [0, 0, 1, 1, 2, 2]
    assert g.group_of_instance(2) == 1
    assert LengthGroups.parse(g.spec()) == g


@pytest.mark.parametrize("spec, message", [
    ("10-512:1", "must start at 0"),
    ("0-512:1,600-900:1", "must end where the next starts"),
    ("0-512:0", "at least one instance"),
    ("0-512", "is not LO-HI:INSTANCES"),
    ("0-0:1", "empty range"),
])
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        LengthGroups.parse(spec)


def test_instance_count_must_match_the_deployment():
    with pytest.raises(ValueError, match="name 3 instance"):
        LengthGroups.parse("0-512:2,512-:1", num_instances=2)


def _state(i, load, cands=(), busy=False, free=100):
    return InstanceState(i, load, free, [Candidate(*c) for c in cands], busy=busy)


def test_boundary_moves_the_longest_outgrown_request_to_the_least_loaded_next_instance():
    groups = LengthGroups.parse("0-512:1,512-:2")
    planner = CrossBoundary(groups)
    moves = planner.plan([_state(0, 900, [(7, 600, 38, True), (8, 520, 33, True),
                                          (9, 100, 7, True)]),
                          _state(1, 5000), _state(2, 300)])
    assert moves == [Move(7, 0, 2, "boundary")]


def test_boundary_skips_busy_instances_and_full_destinations():
    groups = LengthGroups.parse("0-512:1,512-:1")
    planner = CrossBoundary(groups)
    assert planner.plan([_state(0, 1, [(1, 700, 44, True)], busy=True), _state(1, 0)]) == []
    assert planner.plan([_state(0, 1, [(1, 700, 44, True)]), _state(1, 0, free=10)]) == []
    assert planner.plan([_state(0, 1, [(1, 300, 19, True)]), _state(1, 0)]) == []
