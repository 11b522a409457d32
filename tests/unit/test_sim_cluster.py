"""Cluster files, cost models, routing, workloads and the `conveyor simulate` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conveyor.sim.cluster import ClusterError, build_cluster, build_cost_model, load_cluster
from conveyor.sim.engine import simulate
from conveyor.sim.workload import (Workload, WorkloadError, load_trace, make_workload,
                                   sharegpt_lengths)

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "deploy" / "clusters"


class ConstCost:
    def stage_step_s(self, s) -> float:
        return 1e-3

    def transfer_s(self, num_tokens: int) -> float:
        return 0.0


def raw(**sections) -> dict:
    base = {"model": {"shape": "tiny"}, "cluster": {"instances": 1, "stages": 2},
            "kvcache": {"num_blocks": 512}}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return base


# ---- files --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, instances, stages", [("default-cpu", 1, 2), ("h100-4stage", 1, 4),
                                                     ("h100-8stage", 1, 8),
                                                     ("scale-64x4", 64, 4),
                                                     ("hetero-h200-2a100", 1, 3)])
def test_shipped_cluster_files_load(name, instances, stages):
    cfg = load_cluster(CLUSTERS / f"{name}.toml")
    assert (cfg.instances, cfg.num_stages) == (instances, stages)
    assert sum(s.num_layers for s in cfg.stages) == cfg.shape.num_layers
    assert cfg.stages[0].first and cfg.stages[-1].last
    assert cfg.num_blocks > 1000
    cfg.make_policy()


def test_default_cpu_pool_is_sized_like_conveyor_serve_on_cpu():
    cfg = load_cluster(CLUSTERS / "default-cpu.toml")
    # Layers as serve places them (common/model/placement.py), then services/stage/devices.py:
    # kvcache.memory_gib per stage / bytes of a block on the stage (K and V, its layers, 16
    # tokens, 3 KV heads x 64, float32); the instance takes the smallest stage pool.
    from common.model.placement import stage_layer_bounds

    bounds = stage_layer_bounds(cfg.shape, 2)
    assert [s.num_layers for s in cfg.stages] == [b - a for a, b in bounds] == [17, 13]
    per_block = 2 * 17 * 16 * 3 * 64 * 4
    assert cfg.num_blocks == int(0.5 * 1024**3 // per_block) == 1285
    even = load_cluster(CLUSTERS / "default-cpu.toml", {"model.placement": "even"})
    assert [s.num_layers for s in even.stages] == [15, 15] and even.num_blocks == 1456
    assert cfg.policy == "fcfs" and cfg.max_inflight == 2


def test_gpu_pool_leaves_room_for_weights():
    small = build_cluster(raw(model={"shape": "llama3-8b", "dtype": "bfloat16"},
                              cluster={"stages": 4},
                              kvcache={"num_blocks": 0, "gpu_memory_gib": 80.0}))
    big = build_cluster(raw(model={"shape": "llama3-8b", "dtype": "bfloat16"},
                            cluster={"stages": 2},
                            kvcache={"num_blocks": 0, "gpu_memory_gib": 80.0}))
    assert small.num_blocks > big.num_blocks > 0


@pytest.mark.parametrize("section, message", [
    ({"model": {"shape": "gpt-17"}}, "unknown model shape 'gpt-17'"),
    ({"model": {"layer_split": [1, 1, 2]}}, "layer_split has 3 entries but cluster.stages is 2"),
    ({"model": {"layer_split": [1, 2]}}, "sums to 3, but the model has 4 layers"),
    ({"cluster": {"stages": 5}}, "cannot split 4 layers over 5 stages"),
    ({"scheduler": {"policy": "nope"}}, "unknown scheduling policy 'nope'"),
    ({"scheduler": {"max_num_seqz": 3}}, "unknown key 'max_num_seqz'"),
    ({"scheduler": {"policy": "throttle", "kv_threshold": 2.0}}, "kv_threshold"),
    ({"scheduler": {"max_num_seqs": "many"}}, "scheduler"),
    ({"kvcache": {"block_size": 12}}, "block_size must be a power of two"),
    ({"kvcache": {"num_blocks": 0, "memory_gib": 1e-9}}, "no memory left for the KV cache"),
    ({"linkz": {"latency_us": 1}}, "linkz"),
    ({"cluster": {"instances": 0}}, "cluster.instances must be >= 1"),
    ({"cluster": {"host_corun_speed": 0.0}}, "host_corun_speed must be in (0, 1]"),
    ({"cluster": {"host_corun_prefill": [[32, 1.2]]}}, "every speed must be in (0, 1]"),
    ({"cluster": {"host_corun_prefill": [[512, 1.0], [32, 0.9]]}}, "increasing"),
    ({"simulator": {"step_jitter": 2.0}}, "simulator.step_jitter must be in [0, 1]"),
    ({"simulator": {"ingress_us": -1.0}}, "simulator.ingress_us must be >= 0"),
])
def test_bad_cluster_files_are_refused_with_the_reason(section, message):
    with pytest.raises(ClusterError) as e:
        build_cluster(raw(**section))
    assert message in str(e.value)


def test_files_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nshape = "tiny"\n[cluster]\nstages = 2\n[kvcache]\nnum_blocks = 64\n'
                    '[scheduler]\npolicy = "sarathi"\nmax_num_seqs = 8\n')
    cfg = load_cluster(path, {"scheduler.policy": "throttle", "cluster.instances": 3})
    assert (cfg.policy, cfg.instances, cfg.make_policy().max_num_seqs) == ("throttle", 3, 8)
    policy = cfg.make_policy()
    assert policy.name == "throttle" and policy.max_num_seqs == 8
    assert cfg.with_policy("fcfs", max_num_batched_tokens=99).make_policy() \
        .max_num_batched_tokens == 99
    path.write_text("[model\n")
    with pytest.raises(ClusterError, match="not valid TOML"):
        load_cluster(path)
    with pytest.raises(ClusterError, match="cannot read"):
        load_cluster(tmp_path / "missing.toml")


def test_cost_models_are_chosen_by_flag_or_file():
    cfg = build_cluster(raw(model={"shape": "llama3-8b", "dtype": "bfloat16"},
                            cost={"device": "h100"}))
    from common.costmodel.roofline import RooflineCostModel

    assert isinstance(build_cost_model(cfg), RooflineCostModel)
    assert isinstance(build_cost_model(cfg, device="a100"), RooflineCostModel)
    with pytest.raises(ClusterError, match="unknown device"):
        build_cost_model(cfg, device="tpu9")
    with pytest.raises(ClusterError, match="not both"):
        build_cost_model(cfg, profile="p.json", device="h100")
    with pytest.raises(ClusterError, match="no cost model"):
        build_cost_model(build_cluster(raw()))
    with pytest.raises(ClusterError, match="cost profile"):
        build_cost_model(cfg, profile="/nonexistent/profile.json")


# ---- routing ------------------------------------------------------------------------------------

def test_requests_go_to_the_least_loaded_instance():
    cfg = build_cluster(raw(cluster={"instances": 3}))
    # A long request, then two short ones at once: the short ones avoid the long one's instance.
    wl = Workload([0.0, 0.001, 0.001], [500, 10, 10], [300, 5, 5])
    res = simulate(cfg, ConstCost(), wl)
    assert [r.instance for r in res.requests] == [0, 1, 2]
    wl = Workload([0.0, 0.001, 0.002, 0.003], [500, 10, 10, 10], [300, 5, 5, 5])
    res = simulate(cfg, ConstCost(), wl)
    # By the 4th arrival the short ones are done (or nearly): instance 1 is least loaded again.
    assert res.requests[3].instance in (1, 2)
    assert res.requests[3].instance != 0


def test_round_robin_routing():
    cfg = build_cluster(raw(cluster={"instances": 3, "routing": "round-robin"}))
    res = simulate(cfg, ConstCost(), Workload([0.0] * 6, [500, 10, 10, 10, 10, 10], [9] * 6))
    assert [r.instance for r in res.requests] == [0, 1, 2, 0, 1, 2]


# ---- workloads ----------------------------------------------------------------------------------

def test_traces_replay_jsonl_and_bench_results(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"arrival_s": 2.5, "prompt_len": 10, "output_len": 3}\n\n'
                     '{"arrival_s": 1.5, "prompt_len": 20, "output_len": 4, "x": 1}\n')
    wl = load_trace(jsonl)
    assert (wl.arrival_s, wl.prompt_len, wl.output_len) == ([0.0, 1.0], [20, 10], [4, 3])
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"summary": {}, "requests": [
        {"index": 0, "prompt_len": 7, "expected_output_len": 9, "start_s": 0.0},
        {"index": 1, "prompt_len": 8, "expected_output_len": 2, "start_s": 0.5}]}))
    wl = load_trace(bench, num_prompts=1)
    assert (wl.arrival_s, wl.prompt_len, wl.output_len) == ([0.0], [7], [9])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival_s": 0, "prompt_len": 0, "output_len": 3}\n')
    with pytest.raises(WorkloadError, match="lengths >= 1"):
        load_trace(bad)


def test_sharegpt_lengths_follow_bench_then_resample():
    pairs = [(5 + i, 6 + 2 * i) for i in range(50)] + [(1, 100), (3000, 10)]
    lengths = sharegpt_lengths(10, seed=4, max_len=2048, pairs=pairs)
    import random

    shuffled = list(pairs)
    random.Random(4).shuffle(shuffled)
    expected = [p for p in shuffled if p[0] >= 4 and p[1] >= 4 and sum(p) <= 2048][:10]
    assert lengths == expected
    more = sharegpt_lengths(200, seed=4, max_len=2048, pairs=pairs)
    assert len(more) == 200 and more[:50] == sharegpt_lengths(50, 4, 2048, pairs=pairs)
    assert set(more) <= set(pairs[:50])


def test_a_workload_at_another_rate_is_the_one_made_for_that_rate():
    made = make_workload("random", 40, 2.0, burstiness=0.5, seed=3, random_input_len=64,
                         random_output_len=16, random_range_ratio=0.5)
    moved = make_workload("random", 40, 8.0, burstiness=0.5, seed=3, random_input_len=64,
                          random_output_len=16, random_range_ratio=0.5).at_rate(2.0, 0.5, 3)
    assert (moved.arrival_s, moved.prompt_len, moved.output_len) == (
        made.arrival_s, made.prompt_len, made.output_len)
    assert moved.description == made.description
    assert moved.at_rate(math.inf).arrival_s == [0.0] * 40


# ---- the command --------------------------------------------------------------------------------

def test_simulate_command_writes_bench_shaped_results(tmp_path):
    from typer.testing import CliRunner

    from conveyor.cli.app import app

    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"arrival_s": 0.05 * i, "prompt_len": 40 + i,
                                         "output_len": 20}) + "\n" for i in range(30)))
    cluster = tmp_path / "c.toml"
    cluster.write_text('[model]\nshape = "llama3-8b"\ndtype = "bfloat16"\n[cluster]\n'
                       'instances = 2\nstages = 2\n[kvcache]\nnum_blocks = 4000\n')
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, [
        "simulate", "--config", str(cluster), "--device", "h100", "--workload", "trace",
        "--trace", str(trace), "--policy", "throttle", "--slo", "ttft=1,tpot=0.5",
        "--result-file", str(out), "--no-plots", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "Simulation Result" in result.output and "Mean bubble ratio" in result.output
    doc = json.loads(out.read_text())
    s = doc["summary"]
    for key in ("completed", "failed", "duration_s", "request_throughput", "output_throughput",
                "total_token_throughput", "ttft", "tpot", "itl", "e2e", "goodput", "controller"):
        assert key in s
    assert s["completed"] == 30 and s["goodput"]["requests"] == 30
    assert set(s["ttft"]) == {"mean", "std", "p50", "p90", "p99"}
    assert s["controller"]["policy"] == "throttle" and len(s["controller"]["stages"]) == 4
    assert len(doc["requests"]) == 30 and len(doc["requests"][0]["itl_s"]) == 19
    assert set(doc["requests"][0]) >= {"index", "prompt_len", "expected_output_len", "start_s",
                                       "ttft_s", "e2e_s", "itl_s", "output_tokens"}
    assert s["simulator"]["max_kv_used"] > 0

    bad = CliRunner().invoke(app, ["simulate", "--config", str(cluster), "--workload", "trace",
                                   "--trace", str(trace), "--no-plots"])
    assert bad.exit_code == 1 and "no cost model" in bad.output
    bad = CliRunner().invoke(app, ["simulate", "--config", str(cluster), "--device", "h100",
                                   "--set", "model.layer_split=[1,2,3]", "--no-plots"])
    assert bad.exit_code == 1 and "layer_split" in bad.output


def test_a_measured_profile_drives_the_stage_times(tmp_path):
    """--profile: `conveyor profile`'s file format through ProfileCostModel (lazily imported)."""
    from common.costmodel.profile import Profile, Sample
    from common.costmodel.profile_model import ProfileCostModel

    cfg = build_cluster(raw(cluster={"stages": 2}))  # tiny: 4 layers over the two stages
    grid_p, grid_d, grid_c = [0, 64], [0, 1, 8], [16, 256]
    samples = [Sample(p, d, c, median_s=1e-3 + 1e-5 * p + 1e-4 * d, p10_s=0.0, p90_s=0.0)
               for p in grid_p for d in grid_d for c in grid_c if p or d]
    profile = Profile(model_name="tiny", shape=cfg.shape, dtype="float32",
                      device={"type": "cpu"}, num_layers=2, prefill_axis=grid_p,
                      decode_axis=grid_d, context_axis=grid_c, samples=samples,
                      embedding_tokens=[1, 64], embedding_s=[0.0, 0.0], head_rows=[1, 8],
                      head_s=[0.0, 0.0], activation_bytes_per_token=256,
                      link={"bandwidth_bytes_s": 1e9, "latency_s": 0.0})
    path = profile.save(tmp_path / "tiny.json")
    cost = build_cost_model(cfg, profile=path)
    assert isinstance(cost, ProfileCostModel)
    res = simulate(cfg, cost, Workload([0.0], [64], [2]))
    # Stage time scales with its layers (profile of 2): the stages add up to 2 x the profile.
    prefill, decode = 1e-3 + 64e-5, 1e-3 + 1e-4
    hop_prefill, hop_decode = 64 * 256 / 1e9, 256 / 1e9
    r = res.requests[0]
    assert r.first_token == pytest.approx(2 * prefill + hop_prefill, rel=1e-6)
    assert r.last_token - r.first_token == pytest.approx(2 * decode + hop_decode, rel=1e-6)


def test_stage_bubbles_fold_instances_as_a_ratio_of_sums():
    from conveyor.sim.report import stage_bubbles

    rows = [{"instance": 0, "stage": 0, "busy_s": 9.0, "idle_s": 1.0, "pending_s": 10.0},
            {"instance": 1, "stage": 0, "busy_s": 5.0, "idle_s": 15.0, "pending_s": 20.0},
            {"instance": 0, "stage": 1, "busy_s": 0.0, "idle_s": 0.0, "pending_s": 0.0}]
    folded = stage_bubbles(rows)
    assert [r["stage"] for r in folded] == [0, 1]
    # The busy instance weighs by its pending time: 16 / 30, not the mean of 0.1 and 0.75.
    assert folded[0]["bubble_ratio"] == pytest.approx(16 / 30)
    assert folded[1]["bubble_ratio"] is None
