"""Live migration's rounds in the controller (services/controller/live_migration.py and
migration.py) driven without sockets: the stages' MoveKV messages are collected and answered
by hand, so each outcome (commit, a refusal before the pause, a failure in the last round, the
destination's pipeline lost, a cancel while the request is in no core) can be checked for the
request's tokens and both pools' books."""

from __future__ import annotations

from common.instance import Finish
from common.wire.internal_messages import KVMoved, MoveKV
from tests.unit.test_controller_migration import Driver


class LiveDriver(Driver):
    def __init__(self, blocks: int = 100, **cfg):
        self.sent: list[tuple[int, int, MoveKV]] = []
        self.assigned: list[tuple[int, dict]] = []
        self.freed: list[tuple[int, int]] = []
        self.ended: list[tuple[int, Finish]] = []
        super().__init__(blocks=blocks, mode="live", **cfg)
        for inst in self.instances:
            inst.lease = list(range(blocks))
            inst.kv_endpoints = {0: ("127.0.0.1", 1000 + inst.index), 1: ("127.0.0.1", 2000)}
        from services.controller.migration import Migrations
        self.mig = Migrations(self.mig.cfg, self.instances, self.metrics, self.mig.planner,
                              send=lambda inst, s, m: self.sent.append((inst.index, s, m)),
                              assign=lambda inst, g: self.assigned.append((inst.index, g)),
                              free=self._free, end=self._end)

    def _free(self, inst, req_id):
        self.freed.append((inst.index, req_id))

    def _end(self, req, reason, error):
        self.ended.append((req.req_id, reason))
        self.instances[req.instance].core.finish(req, reason, self.now, error)

    def answer(self, error: str = "", only: int | None = None) -> list[MoveKV]:
        """Every side of the rounds sent so far answers (`only`: just that instance)."""
        sent = [x for x in self.sent if only is None or x[0] == only]
        self.sent = [x for x in self.sent if x not in sent]
        for inst, stage, msg in sent:
            self.mig.kv_moved(KVMoved(msg.mig_id, inst, stage, msg.round, 100 * msg.count,
                                      0.01, error), self.now)
        return [m for _, _, m in sent]


def _decode_until_moving(d: LiveDriver, req) -> None:
    while not d.mig.active:
        d.dispatch()
        d.complete_oldest(0)
    assert d.mig.active[req.req_id].copy is not None and req.instance == 0


def test_a_live_move_copies_in_rounds_pauses_for_the_last_and_decodes_on_at_the_destination():
    d = LiveDriver(pause_blocks=1, max_stages=3)
    req = d.add(1, prompt=20, max_tokens=40)
    _decode_until_moving(d, req)
    first = [m for _, _, m in d.sent]
    assert len(first) == 4 and {m.round for m in first} == {1}  # 2 stages x (source, dest)
    out, dst = [m for m in first if m.send], [m for m in first if not m.send]
    assert [(m.first, m.count) for m in out] == [(0, 2), (0, 2)]
    assert dst[0].peer == "127.0.0.1:1000" and dst[1].peer == "127.0.0.1:2000"
    assert dst[0].blocks == dst[0].table and len(dst[0].blocks) == 2
    assert d.instances[1].core.free_blocks == 98  # reserved at the destination
    # It keeps decoding at the source while round 1 is copied.
    for _ in range(20):
        d.dispatch()
        d.complete_oldest(0)
    assert req.instance == 0 and req.out > 10
    d.answer()  # round 2 (blocks filled since) goes out
    assert {m.round for _, _, m in d.sent} == {2}
    d.answer()  # round 3 is the last: paused at its next moment between micro-batches
    d.dispatch()
    d.complete_oldest(0)
    c = d.mig.active[1].copy
    assert c.paused and 1 not in d.instances[0].core.by_id
    assert d.instances[0].core.free_blocks == 100
    last = d.answer()
    assert {m.round for m in last} == {3} and req.instance == 1
    assert req.running and req.computed == req.num_tokens - 1 and d.metrics.migration_kv_bytes
    tokens_before = list(req.output_token_ids)
    d.run()
    assert req.output_token_ids[:len(tokens_before)] == tokens_before
    assert req.output_token_ids == list(range(20, 60)) and req.finish is Finish.LENGTH
    assert d.metrics.migration_recomputed_tokens == 0 and d.metrics.migration_pause.count == 1
    assert d.metrics.migration_copy.count == 1 and not d.mig.active
    d.assert_pools_free()


def test_a_destination_that_refuses_a_round_leaves_the_request_running_at_the_source():
    d = LiveDriver(pause_blocks=0)
    req = d.add(1, prompt=20, max_tokens=12)
    _decode_until_moving(d, req)
    d.answer(error="no room", only=1)
    assert d.mig.active  # the source's sides have not answered: the blocks may be written
    d.answer()
    assert not d.mig.active and d.metrics.migrations_aborted == 1 and req.instance == 0
    assert d.freed == [(1, 1)] and d.instances[1].core.free_blocks == 100
    d.run()
    assert req.output_token_ids == list(range(20, 32)) and req.instance == 0
    d.assert_pools_free()


