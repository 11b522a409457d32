"""The controller's statistics: the accumulators behind `conveyor stats`, merging those kept
apart (the simulator's worker processes each count a share of the instances), the typed
snapshot's window (`since`, what `conveyor bench` reports) and its Prometheus page."""

from __future__ import annotations

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.stats import (GROUP_HISTORY, ControllerMetrics, ControllerStats, GroupChange,
                          IngressStats, InstanceStats)
from common.wire import decode, encode
from common.wire.internal_messages import StatusReply
from services.ingress.prometheus import render


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
    m.record_spread(instance, 4, int(400 * scale), int(300 * scale))  # 200 x scale
    m.migrations += 1
    m.migration_reasons["boundary" if instance == 0 else "balance"] += 1
    m.migration_copy.add(0.1 * scale)
    m.record_request({"queue_s": 0.05 * scale, "ttft_s": 0.2 * scale, "tpot_s": 0.05 * scale,
                      "e2e_s": 3 * scale}, int(100 * scale), int(40 * scale))
    m.record_slo("interactive", scale < 1.5)
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
    assert merged.snapshot(100.0) == whole.snapshot(100.0)
    assert merged.pending[1].read(100.0) == pytest.approx(20.0)


def test_merging_refuses_another_cluster_shape():
    with pytest.raises(ValueError, match="2 instances into 1"):
        ControllerMetrics(started=0.0).merge(ControllerMetrics(started=0.0, num_instances=2))


def test_a_window_is_the_difference_of_two_snapshots():
    m = ControllerMetrics(started=0.0)
    record(m, 0, 1.0)
    before = m.snapshot(20.0)
    record(m, 0, 2.0)
    window = m.snapshot(50.0).since(before)
    assert (window.prompt_tokens, window.generated_tokens, window.micro_batches) == (200, 80, 3)
    assert window.finished == {"length": 2, "abort": 1}
    assert window.uptime_s == 30.0
    (s0, s1) = window.stages
    assert (s0.steps, s0.busy_s, s0.pending_s) == (1, 1.0, 20.0)
    assert s0.bubble_ratio == pytest.approx(19 / 20)
    assert window.batch_tokens.prefill.mean_std() == (128.0, 0.0)
    ttft = window.latency["ttft_s"]
    assert ttft.count == 1 and ttft.sum == pytest.approx(0.4) and sum(ttft.counts) == 1
    # Prefill: from first scheduling to first token; decode: from there to the last token.
    assert window.latency["prefill_s"].sum == pytest.approx(0.3)
    assert window.latency["decode_s"].sum == pytest.approx(5.6)
    assert window.lengths["generation"].sum == 80
    assert window.slo["interactive"].met == 0 and window.slo["interactive"].missed == 1


def test_the_snapshot_crosses_the_wire_typed_and_reads_back_from_the_sdk_map():
    m = ControllerMetrics(started=0.0)
    record(m, 0, 1.0)
    stats = m.snapshot(5.0, model="m", policy="throttle", pipeline_depth=2,
                       instances=[InstanceStats(instance=0, kv_total_blocks=10)])
    reply = decode(encode(StatusReply(7, True, "ready", stats)))
    assert reply.stats == stats
    assert ControllerStats.from_builtins(stats.to_builtins()) == stats
    with pytest.raises(msgspec.ValidationError, match="prompt_tokens"):
        ControllerStats.from_builtins({"prompt_tokens": "many"})


