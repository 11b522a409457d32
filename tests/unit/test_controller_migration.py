"""The controller's migration state machine (services/controller/migration.py) driven without
sockets: two served instances with real cores and the fcfs policy, micro-batches completed by
hand, the planner's moves carried out between them. Each sampled token is the sequence's
length at sampling, so a gap or a repeat in a migrated request's output would show."""

from __future__ import annotations

import pytest

from common.config import MigrationConfig
from common.instance import CoreRequest, Finish
from common.scheduling import make_policy
from common.scheduling.length_groups import LengthGroups
from common.scheduling.migration import Move, make_planner
from common.stats import ControllerMetrics
from services.controller.instance import ServedInstance
from services.controller.migration import Migrations

BLOCK = 16


class Driver:
    def __init__(self, groups: str = "0-24:1,24-:1", blocks: int = 100, **cfg):
        self.metrics = ControllerMetrics(started=0.0, num_instances=2)
        self.released: list[tuple[int, int]] = []
        self.instances = [
            ServedInstance.create(i, 2, 2, BLOCK, make_policy("fcfs"), self.metrics,
                                  lambda r: self.released.append((r.instance, r.req_id)),
                                  lambda r: self.mig.ended(r, self.now))
            for i in range(2)]
        for inst in self.instances:
            inst.core.resize_pool(blocks)
            inst.stage_identities.update({0: b"s0", 1: b"s1"})
            inst.joined.update({0, 1})
            inst.pool_ready = True
        self.mig = Migrations(MigrationConfig(enabled=True, **cfg), self.instances,
                              self.metrics, make_planner(["boundary"],
                                                         LengthGroups.parse(groups, 2)))
        self.now = 0.0

    def add(self, rid: int, prompt: int, max_tokens: int, instance: int = 0) -> CoreRequest:
        req = CoreRequest(rid, self.now, prompt, max_tokens, 4096, (),
                          prompt_token_ids=list(range(prompt)))
        self.instances[instance].core.add(req, self.now)
        self.mig.round(self.now)  # as the controller does on a submit
        return req

    def dispatch(self) -> None:
        for inst in self.instances:
            while (plan := inst.core.next_plan(inst.policy, self.now)) is not None:
                inst.core.commit(plan, self.now, inst.policy)

    def complete_oldest(self, index: int) -> list:
        """The last stage's StepDone of the instance's oldest micro-batch, as the controller
        handles it; returns the moves it started."""
        core = self.instances[index].core
        if not core.inflight:
            return []
        self.now += 1.0
        batch = next(iter(core.inflight.values()))
        live = [r for r in batch.sampling if not r.finished]
        core.complete(batch.mb_id, [r.num_tokens for r in batch.sampling], self.now)
        for r in live:
            self.mig.took_token(r, self.now)
        return self.mig.round(self.now)

    def run(self, limit: int = 500) -> None:
        for _ in range(limit):
            self.dispatch()
            if not any(i.core.inflight for i in self.instances):
                return
            for index in (0, 1):
                self.complete_oldest(index)
        raise AssertionError("the workload did not finish")

    def assert_pools_free(self) -> None:
        for inst in self.instances:
            c = inst.core
            assert c.free_blocks == c.total_blocks and not c.by_id and c.num_running == 0
            assert c.load == 0


def test_a_running_request_crossing_its_bound_finishes_at_the_next_group_token_for_token():
    d = Driver()
    req = d.add(1, prompt=20, max_tokens=12)
    d.run()
    # Sampled at lengths 20, 21, ... 31: every token once, in order, across the move.
    assert req.output_token_ids == list(range(20, 32)) and req.finish is Finish.LENGTH
    assert req.instance == 1 and d.metrics.migrations == 1
    assert d.metrics.migrations_waiting == 0 and d.metrics.migration_recomputed_tokens == 24
    assert d.metrics.migration_pause.count == 1 and d.metrics.migration_pause.sum > 0
    assert (0, 1) in d.released and d.released[-1] == (1, 1) and not d.mig.active
    d.assert_pools_free()


