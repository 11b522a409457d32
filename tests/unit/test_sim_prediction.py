"""The simulator drives the same predictor and policies: lengths are predicted at admission
and learned only from requests that have finished; the oracle mode shows the true ones."""

from __future__ import annotations

from pathlib import Path

from conveyor.sim.cluster import build_cost_model, load_cluster
from conveyor.sim.engine import simulate
from conveyor.sim.workload import Workload

CLUSTER = Path(__file__).resolve().parents[2] / "deploy/clusters/h100-llama3-8b.toml"


def spaced(n: int, output: int) -> Workload:
    """n requests a second apart (each finishes before the next arrives), ending at EOS."""
    return Workload([float(i) for i in range(n)], [64] * n, [output] * n).with_max_tokens(2048)


def test_the_simulated_predictor_learns_from_finished_requests_only():
    cfg = load_cluster(CLUSTER, {"scheduler.policy": "slo-odbs", "cluster.stages": 2})
    assert cfg.prediction_mode() == "online"
    result = simulate(cfg, build_cost_model(cfg), spaced(200, 40))
    preds = [r.predicted_output for r in sorted(result.requests, key=lambda r: r.index)]
    assert preds[0] == 128  # the prior: nothing has finished yet
    assert abs(preds[-1] - 40) <= 4  # learned from the 199 before it
    assert all(r.out == 40 for r in result.requests)  # predictions never cut a reply


def test_oracle_and_off_modes():
    cfg = load_cluster(CLUSTER, {"scheduler.policy": "slo-odbs", "predictor.mode": "oracle"})
    result = simulate(cfg, build_cost_model(cfg), spaced(5, 33))
    assert {r.predicted_output for r in result.requests} == {33}
    fcfs = load_cluster(CLUSTER, {"scheduler.policy": "fcfs"})
    assert fcfs.prediction_mode() == "off"  # auto: fcfs reads no predictions
    result = simulate(fcfs, build_cost_model(fcfs), spaced(5, 33))
    assert {r.predicted_output for r in result.requests} == {None}
