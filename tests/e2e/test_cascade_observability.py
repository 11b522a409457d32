"""What CascadeInfer's machinery does, as a real deployment reports it (issue 14 item 5):
2 instances of one stage, length groups 0-64 and 64- refined every 0.2 s, requests moved
across the boundary live. `conveyor bench`'s report, `conveyor stats` and the Prometheus page
each show the migrations (count by reason, KV bytes, pause and copy times), each instance's
decode length spread and the groups over time, and agree with one another."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conveyor.cli.app import app
from tests.e2e.test_cli import run_cli
from tests.e2e.test_metrics import _scrape

SETS = ("deployment.routing=\"length-groups\"", "deployment.groups=\"0-64:1,64-:1\"",
        "predictor.mode=\"off\"", "migration.enabled=true", "group_refinement.enabled=true",
        "group_refinement.interval_s=0.2", "kvcache.num_blocks=128")


def _samples(page: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))):
            s.value for f in text_string_to_metric_families(page) for s in f.samples}


@pytest.mark.parametrize("deployment", [{"stages": 1, "instances": 2, "sets": SETS}],
                         indirect=True)
def test_migrations_length_spread_and_groups_reach_bench_stats_and_metrics(deployment, tmp_path):
    result_file = tmp_path / "run.json"
    # Prompts of 20-60 tokens (all in group 0 at first) generating 24: they cross the
    # boundary mid-decode, and the refinement moves it (all the work lands below it at first).
    out = CliRunner().invoke(app, [
        "bench", "--address", deployment.address, "--dataset", "random", "--num-prompts", "12",
        "--random-input-len", "40", "--random-output-len", "24", "--random-range-ratio", "0.5",
        "--request-rate", "inf", "--seed", "3", "--request-timeout", "120",
        "--result-file", str(result_file), "--no-progress", "--no-plots"])
    assert out.exit_code == 0, out.output + (deployment.log_tail() if out.exception else "")
    assert "Migrations (by reason):" in out.output and "Length groups (at the end):" in out.output
    assert "Length spread, instance 0 (tokens):" in out.output
    summary = json.loads(result_file.read_text())["summary"]
    assert summary["completed"] == 12
    deployment.wait_kv_free(timeout_s=15)

    cli = run_cli("stats", "--address", deployment.address)
    assert cli.returncode == 0, cli.stderr
    stats = json.loads(cli.stdout)
    # migrations, by the one planner that ran
    assert stats["migrations"] >= 1
    assert stats["migration_reasons"] == {"boundary": stats["migrations"]}
    assert stats["migration_kv_bytes"] > 0 and stats["migration_copy_s"]["count"] >= 1
    assert stats["migration_pause_s"]["count"] >= 1
    # the groups over time: configured at start, then moved by the refinement
    history = stats["length_groups"]
    assert history[0]["groups"] == "0-64:1,64-:1" and history[0]["t_s"] >= 0
    assert stats["length_group_changes"] == len(history) - 1 >= 1
    assert [h["t_s"] for h in history] == sorted(h["t_s"] for h in history)
    # decode length spread: concurrent requests of different lengths shared micro-batches
    spread = stats["length_spread"]
    assert len(spread) == 2 and sum(s["count"] for s in spread) >= 1
    assert all(s["sum"] >= 0 for s in spread)

    # bench's window saw all of it (the warm-up request before it may have moved too)
    ctl = summary["controller"]
    assert 1 <= ctl["migrations"]["migrations"] <= stats["migrations"]
    assert ctl["length_groups"]["at_end"] == history[-1]["groups"]
    assert any("length_spread" in i for i in ctl["instances"])

    page = _samples(_scrape(deployment.http_url + "/metrics"))
    assert page[("conveyor_migrations_by_reason_total", (("reason", "boundary"),))] == \
        stats["migrations"]
    assert page[("conveyor_migration_kv_bytes_total", ())] == stats["migration_kv_bytes"]
    assert page[("conveyor_migration_pause_seconds_count", ())] == \
        stats["migration_pause_s"]["count"]
    assert page[("conveyor_migration_copy_seconds_sum", ())] == pytest.approx(
        stats["migration_copy_s"]["sum"])
    assert page[("conveyor_length_group_changes_total", ())] == stats["length_group_changes"]
    bound = history[-1]["groups"].split(",")[0].split(":")[0].split("-")[1]
    assert page[("conveyor_length_group_upper_bound_tokens", (("group", "0"),))] == int(bound)
    assert page[("conveyor_length_group_upper_bound_tokens", (("group", "1"),))] == float("inf")
    for i in range(2):
        assert page[("conveyor_decode_length_spread_tokens_count", (("instance", str(i)),))] \
            == spread[i]["count"]
