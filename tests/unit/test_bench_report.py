"""Benchmark figures from constructed request records and controller snapshots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from conveyor.bench.report import (build_result, controller_window, format_table, parse_slo,
                                   save_result, summarize, tpot)
from conveyor.bench.runner import RequestRecord, RunResult
from conveyor.bench.sweep import markdown_table
from conveyor.cli.app import app
from common.stats import ControllerStats, InstanceStats, SLOAttainment


def _record(i: int, ttft: float, tpot_s: float, out: int = 11, prompt: int = 20,
            itl: list[float] | None = None, error: str | None = None) -> RequestRecord:
    e2e = ttft + (out - 1) * tpot_s
    return RequestRecord(i, prompt, out, start_s=0.0, ttft_s=ttft, e2e_s=e2e,
                         itl_s=itl if itl is not None else [tpot_s] * (out - 1),
                         prompt_tokens=prompt, output_tokens=out, finish_reason="length",
                         error=error)


def _records() -> list[RequestRecord]:
    """101 requests: TTFT 0..1 s in 10 ms steps, TPOT 0..0.2 s in 2 ms steps; one failure."""
    recs = [_record(i, ttft=i / 100, tpot_s=i / 500) for i in range(101)]
    recs.append(RequestRecord(101, 20, 11, error="ServerError: boom"))
    return recs


def test_latency_percentiles_are_exact():
    s = summarize(_records(), duration_s=10.0)
    assert s["completed"] == 101 and s["failed"] == 1
    for key, top in (("ttft", 1.0), ("tpot", 0.2)):
        d = s[key]
        assert d["mean"] == pytest.approx(top / 2)
        assert d["p50"] == pytest.approx(top * 0.50)
        assert d["p90"] == pytest.approx(top * 0.90)
        assert d["p99"] == pytest.approx(top * 0.99)
        assert d["std"] == pytest.approx(top * math.sqrt((101 ** 2 - 1) / 12) / 100)
    assert s["itl"]["p50"] == pytest.approx(0.1) and s["itl"]["mean"] == pytest.approx(0.1)
    assert s["e2e"]["p99"] == pytest.approx(0.99 + 10 * 0.99 * 0.2)


def test_throughput_counts_completed_requests_only():
    s = summarize(_records(), duration_s=10.0)
    assert s["total_input_tokens"] == 101 * 20 and s["total_output_tokens"] == 101 * 11
    assert s["request_throughput"] == pytest.approx(10.1)
    assert s["output_throughput"] == pytest.approx(111.1)
    assert s["total_token_throughput"] == pytest.approx(313.1)


def test_tpot_of_a_single_token_request_is_undefined():
    one = _record(0, ttft=0.2, tpot_s=0.0, out=1)
    assert tpot(one) is None
    assert tpot(_record(1, ttft=0.2, tpot_s=0.05, out=5)) == pytest.approx(0.05)
    s = summarize([one], 1.0, parse_slo("tpot=0.01"))
    assert s["tpot"] is None and s["goodput"]["requests"] == 1  # nothing to violate


def test_goodput_counts_exactly_the_requests_within_every_slo():
    recs = _records()
    s = summarize(recs, 10.0, parse_slo("ttft=0.5"))
    assert s["goodput"]["requests"] == 51  # TTFT 0.00 .. 0.50
    assert s["goodput"]["request_goodput"] == pytest.approx(5.1)
    assert s["goodput"]["fraction"] == pytest.approx(51 / 102)  # the failure counts against
    both = summarize(recs, 10.0, parse_slo("ttft=0.5, tpot=0.051"))
    assert both["goodput"]["requests"] == 26  # TPOT i/500 <= 0.051 is i <= 25
    e2e = summarize(recs, 10.0, parse_slo("e2e=1.0"))
    assert e2e["goodput"]["requests"] == sum(r.ok and r.e2e_s <= 1.0 for r in recs)
    assert "goodput" not in summarize(recs, 10.0, parse_slo(""))


@pytest.mark.parametrize("bad, message", [
    ("ttft", "metric=seconds"), ("latency=1", "metric=seconds"), ("ttft=fast", "not a number"),
    ("ttft=0", "> 0"), ("ttft=-1", "> 0"), ("ttft=1,ttft=2", "twice"), ("tpot=inf", "> 0")])
def test_bad_slo_strings_raise_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_slo(bad)


def test_slo_parsing():
    assert parse_slo("ttft=0.5,tpot=0.1") == {"ttft": 0.5, "tpot": 0.1}
    assert parse_slo(" TTFT = 2 , e2e=10 ") == {"ttft": 2.0, "e2e": 10.0}
    assert parse_slo(None) == {}


def test_the_cli_refuses_bad_input_before_doing_any_work():
    runner = CliRunner()
    for args, text in ((["--slo", "ttft"], "--slo"), (["--dataset", "alpaca"], "alpaca"),
                       (["--request-rate", "0"], "must be > 0"),
                       (["--sweep", "--rates", "1,x"], "--rates"),
                       (["--slo-classes", "interactive", "--slo", "ttft=1"], "not both"),
                       (["--slo-classes", "interactive", "--backend", "openai"], "SDK"),
                       (["--random-input-len", "64,0"], "every value must be >= 1")):
        out = runner.invoke(app, ["bench", "--address", "tcp://127.0.0.1:9", *args])
        assert out.exit_code == 2, out.output
        flat = " ".join(out.output.replace("│", " ").split())  # undo the error box's wrapping
        assert text in flat


def _snapshot(steps, busy, pending, idle, prefill, decode, **extra) -> ControllerStats:
    return ControllerStats.from_builtins({
        "policy": "throttle", "generated_tokens": extra.get("generated", 0),
        "stages": [{"instance": 0, "stage": s, "steps": steps[s], "busy_s": busy[s],
                    "pending_s": pending[s], "idle_s": idle[s]} for s in range(2)],
        "batch_tokens": {"prefill": dict(zip(("count", "sum", "sumsq"), prefill)),
                         "decode": dict(zip(("count", "sum", "sumsq"), decode))},
        "instances": [{"instance": 0, "kv_total_blocks": 100, "kv_free_blocks": 100}]})


def _gauges(**fields) -> list[InstanceStats]:
    return [InstanceStats(instance=0, kv_total_blocks=100, **fields)]


def test_bubble_ratio_and_batch_tokens_over_the_window():
    before = _snapshot([10, 10], [1.0, 2.0], [5.0, 5.0], [1.5, 0.5], (3, 30, 350), (0, 0, 0),
                       generated=7)
    # Window: stage 0 pending 10 s, idle 2.5 s; stage 1 pending 8 s, idle 4 s. Prefill
    # micro-batches of [2, 4, 4, 4, 5, 5, 7, 9] tokens: mean 5, population std 2.
    after = _snapshot([30, 28], [8.0, 6.0], [15.0, 13.0], [4.0, 4.5],
                      (3 + 8, 30 + 40, 350 + 232), (4, 8, 16), generated=107)
    samples = [{"t": 0.5, "instances": _gauges(waiting=3, running=2, inflight=1,
                                               kv_free_blocks=60)},
               {"t": 1.5, "instances": _gauges(waiting=1, running=4, inflight=2,
                                               kv_free_blocks=75)}]
    ctl = controller_window(before, after, samples)
    assert ctl["policy"] == "throttle" and ctl["counters"]["generated_tokens"] == 100
    s0, s1 = ctl["stages"]
    assert (s0["steps"], s0["pending_s"], s0["idle_s"]) == (20, 10.0, 2.5)
    assert s0["bubble_ratio"] == pytest.approx(0.25)
    assert s1["bubble_ratio"] == pytest.approx(0.5)
    assert ctl["mean_bubble_ratio"] == pytest.approx(0.375)
    assert ctl["batch_tokens"]["prefill"] == {"count": 8, "mean": 5.0, "std": pytest.approx(2)}
    assert ctl["batch_tokens"]["decode"] == {"count": 4, "mean": 2.0, "std": 0.0}
    inst = ctl["instances"][0]
    assert (inst["peak_waiting"], inst["peak_running"], inst["peak_inflight"]) == (3, 4, 2)
    assert inst["peak_kv_used"] == pytest.approx(0.4) and inst["kv_free_blocks"] == 100


def test_missing_snapshots_leave_sections_out():
    assert controller_window(None, None) == {}
    assert controller_window(None, ControllerStats(policy="x")) == {"policy": "x"}
    # A stage that appeared during the window (its instance came up late) has no window.
    after = ControllerStats.from_builtins({"stages": [{"instance": 0, "stage": 0}]})
    assert "stages" not in controller_window(ControllerStats(), after)


def test_table_and_json_output(tmp_path):
    before = _snapshot([0, 0], [0, 0], [0, 0], [0, 0], (0, 0, 0), (0, 0, 0))
    after = _snapshot([4, 4], [1, 1], [2, 2], [0.5, 1.0], (2, 8, 40), (4, 4, 4))
    run = RunResult(_records(), 10.0, {"policy": "throttle", "stages": 2}, before, after, [])
    result = build_result(run, {"request_rate": math.inf}, parse_slo("ttft=0.5"))
    table = format_table(result["summary"])
    assert "Successful requests:" in table and "Failed requests:" in table
    assert "P99 TTFT (ms):" in table and "990.00" in table  # p99 TTFT 0.99 s, in ms
    assert "Mean bubble ratio:" in table and "0.375" in table
    path = save_result(result, tmp_path / "r.json")
    data = json.loads(path.read_text())  # strict JSON: the infinite rate is a string
    assert data["config"]["request_rate"] == "inf"
    assert data["summary"]["ttft"]["p99"] == pytest.approx(0.99)  # seconds in the JSON
    # vLLM's flat keys, in its units (milliseconds), beside Conveyor's own.
    assert data["p99_ttft_ms"] == pytest.approx(990.0)
    assert data["request_throughput"] == data["summary"]["request_throughput"]
    assert {"mean_tpot_ms", "median_itl_ms", "std_e2el_ms", "output_throughput",
            "duration", "completed"} <= set(data)
    assert len(data["requests"]) == 102 and data["requests"][-1]["error"] == "ServerError: boom"
    runs = [{"stages": 2, "policy": "throttle", "rate": 1.0, "summary": result["summary"]},
            {"stages": 2, "policy": "bogus", "rate": 1.0, "summary": None,
             "error": "deployment did not start: exited during start-up:\nloading...\n"
                      "conveyor: error: unknown scheduling policy 'bogus'\n"}]
    md = markdown_table(runs)
    assert "| 2 | throttle | 111.1 | 1 | 10.10 | 990.0 |" in md
    assert "| 2 | bogus | failed: conveyor: error: unknown scheduling policy 'bogus' |" in md


def test_sweep_charts(tmp_path):
    from conveyor.bench.plots import plot_sweep

    def summary(tput: float, bubble: float | None) -> dict:
        s = summarize([_record(0, 0.1, 0.01), _record(1, 0.2, 0.02)], 1.0)
        s["output_throughput"] = tput
        s["controller"] = {} if bubble is None else {"mean_bubble_ratio": bubble}
        return s

    runs = [{"stages": st, "policy": p, "rate": r, "summary": summary(10 * st + r, 0.2)}
            for st in (2, 3) for p in ("fcfs", "throttle") for r in (1.0, 4.0, math.inf)
            if not math.isinf(r)]
    runs += [{"stages": 2, "policy": "fcfs", "rate": math.inf, "summary": summary(99, 0.1)},
             {"stages": 2, "policy": "bogus", "rate": 1.0, "summary": None, "error": "x"}]
    written = plot_sweep(runs, tmp_path)
    assert sorted(p.name for p in written) == ["sweep-bubble.png", "sweep-latency.png",
                                              "sweep-throughput.png"]
    assert all(p.stat().st_size > 1000 for p in written)
    no_bubbles = [{**r, "summary": summary(5, None)} for r in runs if r["summary"]]
    names = {p.name for p in plot_sweep(no_bubbles, tmp_path / "nb")}
    assert "sweep-bubble.png" not in names and "sweep-throughput.png" in names


def test_slo_attainment_per_class_over_the_window():
    before = ControllerStats.from_builtins({"slo": {"interactive": {"met": 5, "missed": 1}}})
    after = ControllerStats.from_builtins({"slo": {"interactive": {"met": 8, "missed": 3},
                                                   "batch": {"met": 4, "missed": 0}}})
    ctl = controller_window(before, after)
    assert ctl["slo"] == {"batch": {"met": 4, "missed": 0, "attainment": 1.0},
                          "interactive": {"met": 3, "missed": 2, "attainment": 0.6}}
    summary = {**summarize(_records(), 10.0), "controller": ctl}
    assert "SLO attainment, interactive (%):" in format_table(summary)
    md = markdown_table([{"stages": 2, "policy": "fcfs", "rate": 1.0, "summary": summary}])
    assert "| batch 100%, interactive 60% |" in md


def test_latency_and_attainment_per_slo_class():
    recs = _records()
    for r in recs:
        r.slo_class = "interactive" if r.index % 3 == 0 else "batch"
    s = summarize(recs, 10.0)
    a = [r for r in recs if r.ok and r.slo_class == "interactive"]
    assert s["by_slo_class"]["interactive"]["requests"] == 34
    assert s["by_slo_class"]["interactive"]["e2e"]["p99"] == pytest.approx(
        float(np.percentile([r.e2e_s for r in a], 99)))
    assert s["by_slo_class"]["batch"]["completed"] == 67  # 68 sent, one failed
    assert "by_slo_class" not in summarize(_records(), 10.0)
    before = ControllerStats(slo={"interactive": SLOAttainment(met=1, missed=1)})
    after = ControllerStats(slo={"interactive": SLOAttainment(met=4, missed=2),
                                 "batch": SLOAttainment(met=5)})
    ctl = controller_window(before, after)
    assert ctl["slo"]["interactive"] == {"met": 3, "missed": 1, "attainment": 0.75}
    assert ctl["slo"]["batch"]["attainment"] == 1.0
    s["controller"] = ctl
    text = format_table(s)
    assert "SLO class interactive" in text and "SLO attainment, interactive (%):" in text
