"""HELR wired in: the split the stage workers, the profiler, `conveyor plan` and the simulator
use is the one answer of common/model/placement.py's stage_layout, which is the best placement
a brute force finds over the same roofline costs; the simulator times each stage on its own
device (hand-computed) and crosses a skipped device at the slower link; and fewer devices win
where they should."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from common.config import load_config
from common.config_resolve import resolve
from common.costmodel import StepCost
from common.costmodel.roofline import RooflineCostModel
from common.model.placement import deployment_layout, stage_layout
from common.model.shape import NAMED_SHAPES
from common.placement_config import HelrConfig, PlacementConfig
from conveyor.profile.measure import MeasureConfig
from conveyor.sim.cluster import build_cluster, build_cost_model
from conveyor.sim.engine import simulate
from conveyor.sim.pipeline import StepTimer
from conveyor.sim.workload import Workload

LLAMA = NAMED_SHAPES["llama3-8b"]
GIB = 1024**3
DEVICES = ["h200", "a100", "a100"]
MEMORY_GIB = {"h200": 141, "a100": 80}


def brute_force(devices: list[str], objective: str = "bottleneck") -> tuple[tuple, tuple]:
    """(devices used, layers each) minimizing the objective over every subsequence and split,
    straight from the roofline (reference micro-batch 512 prefill + 128 decodes at context
    1024, 128 x 2048 tokens of KV reserved per layer, 0.9 of memory less 2 GiB usable)."""
    models = [RooflineCostModel(LLAMA, d, 2) for d in devices]
    n, best = LLAMA.num_layers, (float("inf"), (), ())
    reserve = 128 * 2048 * 2 * LLAMA.kv_size * 2
    for k in range(1, len(devices) + 1):
        for used in itertools.combinations(range(len(devices)), k):
            for cuts in itertools.combinations(range(1, n), k - 1):
                counts = [b - a for a, b in zip((0, *cuts), (*cuts, n))]
                ends = [(s == 0, s == k - 1) for s in range(k)]
                if any(LLAMA.stage_param_count(c, f, last) * 2 + c * reserve
                       > MEMORY_GIB[devices[d]] * GIB * 0.9 - 2 * GIB
                       for d, c, (f, last) in zip(used, counts, ends)):
                    continue
                stages = [models[d].stage_step_s(StepCost(512, 128, 1024.0, 129, c, f, last))
                          for d, c, (f, last) in zip(used, counts, ends)]
                hops = [max(models[x].transfer_s(640) for x in range(a, b))
                        for a, b in zip(used, used[1:])]
                cost = max(stages + hops) if objective == "bottleneck" else sum(stages + hops)
                if cost < best[0] - 1e-12:
                    best = (cost, used, tuple(counts))
    return best[1], best[2]


def test_every_consumer_takes_helrs_split_which_a_brute_force_confirms(tmp_path):
    used, counts = brute_force(DEVICES)
    assert counts == (20, 6, 6) and used == (0, 1, 2)  # even would be 11 + 11 + 10
    bounds = ((0, 20), (20, 26), (26, 32))
    # The stage workers: deployment_layout of the resolved config (services/stage/worker.py).
    cfg = resolve(load_config(None, {"model.source": "llama3-8b", "model.devices": DEVICES,
                                     "model.placement": "helr", "deployment.stages": 0}))
    layout = deployment_layout(cfg, LLAMA)
    assert layout.bounds == bounds and layout.device_index == used
    assert [layout.device(s) for s in range(3)] == DEVICES
    # The simulator.
    sim = build_cluster({"model": {"shape": "llama3-8b", "dtype": "bfloat16",
                                   "devices": DEVICES, "placement": "helr"},
                         "cluster": {"stages": 0}})
    assert [(s.num_layers, s.device) for s in sim.stages] == list(zip(counts, DEVICES))
    # The profiler times each stage's share.
    place = PlacementConfig(placement="helr", devices=DEVICES)
    assert [MeasureConfig(stages=0, stage=s, placement=place).stage_bounds(LLAMA)
            for s in range(3)] == list(bounds)
    # `conveyor plan`, a real process.
    out = subprocess.run([sys.executable, "-m", "conveyor.cli", "plan", "--model", "llama3-8b",
                          "--devices", ",".join(DEVICES), "--json"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert [tuple(r["layers"]) for r in json.loads(out)["stage_rows"]] == list(bounds)


def test_the_sum_objective_takes_fewer_devices_as_the_brute_force_does():
    used, counts = brute_force(DEVICES, "sum")
    layout = stage_layout(LLAMA, PlacementConfig(placement="helr", devices=DEVICES,
                                                 helr=HelrConfig(objective="sum")), 0,
                          "bfloat16")
    assert (layout.device_index, tuple(layout.counts)) == (used, counts) == ((0,), (32,))


def test_a_profile_measures_the_stage_helr_gives_it():
    # tiny on an H100 PCIe then an H200: HELR gives 2 + 2, the balanced split 3 + 1.
    from conveyor.profile.measure import measure_profile

    place = PlacementConfig(placement="helr", devices=["h100-pcie", "h200"])
    assert stage_layout(NAMED_SHAPES["tiny"], place, 0).counts == [2, 2]
    assert stage_layout(NAMED_SHAPES["tiny"], PlacementConfig(), 2).counts == [3, 1]
    profile = measure_profile(MeasureConfig(source="tiny", stages=0, placement=place,
                                            prefill=[0, 16], decode=[0, 4], context=[64],
                                            head_rows=[1], repeats=1, threads=1,
                                            link="assume"))
    assert profile.num_layers == 2


def hand_decode_s(layers: int, memory_bandwidth: float, first: bool, last: bool) -> float:
    """One decode at context 0 through `layers` Llama-3-8B layers in bfloat16: memory-bound
    (the roofline's bytes over 80% of the bandwidth, plus 100 us)."""
    h, q, kv, inter, vocab = 4096, 4096, 1024, 14336, 128256
    params = h * (q + 2 * kv) + q * h + 3 * h * inter + 2 * h  # 218,112,000
    activations = 2 * (4 * h + 2 * q + 2 * kv + 3 * inter)
    per_layer = params * 2 + kv * 2 * 2 + activations * 2
    nbytes = layers * per_layer + (2 * h * 2 if first else 0) \
        + (vocab * h * 2 + vocab * 4 * 2 if last else 0)
    return nbytes / (memory_bandwidth * 0.8) + 100e-6


def test_the_simulator_times_each_stage_on_its_own_device():
    cfg = build_cluster({"model": {"shape": "llama3-8b", "dtype": "bfloat16",
                                   "devices": ["h100", "a100"], "layer_split": [16, 16]},
                         "cluster": {"stages": 0}})
    durations, hops, _ = StepTimer.for_cluster(cfg, build_cost_model(cfg))(0, 1, 0.0, 1)
    assert durations == pytest.approx((hand_decode_s(16, 3.35e12, True, False),
                                       hand_decode_s(16, 2.039e12, False, True)), rel=1e-9)
    assert durations[1] / durations[0] > 1.5  # the A100 reads its half at 2.039 of 3.35 TB/s
    assert hops == pytest.approx((10e-6 + 4096 * 2 / 450e9,))  # the H100's NVLink


def test_a_hop_past_a_skipped_device_goes_at_the_slower_link():
    # The middle A100 has 2.1 GiB: 0.9 of it less 2 GiB of working room holds no layer, so
    # HELR skips it; the hop from the first H200 to the last crosses its link too.
    cfg = build_cluster({"model": {"shape": "llama3-8b", "dtype": "bfloat16",
                                   "devices": ["h200", "a100:2.1", "h200"], "placement": "helr"},
                         "cluster": {"stages": 0}})
    assert [(s.device, s.link) for s in cfg.stages] == [("h200", ("h200", "a100:2.1")),
                                                        ("h200", ())]
    _, hops, _ = StepTimer.for_cluster(cfg, build_cost_model(cfg))(512, 128, 1024.0, 129)
    assert hops == pytest.approx((10e-6 + 640 * 4096 * 2 / 300e9,))  # the A100's 300 GB/s


def one_request(cfg) -> float:
    """A lone request's time per output token in the simulator."""
    wl = Workload([0.0], [256], [64])
    (r,) = simulate(cfg, build_cost_model(cfg), wl).requests
    return r.timings()["tpot_s"]


def test_fewer_devices_win_in_the_simulator_where_helr_says_so():
    def hetero(placement: str, objective: str = "bottleneck", **link):
        return build_cluster({"model": {"shape": "llama3-8b", "dtype": "bfloat16",
                                        "devices": ["h100", "h100"], "placement": placement,
                                        "helr": {"objective": objective}},
                              "cluster": {"stages": 0}, "link": link})

    # For one request's latency (sum) a second stage only adds its overhead and a hop.
    alone, both = hetero("helr", "sum"), hetero("even")
    assert [s.num_layers for s in alone.stages] == [32]
    assert [s.num_layers for s in both.stages] == [16, 16]
    assert one_request(alone) < one_request(both)
    # For throughput a link too slow to be worth crossing: 1 MB/s, seconds a hop.
    slow = hetero("helr", bandwidth_gbps=0.001)
    assert [s.num_layers for s in slow.stages] == [32]
    assert [s.num_layers for s in hetero("helr", bandwidth_gbps=100.0).stages] == [16, 16]