def test_a_waiting_request_outside_its_range_moves_on_arrival():
    d = Driver()
    req = d.add(1, prompt=30, max_tokens=3)
    assert req.instance == 1 and list(d.instances[1].core.waiting) == [req]
    assert d.metrics.migrations == d.metrics.migrations_waiting == 1
    d.run()
    assert req.output_token_ids == [30, 31, 32] and not d.mig.active
    assert d.metrics.migration_pause.count == 0 and d.released == [(1, 1)]
    d.assert_pools_free()


def test_a_request_in_flight_is_no_candidate_and_a_stale_move_for_it_is_refused():
    d = Driver()
    req = d.add(1, prompt=30, max_tokens=4, instance=1)
    d.dispatch()
    assert req.inflight == 1
    assert all(not s.candidates for s in d.mig.states())
    d.mig.planner.plan = lambda states: [Move(1, 1, 0, "test")]
    assert d.mig.round(d.now) == [] and d.metrics.migrations_refused == 1
    assert req.instance == 1 and d.metrics.migrations == 0


def test_a_destination_short_of_blocks_refuses_and_the_request_finishes_at_the_source():
    d = Driver(blocks=4)
    big = d.add(1, prompt=40, max_tokens=8, instance=1)  # holds 3 of instance 1's 4 blocks
    small = d.add(2, prompt=20, max_tokens=8)
    d.run()
    assert small.instance == 0 and small.output_token_ids == list(range(20, 28))
    assert big.instance == 1 and d.metrics.migrations == 0
    d.assert_pools_free()
    d.mig.planner.plan = lambda states: [Move(3, 0, 1, "test")]  # the controller's own check
    d.instances[1].core.free_blocks = 1
    d.add(3, prompt=20, max_tokens=8)
    assert d.metrics.migrations_refused >= 1 and d.instances[0].core.by_id[3].instance == 0


def test_an_abort_during_a_migration_aborts_it_and_frees_both_pools():
    d = Driver()
    req = d.add(1, prompt=23, max_tokens=10)
    d.dispatch()
    d.complete_oldest(0)  # its first token: context 24, the bound of group 0
    assert req.instance == 1 and d.mig.active and req.computed == 0
    d.dispatch()  # the destination's re-prefill is in flight
    d.instances[1].core.finish(req, Finish.ABORT, d.now, "cancelled")
    assert d.metrics.migrations_aborted == 1 and not d.mig.active
    d.complete_oldest(1)  # the re-prefill returns: its token is dropped, its blocks freed
    assert req.output_token_ids == [23]
    d.assert_pools_free()


def test_one_migration_at_a_time_per_instance():
    d = Driver(groups="0-24:1,24-:1")
    a, b = d.add(1, prompt=23, max_tokens=6), d.add(2, prompt=23, max_tokens=6)
    d.dispatch()
    d.complete_oldest(0)  # both cross the bound in this micro-batch: only one moves
    assert sorted(r.instance for r in (a, b)) == [0, 1] and len(d.mig.active) == 1
    d.run()
    assert d.metrics.migrations == 2 and a.instance == b.instance == 1
    assert a.output_token_ids == b.output_token_ids == list(range(23, 29))
    d.assert_pools_free()


def test_bad_migration_settings_are_refused_by_name():
    from common.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="migration.planner boundary moves requests between "
                                          "length groups: it needs deployment.routing"):
        load_config(None, {"migration.enabled": True, "deployment.instances": 2})
    with pytest.raises(ConfigError, match="migration.max_per_instance must be >= 1"):
        load_config(None, {"migration.max_per_instance": 0})
    with pytest.raises(ConfigError, match="group_refinement moves the boundaries of length "
                                          "groups: it needs deployment.routing"):
        load_config(None, {"group_refinement.enabled": True, "deployment.instances": 2})
    with pytest.raises(ConfigError, match=r"group_refinement.step must be in \(0, 1\)"):
        load_config(None, {"group_refinement.step": 1.5})
