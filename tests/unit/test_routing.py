"""The router seam (common/scheduling/routing.py), and the simulator routing through it with
its instances split over worker processes as with one."""

from __future__ import annotations

import pytest

from common.scheduling.routing import LeastLoaded, RoundRobin, make_router
from conveyor.sim.cluster import build_cluster
from conveyor.sim.engine import simulate
from conveyor.sim.workload import Workload
from tests.unit.test_instance_core import Cost


def test_least_loaded_takes_the_lightest_ready_instance_lowest_index_on_a_tie():
    r = LeastLoaded()
    assert r.route([30, 10, 10, 40]) == 1
    assert r.route([30, 10, 10, 40], [True, False, True, True]) == 2
    assert r.route([30, 10], [False, False]) == 1  # none ready: by load alone
    assert LeastLoaded.decomposable and LeastLoaded.reads_loads


def test_round_robin_skips_instances_that_are_not_ready():
    r = RoundRobin()
    assert [r.route([0, 0, 0]) for _ in range(4)] == [0, 1, 2, 0]
    assert [r.route([0, 0, 0], [True, False, True]) for _ in range(3)] == [2, 0, 2]


def test_an_unknown_router_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown router 'random'; choose from least-loaded"):
        make_router("random")


@pytest.mark.parametrize("routing", ["least-loaded", "round-robin"])
def test_the_simulator_routes_alike_on_one_worker_and_two(routing):
    cfg = build_cluster({"model": {"shape": "tiny"},
                         "cluster": {"instances": 4, "stages": 2, "routing": routing}})
    wl = Workload([0.003 * i for i in range(40)], [20 + 9 * (i % 7) for i in range(40)],
                  [5 + 4 * (i % 5) for i in range(40)])
    one = simulate(cfg, Cost(), wl, workers=1)
    two = simulate(cfg, Cost(), wl, workers=2)
    placed = [r.instance for r in one.requests]
    assert placed == [r.instance for r in two.requests]
    if routing == "round-robin":
        assert placed == [i % 4 for i in range(40)]
    else:
        assert len(set(placed)) == 4 and placed != [i % 4 for i in range(40)]
