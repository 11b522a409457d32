"""`conveyor plan`, a real process: a placement whose memory limit is worked out by hand, the
predicted stage times the simulator also computes, fewer devices for the sum objective, and
the errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3


def plan(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "conveyor.cli", "plan", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode == 0) == ok, done.stderr
    return done


def test_a_small_device_holds_what_its_memory_allows():
    # Llama-3-8B on a 20 GiB H100 then an 80 GiB one, bfloat16. A stage may use 0.9 of its
    # device's memory less 2 GiB: 16 GiB on the first. A layer is 218,112,000 weights (2 bytes
    # each) plus its KV reserve, 128 x 2048 tokens of 1024 K and 1024 V values (1 GiB); the
    # first stage also holds the 128256 x 4096 embedding. (16 GiB - embedding) / layer = 10.7,
    # so the first takes 10 layers and the second the 22 others (speed alone would give
    # the first more: it has no LM head).
    layer = 218_112_000 * 2 + 128 * 2048 * 1024 * 2 * 2
    embedding = 128256 * 4096 * 2
    assert int((16 * GIB - embedding) // layer) == 10
    doc = json.loads(plan("--model", "llama3-8b", "--devices", "h100:20,h100", "--json").stdout)
    rows = doc["stage_rows"]
    assert [tuple(r["layers"]) for r in rows] == [(0, 10), (10, 32)]
    assert [r["device"] for r in rows] == ["h100:20", "h100"] and doc["stages"] == 2
    weights = 10 * 218_112_000 * 2 + embedding
    assert rows[0]["weights_gib"] == pytest.approx(weights / GIB)
    assert rows[0]["kv_reserve_gib"] == pytest.approx(10.0)
    assert rows[0]["available_gib"] == pytest.approx(16.0)
    # Its KV pool: what the weights leave, in blocks of 16 tokens over its 10 layers.
    assert rows[0]["kv_blocks"] == (16 * GIB - weights) // (16 * 10 * 1024 * 2 * 2)
    assert doc["bottleneck_ms"] == pytest.approx(max(r["step_ms"] for r in rows)
                                                 ) == doc["objective_ms"]
    assert rows[1]["step_ms"] > rows[0]["step_ms"]  # the memory, not the speed, set the split
    text = plan("--model", "llama3-8b", "--devices", "h100:20,h100").stdout
    assert "| 0 | h100:20 (#0) | 0-9 (10) |" in text and "| 1 | h100 (#1) | 10-31 (22) |" in text
    assert "2 stage(s) on h100:20, h100 (deployment.stages = 2)" in text
    assert "| even | h100:20, h100 | 16+16 |" in text


def test_the_plan_predicts_what_the_simulator_times_for_its_reference_micro_batch():
    from conveyor.sim.cluster import build_cost_model, load_cluster
    from conveyor.sim.pipeline import StepTimer

    path = ROOT / "deploy/clusters/hetero-h200-2a100.toml"
    doc = json.loads(plan("--config", str(path), "--json").stdout)
    assert [r["num_layers"] for r in doc["stage_rows"]] == [20, 6, 6]
    assert doc["stages_key"] == "cluster.stages"
    cfg = load_cluster(path)
    durations, hops, _ = StepTimer.for_cluster(cfg, build_cost_model(cfg))(512, 128, 1024.0, 129)
    assert [r["step_ms"] / 1e3 for r in doc["stage_rows"]] == pytest.approx(durations)
    assert [r["hop_ms"] / 1e3 for r in doc["stage_rows"][:-1]] == pytest.approx(hops)
    compare = {c["placement"]: c for c in doc["compare"]}
    assert compare["even"]["layers"] == [11, 11, 10]
    assert compare["helr"]["bottleneck_ms"] < 0.6 * compare["even"]["bottleneck_ms"]


def test_the_sum_objective_uses_one_device_and_says_how_the_stage_count_follows():
    text = plan("--model", "llama3-8b", "--devices", "h200,a100,a100", "--objective",
                "sum").stdout
    assert "1 stage(s) on h200 (deployment.stages = 1)" in text
    assert "objective (sum): " in text
    refused = plan("--model", "llama3-8b", "--devices", "h200,a100,a100", "--objective", "sum",
                   "--stages", "3", ok=False)
    assert "model.placement = helr uses 1 of the 3 devices in model.devices (h200; sum " \
        in refused.stderr
    assert "but deployment.stages is 3: set it to 1, or to 0 to follow the placement" \
        in refused.stderr


@pytest.mark.parametrize("args, message", [
    (("--devices", "h100,b200"), "model.devices: unknown device 'b200'"),
    (("--model", "llama3-8b"), "no devices to plan for: give --devices"),
    (("--model", "llama3-8b", "--devices", "a100:8,a100:8"),
     "32 layers do not fit in the devices' memory (a100:8, a100:8)"),
    (("--devices", "h100", "--objective", "fast"), "model.helr.objective"),
])
def test_bad_input_is_refused_with_the_reason(args, message):
    assert message in plan(*args, ok=False).stderr