def test_the_prometheus_page_renders_the_snapshot():
    m = ControllerMetrics(started=0.0)
    record(m, 0, 1.0)
    stats = m.snapshot(5.0, instances=[InstanceStats(instance=0, waiting=3,
                                                     kv_utilization=0.25)],
                       ingress=IngressStats(rejected={"overloaded": 4}, disconnects=2))
    families = {f.name: f for f in text_string_to_metric_families(render(stats, "smol").decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    model = (("model_name", "smol"),)
    assert samples[("conveyor_num_requests_waiting", (("instance", "0"), *model))] == 3
    assert samples[("conveyor_kv_cache_usage_ratio", (("instance", "0"), *model))] == 0.25
    assert samples[("conveyor_generation_tokens_total", model)] == 40
    assert samples[("conveyor_request_success_total",
                    (("finished_reason", "length"), *model))] == 2
    assert samples[("conveyor_request_rejected_total", (*model, ("reason", "overloaded")))] == 4
    assert samples[("conveyor_request_disconnected_total", model)] == 2
    assert samples[("conveyor_stage_busy_seconds_total",
                    (("instance", "0"), *model, ("stage", "1")))] == 0.5
    for name in ("conveyor_time_to_first_token_seconds", "conveyor_request_queue_time_seconds",
                 "conveyor_request_prefill_time_seconds", "conveyor_request_decode_time_seconds",
                 "conveyor_request_prompt_tokens", "conveyor_request_generation_tokens"):
        assert families[name].type == "histogram"
        assert samples[(f"{name}_count", model)] == 1
        assert samples[(f"{name}_bucket", (("le", "+Inf"), *model))] == 1


def test_length_spread_migrations_and_groups_over_time_in_the_window_and_on_the_page():
    m = ControllerMetrics(started=10.0, num_instances=2)
    m.record_groups(10.0, "0-64:1,64-:1")  # at start
    before = m.snapshot(11.0)
    m.record_spread(0, 3, 30, 20)    # longest 20, mean 10
    m.record_spread(1, 1, 500, 500)  # one decode: nothing mixed
    m.record_spread(1, 2, 600, 500)  # longest 500, mean 300
    m.migrations += 3
    m.migration_reasons.update({"boundary": 2, "balance": 1})
    m.migration_pause.add(0.25)
    m.record_groups(15.0, "0-80:1,80-:1")  # the refinement moved the boundary
    after = m.snapshot(20.0)
    window = after.since(before)
    assert after.length_groups == [GroupChange(t_s=0.0, groups="0-64:1,64-:1"),
                                   GroupChange(t_s=5.0, groups="0-80:1,80-:1")]
    assert window.length_group_changes == after.length_group_changes == 1
    assert [(s.count, s.sum) for s in window.length_spread] == [(1, 10.0), (1, 200.0)]
    assert window.migration_reasons == {"boundary": 2, "balance": 1}
    page = render(after, "smol").decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(page) for s in f.samples}
    model = (("model_name", "smol"),)
    assert samples[("conveyor_length_group_upper_bound_tokens", (("group", "0"), *model))] == 80
    assert samples[("conveyor_length_group_upper_bound_tokens",
                    (("group", "1"), *model))] == float("inf")
    assert samples[("conveyor_length_group_instances", (("group", "1"), *model))] == 1
    assert samples[("conveyor_length_group_changes_total", model)] == 1
    assert samples[("conveyor_decode_length_spread_tokens_sum", (("instance", "1"), *model))] \
        == 200
    assert samples[("conveyor_decode_length_spread_tokens_count",
                    (("instance", "1"), *model))] == 1
    assert samples[("conveyor_migrations_by_reason_total", (*model, ("reason", "balance")))] == 1
    assert samples[("conveyor_migration_pause_seconds_sum", model)] == 0.25
    for k in range(2 * GROUP_HISTORY):  # a long run keeps the latest changes, counts all
        m.record_groups(20.0 + k, f"0-{96 + 16 * k}:1,{96 + 16 * k}-:1")
    latest = m.snapshot(500.0)
    assert len(latest.length_groups) == GROUP_HISTORY
    assert latest.length_group_changes == 1 + 2 * GROUP_HISTORY
    assert latest.length_groups[-1].groups.startswith(f"0-{96 + 16 * (2 * GROUP_HISTORY - 1)}:")
