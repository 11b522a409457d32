"""The measurement scripts under scripts/ run end to end on small inputs (they are how the
figures in BENCHMARKS.md are made; a script that breaks silently breaks those)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_gllm_comparison_writes_its_table_and_json(tmp_path):
    out = run_script("sim_gllm_comparison.py", "--clusters", "deploy/clusters/h100-4stage.toml",
                     "--num-prompts", "60", "--load-fractions", "0.5,1.0", "--out",
                     str(tmp_path))
    assert "h100-4stage" in out and "throttle / sarathi" in out
    doc = json.loads((tmp_path / "comparison.json").read_text())
    assert {r["policy"] for r in doc["results"]} == {"sarathi", "throttle"}
    assert (tmp_path / "comparison.png").is_file()


def test_fidelity_replays_a_bench_run(tmp_path):
    """A bench result file (its per-request records and summary) replayed on the CPU cluster:
    the table has the run's configuration, its figures and the simulator's."""
    records = [{"index": i, "prompt_len": 20 + i, "expected_output_len": 8, "start_s": 0.0}
               for i in range(4)]
    summary = {"ttft": {"mean": 0.5}, "tpot": {"mean": 0.2}, "output_throughput": 10.0,
               "controller": {"mean_bubble_ratio": 0.1}}
    bench = tmp_path / "bench-fcfs.json"
    bench.write_text(json.dumps({"config": {"policy": "fcfs", "stages": 2},
                                 "summary": summary, "requests": records}))
    out = run_script("sim_fidelity.py", str(bench))
    row = next(line for line in out.splitlines() if line.startswith("| fcfs, 2 | 1 |"))
    assert "0.5 (0.5-0.5)" in row and "200 (200-200)" in row
    assert "TPOT ms: simulator mean |error|" in out

    def sim_tpot(*args: str) -> float:
        out = run_script("sim_fidelity.py", str(bench), *args)
        row = next(line for line in out.splitlines() if line.startswith("| fcfs, 2 | 1 |"))
        return float(row.split("|")[7])  # cells: policy, runs, TTFT x3, TPOT bench, TPOT sim

    # --set changes the cluster: stages slowed to half speed while both compute
    assert sim_tpot("--set", "cluster.host_corun_speed=0.5") > 1.2 * sim_tpot()
    # with step noise the figure is a mean over seeds, near the noiseless one
    assert abs(sim_tpot("--set", "simulator.step_jitter=0.1", "--seeds", "3") / sim_tpot()
               - 1) < 0.15


def test_step_timeline_pairs_each_dispatch_with_its_stage_steps(tmp_path):
    def event(**kw) -> str:
        return json.dumps({"timestamp": "2026-11-23T18:45:29.003000", "instance": 0, **kw})

    log = tmp_path / "serve.log"
    log.write_text("\n".join([
        "conveyor: ready",  # a console line of the supervisor
        event(event="dispatched", mb_id=1, prefill_tokens=500, decode_tokens=2, requests=9),
        event(event="dispatched", mb_id=2, prefill_tokens=0, decode_tokens=9, requests=9),
        event(event="step done", mb_id=1, stage=1, compute_s=1.25, wait_s=0.5),
        event(event="step done", mb_id=1, stage=0, compute_s=1.5, wait_s=0.0)]))
    out = run_script("step_timeline.py", str(log), "--min-prefill", "100")
    rows = [line for line in out.splitlines() if line.startswith("18:45")]
    assert len(rows) == 1 and "500" in rows[0]
    assert rows[0].endswith("0: 1.500 (0.000)  1: 1.250 (0.500)")


def test_step_timeline_sets_the_log_against_a_profile(tmp_path):
    """With the batch shape on each dispatch line, the timeline prints the profile's stage
    times beside the measured ones and sums measured over predicted per kind of step."""
    from common.costmodel import BatchShape
    from conveyor.sim.cluster import build_cost_model, load_cluster

    config = ROOT / "deploy/clusters/default-cpu.toml"
    profile = ROOT / "deploy/profiles/smollm2-135m-cpu.json"
    cfg = load_cluster(config)
    cost = build_cost_model(cfg, profile)
    shape = BatchShape.of_chunks([(0, 300), (0, 200), (40, 1)], 3)
    predicted = [cost.stage_step_s(shape.at_stage(s.num_layers, s.first, s.last))
                 for s in cfg.stages]
    fields = {k: getattr(shape, k) for k in shape.__slots__}
    lines = [json.dumps({"timestamp": "2026-11-23T18:45:29.003000", "instance": 0,
                         "event": "dispatched", "mb_id": 1, "requests": 3, **fields})]
    for stage, factor in ((0, 1.0), (1, 1.5)):  # stage 1 ran 1.5x slower than predicted
        lines.append(json.dumps({"timestamp": "2026-11-23T18:45:30.000000", "instance": 0,
                                 "event": "step done", "mb_id": 1, "stage": stage,
                                 "compute_s": predicted[stage] * factor, "wait_s": 0.0}))
    log = tmp_path / "serve.log"
    log.write_text("\n".join(lines))
    out = run_script("step_timeline.py", str(log), "--min-prefill", "200", "--config",
                     str(config), "--profile", str(profile))
    row = next(line for line in out.splitlines() if line.startswith("18:45"))
    assert f"[{predicted[0]:.3f}]" in row and f"[{predicted[1]:.3f}]" in row
    summary = [line.split() for line in out.splitlines() if line.startswith("prefill >= 200")]
    assert [(r[3], r[4], r[5]) for r in summary] == [("0", "1", "1.000"), ("1", "1", "1.500")]

    # Several logs: a table each, then the steps of all of them pooled.
    out = run_script("step_timeline.py", str(log), str(log), "--summary", "--min-prefill",
                     "200", "--config", str(config), "--profile", str(profile))
    assert "18:45" not in out and "all 2 logs" in out
    pooled = out.split("all 2 logs")[1]
    rows = [line.split() for line in pooled.splitlines() if line.startswith("prefill >= 200")]
    assert [(r[3], r[4], r[5]) for r in rows] == [("0", "2", "1.000"), ("1", "2", "1.500")]


def test_step_timeline_measures_how_much_steps_scatter(tmp_path):
    """The spread column: the steps' measured/predicted ratios' p10-p90 width over the median,
    in standard deviations of a normal (0 when every step is off by the same factor)."""
    from common.costmodel import BatchShape
    from conveyor.sim.cluster import build_cost_model, load_cluster

    config = ROOT / "deploy/clusters/default-cpu.toml"
    profile = ROOT / "deploy/profiles/smollm2-135m-cpu.json"
    cfg = load_cluster(config)
    cost = build_cost_model(cfg, profile)
    shape = BatchShape.of_chunks([(100 + i, 1) for i in range(8)], 8)
    predicted = [cost.stage_step_s(shape.at_stage(s.num_layers, s.first, s.last))
                 for s in cfg.stages]
    fields = {k: getattr(shape, k) for k in shape.__slots__}
    lines = []
    for mb in range(20):
        lines.append(json.dumps({"timestamp": "2026-12-03T10:00:00.000000", "instance": 0,
                                 "event": "dispatched", "mb_id": mb, "requests": 8, **fields}))
        for stage, factors in ((0, (1.0, 1.0)), (1, (1.0, 1.2))):  # stage 1 alternates
            lines.append(json.dumps({"timestamp": "2026-12-03T10:00:01.000000", "instance": 0,
                                     "event": "step done", "mb_id": mb, "stage": stage,
                                     "compute_s": predicted[stage] * factors[mb % 2],
                                     "wait_s": 0.0}))
    log = tmp_path / "serve.log"
    log.write_text("\n".join(lines))
    out = run_script("step_timeline.py", str(log), "--summary", "--config", str(config),
                     "--profile", str(profile))
    rows = {int(r[2]): r for r in (line.split() for line in out.splitlines()
                                   if line.startswith("decode only"))}
    assert rows[0][6] == "0.000"
    # p10 = 1.0, p90 = 1.2, median 1.1: (0.2 / 1.1) / (2 x 1.2816) = 0.071
    assert rows[1][6] == "0.071" and rows[1][3] == "20"


def test_corun_measurement_prints_a_cluster_files_settings():
    """Tiny steps, once each: the table has a decode row and a row per prefill size, and the
    cluster settings it suggests are speeds in (0, 1]."""
    out = run_script("measure_host_corun.py", "--repeats", "1", "--decodes", "2", "--context",
                     "32", "--prefill", "16,48")
    rows = {line.split()[0] + (line.split()[1] if line.startswith("prefill") else ""): line
            for line in out.splitlines() if line.startswith(("decode", "prefill"))}
    assert set(rows) == {"decode", "prefill16", "prefill48"}
    decode = float(out.split("host_corun_speed = ")[1].split()[0])
    assert 0 < decode <= 1
    curve = out.split("host_corun_prefill = ")[1].strip()
    points = json.loads(curve)
    assert [n for n, _ in points] == [16, 48] and all(0 < v <= 1 for _, v in points)


def test_ingress_timing_reads_the_per_request_delay_off_a_burst(tmp_path):
    """Bench's TTFT of the k-th request of a burst exceeds the controller's by 5 ms + 2 ms x k:
    the ingress takes 2 ms a request; the first request's queue_s is the dispatch latency.
    The warm-up request's line (the first) is not part of the run."""
    sweep = tmp_path / "sweep-1"
    sweep.mkdir()
    lengths = [(10, 5), (20, 6), (30, 7), (40, 8)]
    lines = [json.dumps({"event": "request finished", "req_id": 1, "prompt_tokens": 15,
                         "output_tokens": 16, "ttft_s": 0.1, "queue_s": 0.009})]
    records = []
    for k, (prompt, output) in enumerate(lengths):
        controller_ttft = 0.5 + 0.1 * k
        lines.append(json.dumps({"event": "request finished", "req_id": 2 + k,
                                 "prompt_tokens": prompt, "output_tokens": output,
                                 "ttft_s": controller_ttft, "queue_s": 0.003 + k}))
        records.append({"index": 3 - k, "prompt_tokens": prompt, "output_tokens": output,
                        "ttft_s": controller_ttft + 0.005 + 0.002 * k})
    (sweep / "serve-fcfs-s2.log").write_text("conveyor: starting\n" + "\n".join(lines))
    (sweep / "bench-fcfs-s2-rateinf-1.json").write_text(json.dumps({"requests": records}))
    (sweep / "serve-throttle-s2.log").write_text("")  # a deployment whose bench run is missing
    out = run_script("ingress_timing.py", str(sweep))
    assert "fcfs-s2" in out and "ingress   2.00 ms/request  first dispatch   3.00 ms" in out
    assert "serve-throttle-s2.log: no matching bench run" in out
    assert out.strip().endswith("ingress_us = 2000, dispatch_latency_us = 3000")


def test_cascade_comparison_writes_its_table_and_json(tmp_path):
    out = run_script("sim_cascade.py", "--instances", "2", "--num-prompts", "40", "--loads",
                     "0.6", "--workloads", "longtail", "--out", str(tmp_path))
    assert "| longtail | 60%" in out and "| groups |" in out
    rows = json.loads((tmp_path / "cascade_comparison.json").read_text())
    assert [r["scheme"] for r in rows] == ["least-loaded", "llumnix", "groups"]
    assert all(r["failed"] == 0 for r in rows) and rows[2]["groups"]


def test_helr_comparison_writes_its_table_and_json(tmp_path):
    out = run_script("sim_helr.py", "--devices", "h100,h100,a100", "--num-prompts", "40",
                     "--out", str(tmp_path))
    assert "| helr | h100, h100, a100 | 14+14+4 |" in out and "| even |" in out
    doc = json.loads((tmp_path / "helr.json").read_text())
    assert list(doc) == ["helr", "balanced", "even"]
    assert all(len(r["load"]["stage_ms"]) == 3 for r in doc.values())
    assert doc["helr"]["plan"]["bottleneck_ms"] < doc["even"]["plan"]["bottleneck_ms"]