def test_a_failure_in_the_last_round_falls_back_to_recompute_at_the_source():
    d = LiveDriver(max_stages=1)  # the first round is already the last: paused at once
    req = d.add(1, prompt=20, max_tokens=12)
    while not d.mig.active:
        d.dispatch()
        d.complete_oldest(0)
    d.dispatch()
    d.complete_oldest(0)
    assert d.mig.active[1].copy.paused
    d.answer(error="connection reset")
    assert req.instance == 0 and not req.running and d.metrics.migrations_aborted == 1
    d.run()
    assert req.output_token_ids == list(range(20, 32))
    assert d.metrics.migration_recomputed_tokens == 24 and d.metrics.migration_pause.count == 1
    assert d.freed == [(1, 1)]  # the reserved blocks, before it was recomputed there
    d.assert_pools_free()


def test_the_destination_lost_during_a_copy_aborts_it_and_the_source_goes_on():
    d = LiveDriver(pause_blocks=0)
    req = d.add(1, prompt=20, max_tokens=12)
    _decode_until_moving(d, req)
    d.instances[1].stage_identities.clear()
    d.instances[1].joined.clear()
    d.mig.pipeline_lost(d.instances[1], d.now)
    d.answer(only=0)
    assert not d.mig.active and req.instance == 0 and d.instances[1].core.free_blocks == 100
    d.instances[1].stage_identities.update({0: b"s0", 1: b"s1"})
    d.instances[1].joined.update({0, 1})
    d.run()
    assert req.output_token_ids == list(range(20, 32))
    d.assert_pools_free()


def test_a_cancel_while_the_request_is_in_no_core_ends_it_once_adopted():
    d = LiveDriver(max_stages=1)
    req = d.add(1, prompt=20, max_tokens=12)
    while not d.mig.active:
        d.dispatch()
        d.complete_oldest(0)
    d.dispatch()
    d.complete_oldest(0)
    assert not any(1 in i.core.by_id for i in d.instances)  # in no core
    assert d.mig.cancel(req, Finish.ABORT, "cancelled")
    d.answer()
    assert d.ended == [(1, Finish.ABORT)] and req.finish is Finish.ABORT and not d.mig.active
    d.assert_pools_free()


def test_a_request_that_ends_at_the_source_mid_copy_frees_the_destination_once_answered():
    d = LiveDriver(pause_blocks=0)
    req = d.add(1, prompt=20, max_tokens=6)
    _decode_until_moving(d, req)
    d.run()  # it reaches max_tokens at the source, the copy's round still unanswered
    assert req.finish is Finish.LENGTH and req.instance == 0 and d.mig.active
    assert d.instances[1].core.free_blocks == 98  # a late write could still land there
    d.answer()
    assert not d.mig.active and d.metrics.migrations_aborted == 1 and d.freed == [(1, 1)]
    d.assert_pools_free()


def test_a_round_unanswered_past_twice_the_timeout_is_given_up():
    d = LiveDriver(pause_blocks=0, timeout_s=1.0)
    req = d.add(1, prompt=20, max_tokens=40)
    _decode_until_moving(d, req)
    d.now += 2.5
    d.mig.round(d.now)
    assert not d.mig.active and d.metrics.migrations_aborted == 1
    assert d.instances[1].core.free_blocks == 100 and req.instance == 0
    d.sent.clear()
    d.run()
    assert req.output_token_ids == list(range(20, 60)) and req.instance == 0  # not moved again
    d.assert_pools_free()


def test_a_copy_whose_destination_went_silent_ends_on_the_timer_with_nothing_else_happening():
    """The request ends at the source mid-copy and only the source's side answers (the
    destination's stages are stopped): no micro-batch completes after that to advance the
    copy, so the controller's timer (check_copies) gives it up at its deadline and frees the
    destination's blocks."""
    d = LiveDriver(pause_blocks=0, timeout_s=100.0)
    req = d.add(1, prompt=20, max_tokens=6)
    _decode_until_moving(d, req)
    d.run()  # it reaches max_tokens at the source, the copy's round still unanswered
    assert req.finish is Finish.LENGTH and req.instance == 0 and d.mig.active
    d.answer(only=0)  # the source's side gives up; the destination says nothing
    assert d.mig.active and d.metrics.migrations_aborted == 0
    sent = d.mig.active[1].copy.round_sent
    d.mig.check_copies(sent + 150.0)  # not yet: the round's deadline is twice timeout_s
    assert d.mig.active
    d.mig.check_copies(sent + 201.0)
    assert not d.mig.active and d.metrics.migrations_aborted == 1 and d.freed == [(1, 1)]
    d.assert_pools_free()
