"""ControllerMetrics: the counters behind `conveyor stats`, and merging those kept apart (the
simulator's worker processes each count a share of the instances)."""

from __future__ import annotations

import pytest

from common.stats import ControllerMetrics


def record(m: ControllerMetrics, instance: int, scale: float) -> None:
    """Everything an instance's share of a run records, at `scale`."""
    m.finished["length"] += 2
    m.finished["abort"] += 1
    m.prompt_tokens += int(100 * scale)
    m.generated_tokens += int(40 * scale)
    m.micro_batches += 3
    m.preemptions += 1
    for stage in range(2):
        m.record_step(instance, stage, 0.5 * scale, 0.1 * scale)
    m.record_batch(int(64 * scale), 4)
    m.record_request({"ttft_s": 0.2 * scale, "tpot_s": 0.05 * scale, "e2e_s": 3 * scale})
    m.pending[instance].update(True, 1.0)
    m.pending[instance].update(False, 1.0 + 10 * scale)


def test_merging_shares_equals_counting_everything_in_one():
    whole = ControllerMetrics(started=0.0, num_instances=2)
    first = ControllerMetrics(started=0.0, num_instances=2)
    second = ControllerMetrics(started=0.0, num_instances=2)
    record(whole, 0, 1.0)
    record(whole, 1, 2.0)
    record(first, 0, 1.0)
    record(second, 1, 2.0)
    merged = ControllerMetrics(started=0.0, num_instances=2)
    merged.merge(first)
    merged.merge(second)
    assert merged.as_dict(100.0) == whole.as_dict(100.0)
    assert merged.pending[1].read(100.0) == pytest.approx(20.0)


def test_merging_refuses_another_cluster_shape():
    with pytest.raises(ValueError, match="2 instances into 1"):
        ControllerMetrics(started=0.0).merge(ControllerMetrics(started=0.0, num_instances=2))
