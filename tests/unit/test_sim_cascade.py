"""CascadeInfer in the simulator (conveyor/sim/cascade.py): requests that outgrow their group
migrate with Llumnix's staged copy and a pause for the last blocks, aborts leave them at the
source, balancing without groups, the DP's groups, the report; and the roofline's mixed-length
penalty."""

from __future__ import annotations

import msgspec
import pytest

from common.costmodel import StepCost
from common.costmodel.roofline import RooflineCostModel
from common.model.shape import NAMED_SHAPES
from conveyor.sim.cluster import build_cluster
from conveyor.sim.engine import simulate
from conveyor.sim.report import final_stats, format_summary, summarize
from conveyor.sim.workload import Workload
from tests.unit.test_instance_core import Cost


def cluster(routing="length-groups", groups="0-64:1,64-:1", instances=2, **cascade):
    return build_cluster({"model": {"shape": "tiny", "max_model_len": 4096},
                          "kvcache": {"num_blocks": 1024},
                          "cluster": {"instances": instances, "stages": 2, "routing": routing,
                                      "groups": groups},
                          "link": {"bandwidth_gbps": 1.0}, "cascade": cascade})


def test_requests_crossing_the_boundary_migrate_once_and_finish_at_the_next_group():
    cfg = cluster(migration=["boundary"], plan_interval_ms=5)
    wl = Workload([0.05 * i for i in range(12)], [40] * 12, [60] * 12)
    result = simulate(cfg, Cost(), wl)
    stats = final_stats(result)  # counted as the controller counts them
    assert stats.migrations == 12 and stats.migration_reasons == {"boundary": 12}
    assert stats.migrations_waiting == 0 and stats.migrations_aborted == 0
    assert all(r.out == 60 and not r.error and r.instance == 1 for r in result.requests)
    # every request carried at least its 64-token context: 4 blocks of every stage's KV
    per_block = sum(cfg.shape.kv_bytes_per_block(16, s.num_layers, 4) for s in cfg.stages)
    assert stats.migration_kv_bytes >= 12 * 4 * per_block
    assert stats.migration_copy_s.count == 12 and stats.migration_copy_s.sum > 0
    # The pause, the stop at the source to the first token at the destination, is one of the
    # request's gaps between tokens.
    pause = stats.migration_pause_s
    assert pause.count == 12
    assert 0 < pause.sum / 12 <= max(max(r.itl) for r in result.requests)
    assert [g.groups for g in stats.length_groups] == ["0-64:1,64-:1"]
    summary = summarize(result)
    assert summary["simulator"]["cascade"]["groups"] == "0-64:1,64-:1"
    assert summary["controller"]["migrations"]["migration_reasons"] == {"boundary": 12}
    text = format_summary(summary)
    assert "Migrations (by reason):" in text and "12 (boundary 12)" in text
    assert "Length groups (at the end):" in text


def test_a_request_that_ends_during_its_copy_stays_at_the_source():
    # crosses 64 at its 5th token and ends at its 6th; the copy over a slow link is longer
    cfg = cluster(migration=["boundary"], migration_bandwidth_gbps=1e-4, plan_interval_ms=1)
    result = simulate(cfg, Cost(), Workload([0.0], [60], [6]))
    stats = final_stats(result)
    assert stats.migrations == stats.migrations_aborted == 1
    assert stats.migration_kv_bytes == 0 and stats.migration_pause_s.count == 0
    (r,) = result.requests
    assert r.instance == 0 and r.out == 6 and not r.error


def test_without_groups_llumnix_balancing_evens_the_load():
    cfg = cluster(routing="round-robin", groups="", instances=2, migration=["balance"])
    # round-robin puts every long request on instance 0
    prompts = [400 if i % 2 == 0 else 20 for i in range(20)]
    outputs = [200 if i % 2 == 0 else 5 for i in range(20)]
    result = simulate(cfg, Cost(), Workload([0.001 * i for i in range(20)], prompts, outputs))
    assert final_stats(result).migration_reasons["balance"] > 0
    assert {r.instance for r, p in zip(result.requests, prompts) if p == 400} == {0, 1}
    assert all(r.out == o for r, o in zip(result.requests, outputs))


def test_auto_groups_come_from_the_dp_and_the_run_is_reproducible():
    cfg = cluster(groups="auto", instances=4, migration=["boundary", "balance"])
    prompts = [30 + (i * 37) % 50 if i % 3 else 900 + (i * 53) % 300 for i in range(90)]
    outputs = [20 + (i * 13) % 60 for i in range(90)]
    wl = Workload([0.002 * i for i in range(90)], prompts, outputs)
    a, b = simulate(cfg, Cost(), wl), simulate(cfg, Cost(), wl)
    assert a.cascade == b.cascade
    assert msgspec.to_builtins(final_stats(a)) == msgspec.to_builtins(final_stats(b))
    assert [r.instance for r in a.requests] == [r.instance for r in b.requests]
    assert len(a.cascade["groups"].split(",")) >= 1
    spreads = [i["length_spread"] for i in summarize(a)["simulator"]["instances"]]
    assert all(s is None or s >= 0 for s in spreads)


