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
