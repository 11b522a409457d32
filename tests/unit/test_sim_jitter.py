"""Step-time noise in the simulator (simulator.step_jitter): the scatter has the asked-for mean
and spread, a seed reproduces a run, and jitter 0 leaves the noiseless simulator untouched."""

from __future__ import annotations

import statistics

import pytest

from conveyor.sim.cluster import ClusterError, build_cluster
from conveyor.sim.engine import simulate
from conveyor.sim.pipeline import StepTimer
from conveyor.sim.report import summarize
from conveyor.sim.workload import Workload
from tests.unit.test_sim_engine import LinearCost


def _cluster(jitter: float = 0.0, seed: int = 0, stages: int = 2):
    return build_cluster({
        "model": {"shape": "tiny", "max_model_len": 2048},
        "cluster": {"stages": stages},
        "kvcache": {"num_blocks": 4096, "block_size": 16},
        "scheduler": {"policy": "fcfs"},
        "simulator": {"step_jitter": jitter, "seed": seed},
    })


def _latencies(cfg) -> list[tuple[float, float]]:
    wl = Workload([0.01 * i for i in range(24)], [40 + 7 * i for i in range(24)],
                  [10 + (5 * i) % 17 for i in range(24)])
    result = simulate(cfg, LinearCost(), wl)
    return [(r.first_token, r.last_token) for r in result.requests]


def test_scattered_stage_times_have_mean_one_and_the_asked_spread():
    cost = LinearCost(base=0.01)
    exact = StepTimer.for_cluster(_cluster(), cost)(0, 8, 100.0, 8)[0]
    assert exact == (pytest.approx(0.01 + 8e-4),) * 2
    timer = StepTimer.for_cluster(_cluster(jitter=0.2), cost)
    draws = [timer(0, 8, 100.0, 8)[0] for _ in range(20000)]
    for stage in range(2):
        factors = [d[stage] / exact[stage] for d in draws]
        assert statistics.fmean(factors) == pytest.approx(1.0, abs=0.01)
        assert statistics.stdev(factors) == pytest.approx(0.2, abs=0.01)
        assert min(factors) > 0
    assert sum(d[0] != d[1] for d in draws) == len(draws)  # each stage draws its own factor


def test_a_seed_reproduces_a_noisy_run_and_another_seed_changes_it():
    first = _latencies(_cluster(jitter=0.15, seed=1))
    assert _latencies(_cluster(jitter=0.15, seed=1)) == first
    assert _latencies(_cluster(jitter=0.15, seed=2)) != first
    noiseless = _latencies(_cluster())
    assert noiseless != first
    # the noise is a scatter, not a bias: mean latencies stay close to the noiseless run's
    mean = statistics.fmean(f for _, f in first)
    assert mean == pytest.approx(statistics.fmean(f for _, f in noiseless), rel=0.1)


def test_zero_jitter_is_the_noiseless_simulator_whatever_the_seed():
    assert _latencies(_cluster(jitter=0.0, seed=5)) == _latencies(_cluster())
    summary = summarize(simulate(_cluster(), LinearCost(),
                                 Workload([0.0] * 4, [32] * 4, [8] * 4)))
    assert summary["completed"] == 4


@pytest.mark.parametrize("jitter", [-0.1, 1.5])
def test_an_out_of_range_jitter_is_refused_by_name(jitter):
    with pytest.raises(ClusterError, match="simulator.step_jitter must be in"):
        _cluster(jitter=jitter)