def test_groups_keep_each_instance_s_lengths_close():
    prompts = [20 if i % 2 else 1500 for i in range(40)]
    wl = Workload([0.001 * i for i in range(40)], prompts, [30] * 40)
    mixed = simulate(cluster(routing="least-loaded", groups=""), Cost(), wl)
    grouped = simulate(cluster(groups="0-512:1,512-:1"), Cost(), wl)
    spread = lambda res: max(i["length_spread"] or 0 for i in res.instances)  # noqa: E731
    assert spread(grouped) < 100 < spread(mixed)
    assert [r.instance for r in grouped.requests] == [0 if p == 20 else 1 for p in prompts]


def test_migration_is_refused_on_several_workers():
    with pytest.raises(ValueError, match="simulate them with one worker"):
        simulate(cluster(migration=["boundary"]), Cost(), Workload([0.0, 0.1], [5, 5], [5, 5]),
                 workers=2)


def test_the_roofline_charges_mixed_lengths_by_the_penalty():
    shape = NAMED_SHAPES["llama3-8b"]
    plain = RooflineCostModel(shape, "h100")
    mixed = RooflineCostModel(shape, "h100", mixed_length_penalty=2.1)
    assert mixed.reads_longest_context and not plain.reads_longest_context
    assert mixed.mixed_factor(500, 500) == 1.0 and mixed.mixed_factor(500, None) == 1.0
    assert mixed.mixed_factor(500, 1000) == pytest.approx(1.55)  # 1 + 1.1 * (1 - 1/2)
    step = StepCost(0, 64, 500.0, 64, 32, False, False, 1000.0)
    extra = 64 * 500 * shape.kv_size * 2 * 2 * 0.55 * 32  # the decodes' K/V reads, x 0.55 more
    assert mixed.breakdown(step).bytes - plain.breakdown(step).bytes == pytest.approx(extra)
    assert plain.stage_step_s(step) == plain.stage_step_s(
        StepCost(0, 64, 500.0, 64, 32, False, False, None))
    with pytest.raises(ValueError, match="mixed_length_penalty must be >= 1"):
        RooflineCostModel(shape, "h100", mixed_length_penalty=0.5)


def test_simulate_takes_routing_and_groups_on_the_command_line(tmp_path):
    import json

    from typer.testing import CliRunner

    from conveyor.cli.app import app

    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"arrival_s": 0.05 * i, "prompt_len": 40,
                                         "output_len": 60}) + "\n" for i in range(6)))
    cluster = tmp_path / "c.toml"
    cluster.write_text('[model]\nshape = "tiny"\n[cluster]\ninstances = 2\nstages = 2\n'
                       '[kvcache]\nnum_blocks = 1024\n[link]\nbandwidth_gbps = 1\n'
                       '[cascade]\nmigration = ["boundary"]\nplan_interval_ms = 5\n')
    args = ["simulate", "--config", str(cluster), "--device", "h100", "--workload", "trace",
            "--trace", str(trace), "--result-dir", str(tmp_path), "--no-plots",
            "--no-progress", "--routing", "length-groups"]
    ok = CliRunner().invoke(app, [*args, "--groups", "0-64:1,64-:1"])
    assert ok.exit_code == 0, ok.output
    assert "Length groups (at the end):" in ok.output and "6 (boundary 6)" in ok.output
    bad = CliRunner().invoke(app, [*args, "--groups", "0-64:1,64-:2"])
    assert bad.exit_code == 1 and "name 3 instance(s), the deployment has 2" in bad.output


def test_serve_s_routing_shortcuts_reach_the_deployment_config():
    from conveyor.cli.deploy_cmd import build_config

    cfg = build_config(None, [], routing="length-groups", groups="0-512:1", instances=None)
    assert cfg.deployment.routing == "length-groups" and cfg.deployment.groups == "0-512:1"


def test_refinement_moves_the_boundary_to_the_traffic_and_settles():
    cfg = cluster(groups="0-512:1,512-:1", refine=True, refine_interval_s=0.05,
                  plan_interval_ms=10)
    n = 1500  # 3 s of prompts of 60-99 tokens: all in the lower group at first
    prompts = [60 + (i * 7) % 40 for i in range(n)]
    result = simulate(cfg, Cost(), Workload([0.002 * i for i in range(n)], prompts, [40] * n))
    changes = result.metrics.group_history
    bounds = [int(spec.split(":")[0].split("-")[1]) for _, spec in changes]
    assert bounds[-1] in (80, 96)  # where the routed work splits evenly, within a step
    assert bounds[:bounds.index(min(bounds)) + 1] == sorted(bounds[:bounds.index(min(bounds))
                                                                  + 1], reverse=True)
    assert changes[-1][0] < 1.5  # settled: no change over the last half of the run
    assert result.cascade["refinements"]["nudges"] == len(bounds) - 1
