"""The controller's view of whether each stage answers (services/controller/liveness.py)."""

from services.controller.liveness import Liveness


def test_a_micro_batch_past_the_timeout_names_the_stage_it_waits_on():
    live = Liveness(timeout_s=5.0)
    live.dispatched(1, now=100.0)
    live.dispatched(2, now=101.0)
    live.stage_done(1, 0, last_stage=False, now=100.5)
    assert live.overdue(now=104.0) is None
    why = live.overdue(now=107.0)
    assert why.startswith("stage 1 is overdue: micro-batch 1 has waited 7.0s on it")
    assert "stage 1 has not answered yet" in why
    live.stage_done(1, 1, last_stage=True, now=107.5)  # stage 1 came back
    why = live.overdue(now=107.5)  # micro-batch 2 is now the oldest, still at stage 0
    assert why.startswith("stage 0 is overdue: micro-batch 2 has waited 6.5s") \
        and "stage 0 last answered 7.0s ago" in why
    live.stage_done(2, 0, last_stage=False, now=107.6)
    live.stage_done(2, 1, last_stage=True, now=107.7)
    assert live.overdue(now=200.0) is None  # nothing in flight: nothing overdue
