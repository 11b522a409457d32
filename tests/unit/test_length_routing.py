"""CascadeInfer's router (common/scheduling/length_routing.py): by range, then the less loaded
of two drawn in the group, seeded; its configuration in a deployment and a cluster file, with
the errors a bad one gets; and the core's detach/adopt that migration moves requests with."""

from __future__ import annotations

import pytest

from common.config import ConfigError, load_config
from common.instance import CoreRequest, InstanceCore
from common.scheduling.length_groups import LengthGroups
from common.scheduling.length_routing import LengthGroupRouter
from common.scheduling.routing import LeastLoaded, RoundRobin, arrival_length, make_router
from common.scheduling.types import MicroBatchPlan, ScheduledChunk
from common.stats import ControllerMetrics
from conveyor.sim.cluster import build_cluster
from conveyor.sim.cluster_file import ClusterError


def test_an_arrival_goes_to_the_group_holding_its_length_and_its_less_loaded_instance():
    r = make_router("length-groups", LengthGroups.parse("0-512:2,512-4096:1,4096-:1"))
    assert isinstance(r, LengthGroupRouter) and r.reads_length
    loads = [50, 10, 999, 0]
    assert r.route(loads, length=100) == 1       # group 0, the lighter of 0 and 1
    assert r.route(loads, length=511) == 1
    assert r.route(loads, length=512) == 2       # alone in its group, however loaded
    assert r.route(loads, length=10**6) == 3
    assert r.route(loads, [False, True, True, True], length=0) == 1
    assert r.route(loads, [True, False, True, True], length=0) == 0  # the ready one


def test_power_of_two_choices_is_seeded_and_picks_the_lighter_of_its_draws():
    groups = LengthGroups.parse("0-:8")
    loads = [80, 70, 60, 50, 40, 30, 20, 10]
    picks = [LengthGroupRouter(groups, seed=3).route(loads, length=5) for _ in range(3)]
    assert len(set(picks)) == 1  # the same seed, the same first pick
    r = LengthGroupRouter(groups, seed=3)
    many = [r.route(loads, length=5) for _ in range(400)]
    assert 0 not in many  # the heaviest loses every draw it is in
    assert many.count(7) > many.count(1) > 0  # lighter instances win more draws
    one = LengthGroupRouter(groups, seed=0, choices=8)
    assert one.route(loads, length=5) == 7  # d = n: least loaded


def test_the_groups_can_be_replaced_but_not_resized():
    r = LengthGroupRouter(LengthGroups.parse("0-512:1,512-:1"))
    r.set_groups(LengthGroups.parse("0-100:1,100-:1"))
    assert r.route([0, 0], length=200) == 1
    with pytest.raises(ValueError, match="name 3 instance"):
        r.set_groups(LengthGroups.parse("0-100:1,100-:2"))
    with pytest.raises(ValueError, match="3 loads for 2 instances"):
        r.route([0, 0, 0], length=1)


def test_the_length_is_the_prompt_plus_the_prediction_and_old_routers_ignore_it():
    assert arrival_length(300, None, 64) == 300 and arrival_length(300, 250, 1000) == 550
    assert arrival_length(300, 250, 16) == 316  # never past the client's cap
    assert LeastLoaded().route([5, 1, 3], length=10**6) == 1
    assert RoundRobin().route([5, 1, 3], None, 7) == 0
    with pytest.raises(ValueError, match="needs length groups"):
        make_router("length-groups")
    with pytest.raises(ValueError, match="choose from least-loaded, round-robin, length-groups"):
        make_router("random")


@pytest.mark.parametrize("overrides, message", [
    ({"deployment.routing": "length-groups"}, "needs deployment.groups"),
    ({"deployment.groups": "0-512:1"}, "needs deployment.routing = length-groups"),
    ({"deployment.routing": "length-groups", "deployment.instances": 2,
      "deployment.groups": "0-512:2,512-:1"}, "name 3 instance"),
    ({"deployment.routing": "length-groups", "deployment.groups": "0-x:1"},
     "is not LO-HI:INSTANCES"),
    ({"deployment.routing": "length-groups", "deployment.groups": "auto"},
     "needs a cost model"),
])
def test_a_bad_deployment_groups_setting_names_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_deployment_with_length_groups_parses_them():
    cfg = load_config(None, {"deployment.routing": "length-groups", "deployment.instances": 3,
                             "deployment.groups": "0-512:2,512-:1"})
    assert cfg.deployment.length_groups() == LengthGroups.parse("0-512:2,512-:1")
    assert load_config(None, {}).deployment.length_groups() is None


@pytest.mark.parametrize("cluster, cascade, message", [
    ({"routing": "length-groups"}, {}, "needs cluster.groups"),
    ({"groups": "0-1:1"}, {}, "needs cluster.routing = length-groups"),
    ({"routing": "length-groups", "groups": "0-512:1,512-:2", "instances": 2}, {},
     "name 3 instance"),
    ({}, {"migration": ["boundary"]}, "boundary needs length groups"),
    ({}, {"migration_stages": 0}, "migration_stages must be >= 1"),
])
def test_a_bad_cluster_cascade_setting_names_the_problem(cluster, cascade, message):
    with pytest.raises(ClusterError, match=message):
        build_cluster({"model": {"shape": "tiny"}, "cluster": cluster, "cascade": cascade})


def _core(blocks=100):
    return InstanceCore(0, 2, 2, 16, blocks, ControllerMetrics(started=0.0, num_instances=2))


def test_detach_and_adopt_move_a_running_request_with_its_kv_and_load():
    src, dst = _core(), _core()
    dst.index = 1
    r = CoreRequest(7, 0.0, 40, 10, 4096)
    src.add(r, 0.0)
    b = src.commit(MicroBatchPlan((ScheduledChunk(7, 40),)), 0.0)
    with pytest.raises(ValueError, match="in flight"):
        src.detach(7, 0.5)
    src.complete(b.mb_id, [5], 1.0)
    load = src.load
    moved = src.detach(7, 1.0)
    assert moved is r and moved.blocks == 3 and moved.computed == 40 and moved.out == 1
    assert src.free_blocks == 100 and src.load == 0 and not src.by_id and not src.ready
    assert src.num_running == 0
    dst.adopt(moved, 1.0)
    assert r.instance == 1 and dst.free_blocks == 97 and dst.load == load and r.running
    assert dst.snapshot(1.0).ready[0].is_decode  # it decodes on at the destination
    b = dst.commit(MicroBatchPlan((ScheduledChunk(7, 1),)), 1.0)
    dst.complete(b.mb_id, [5], 2.0)
    assert r.out == 2 and r.computed == 41


def test_a_waiting_request_moves_without_kv_and_a_full_pool_refuses_one():
    src, dst, full = _core(), _core(), _core(blocks=2)
    w = CoreRequest(1, 0.0, 40, 10, 4096)
    src.add(w, 0.0)
    dst.adopt(src.detach(1, 0.0), 0.0)
    assert list(dst.waiting) == [w] and not src.waiting and dst.load == 50
    r = CoreRequest(2, 0.0, 40, 10, 4096)
    dst.add(r, 0.0)
    b = dst.commit(MicroBatchPlan((ScheduledChunk(2, 40),)), 0.0)
    dst.complete(b.mb_id, [5], 1.0)
    with pytest.raises(ValueError, match="brings 3 KV blocks, instance 0 has 2 free"):
        full.adopt(dst.detach(2, 1.0), 1.0)
    with pytest.raises(ValueError, match="not live"):
        dst.detach(99, 1.0)
