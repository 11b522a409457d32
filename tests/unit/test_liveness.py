"""The controller's view of whether each stage answers (services/controller/liveness.py), read
from the core's micro-batches in flight (when each was dispatched, how far it came)."""

from common.instance.batch import CoreBatch
from services.controller.liveness import Liveness


def batch(mb_id: int, dispatched: float) -> CoreBatch:
    return CoreBatch(mb_id, [], [], None, 1, 0, 0, 0, 0, dispatched=dispatched)


def test_a_micro_batch_past_the_timeout_names_the_stage_it_waits_on():
    live = Liveness(timeout_s=5.0)
    one, two = batch(1, 100.0), batch(2, 101.0)
    one.stage_reported(0)
    live.answered(0, now=100.5)
    assert live.overdue([one, two], now=104.0) is None
    why = live.overdue([one, two], now=107.0)
    assert why.startswith("stage 1 is overdue: micro-batch 1 has waited 7.0s on it")
    assert "stage 1 has not answered yet" in why
    live.answered(1, now=107.5)  # stage 1 came back: micro-batch 1 left the pipeline
    why = live.overdue([two], now=107.5)  # micro-batch 2 is the oldest, still at stage 0
    assert why.startswith("stage 0 is overdue: micro-batch 2 has waited 6.5s") \
        and "stage 0 last answered 7.0s ago" in why
    assert live.overdue([], now=200.0) is None  # nothing in flight: nothing overdue


def test_a_micro_batch_past_dead_after_names_the_silent_stage_and_how_long():
    live = Liveness(timeout_s=1.0, dead_after_s=3.0)
    one = batch(1, 100.0)
    one.stage_reported(0)
    assert live.silent([one], now=102.9) is None  # overdue, not yet dead
    assert live.silent([one], now=103.5) == (1, 3.5)
    assert Liveness(timeout_s=1.0).silent([one], now=1000.0) is None  # 0: never
    assert live.fresh() == Liveness(1.0, 3.0)  # a new generation: same limits, no answers
