"""`conveyor bench` against a real 2-stage deployment: every request completes with exactly
the output length it asked for, and the result files have the documented shape."""

from __future__ import annotations

import json

import pytest

from typer.testing import CliRunner

from common.log import read_json_events
from conveyor.cli.app import app


def test_bench_random_dataset_end_to_end(deployment, tmp_path):
    result_file = tmp_path / "run.json"
    out = CliRunner().invoke(app, [
        "bench", "--address", deployment.address, "--dataset", "random", "--num-prompts", "8",
        "--random-input-len", "24", "--random-output-len", "8", "--random-range-ratio", "0.25",
        "--request-rate", "inf", "--num-warmups", "1", "--seed", "5", "--slo", "e2e=120",
        "--slo-classes", "interactive,batch",
        "--stats-interval", "0.2", "--request-timeout", "60", "--result-file", str(result_file),
        "--no-progress"])
    assert out.exit_code == 0, out.output + (deployment.log_tail() if out.exception else "")
    assert "Serving Benchmark Result" in out.output and "Mean TTFT (ms):" in out.output

    data = json.loads(result_file.read_text())
    summary = data["summary"]
    assert {"completed", "failed", "duration_s", "request_throughput", "output_throughput",
            "total_token_throughput", "ttft", "tpot", "itl", "e2e", "goodput",
            "controller"} <= summary.keys()
    assert summary["completed"] == 8 and summary["failed"] == 0
    assert summary["goodput"]["requests"] == 8

    requests = data["requests"]
    assert len(requests) == 8
    for r in requests:
        assert r["error"] is None
        assert 18 <= r["prompt_len"] <= 30 and r["prompt_tokens"] == r["prompt_len"]
        assert 6 <= r["expected_output_len"] <= 10
        assert r["output_tokens"] == r["expected_output_len"]  # ignore_eos: exact lengths
        assert r["finish_reason"] == "length"
        assert 0 < r["ttft_s"] <= r["e2e_s"]
        assert len(r["itl_s"]) == r["output_tokens"] - 1  # one gap per token after the first
        assert abs(r["ttft_s"] + sum(r["itl_s"]) - r["e2e_s"]) < 0.5
    assert summary["total_output_tokens"] == sum(r["expected_output_len"] for r in requests)
    assert summary["duration_s"] >= max(r["e2e_s"] for r in requests)

    # each request carried one class; the controller counted each class's attainment
    by_class = summary["by_slo_class"]
    assert set(by_class) <= {"interactive", "batch"}
    assert sum(c["completed"] for c in by_class.values()) == 8
    ctl = summary["controller"]
    assert {k: v["met"] + v["missed"] for k, v in ctl["slo"].items()} == \
        {k: c["completed"] for k, c in by_class.items()}
    assert ctl["policy"] == data["health"]["policy"]
    assert ctl["counters"]["generated_tokens"] == summary["total_output_tokens"]
    assert len(ctl["stages"]) == data["health"]["stages"]
    for stage in ctl["stages"]:
        assert stage["bubble_ratio"] is not None and 0.0 <= stage["bubble_ratio"] <= 1.0
    assert result_file.with_name("run-cdf.png").stat().st_size > 1000


def test_bench_sends_a_mix_of_slo_classes(deployment, tmp_path):
    """--slo-classes: each request names a class of the deployment's [slo.classes] (drawn with
    the seed), and the controller's attainment per class counts exactly those requests."""
    result_file = tmp_path / "slo.json"
    out = CliRunner().invoke(app, [
        "bench", "--address", deployment.address, "--dataset", "random", "--num-prompts", "10",
        "--random-input-len", "16", "--random-output-len", "4", "--request-rate", "inf",
        "--num-warmups", "0", "--seed", "3", "--slo-classes", "interactive,batch",
        "--result-file", str(result_file), "--no-progress", "--no-plots"])
    assert out.exit_code == 0, out.output
    data = json.loads(result_file.read_text())
    drawn = [r["slo_class"] for r in data["requests"]]
    assert set(drawn) == {"interactive", "batch"}
    slo = data["summary"]["controller"]["slo"]
    assert {k: v["met"] + v["missed"] for k, v in slo.items()} == \
        {c: drawn.count(c) for c in set(drawn)}
    assert "SLO attainment, batch (%):" in out.output


@pytest.mark.parametrize("backend", ["openai", "openai-chat"])
def test_bench_drives_the_http_endpoint_as_an_openai_server(deployment, tmp_path, backend):
    result_file = tmp_path / "http.json"
    out = CliRunner().invoke(app, [
        "bench", "--backend", backend, "--base-url", deployment.http_url, "--dataset", "random",
        "--random-prompt", "words", "--num-prompts", "4", "--random-input-len", "24",
        "--random-output-len", "6", "--request-rate", "inf", "--request-timeout", "60",
        "--result-file", str(result_file), "--no-progress", "--no-plots"])
    assert out.exit_code == 0, out.output + (deployment.log_tail() if out.exception else "")
    data = json.loads(result_file.read_text())
    assert data["completed"] == 4 and data["summary"]["failed"] == 0
    assert data["health"]["backend"] == backend and data["health"]["max_model_len"] == 2048
    assert all(r["output_tokens"] == r["expected_output_len"] == 6 for r in data["requests"])
    assert data["mean_ttft_ms"] > 5  # timed from the send, not from the response's start
    assert data["p99_e2el_ms"] >= data["median_e2el_ms"]
    for r in data["requests"]:
        assert 0 < r["ttft_s"] <= r["e2e_s"] and len(r["itl_s"]) >= 1
    assert data["summary"]["controller"] == {}  # an OpenAI server reports no controller


def test_bench_sweep_starts_each_deployment_and_keeps_its_log(tmp_path):
    """A one-point sweep: it starts its own deployment (with the --set given), benchmarks it,
    and leaves the results, the table and that deployment's log in a new folder."""
    out = CliRunner().invoke(app, [
        "bench", "--sweep", "--stages", "2", "--policies", "throttle", "--rates", "inf",
        "--dataset", "random", "--num-prompts", "4", "--random-input-len", "16",
        "--random-output-len", "4", "--seed", "1", "--set", "logging.level=debug",
        "--set", "logging.format=json", "--result-dir", str(tmp_path), "--no-progress"])
    assert out.exit_code == 0, out.output
    (folder,) = tmp_path.glob("sweep-*")
    sweep = json.loads((folder / "sweep.json").read_text())
    (run,) = sweep["runs"]
    assert (run["stages"], run["policy"]) == (2, "throttle")
    assert run["summary"]["completed"] == 4 and run["summary"]["failed"] == 0
    assert "| 2 | throttle |" in (folder / "sweep.md").read_text()
    events = list(read_json_events(folder / "serve-throttle-s2.log"))
    dispatched = [e for e in events if e.get("event") == "dispatched"]
    # The warm-up request is not measured; the four measured prompts of 16 tokens are.
    assert sum(e["prefill_tokens"] for e in dispatched) >= 4 * 16
    assert all({"context_len", "prefill_context", "sampled_rows"} <= e.keys() for e in dispatched)
