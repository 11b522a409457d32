"""What the simulator models of a deployment on one machine: stage processes sharing the
host's cores, an ingress that takes a burst one request at a time, and a scheduling loop that
waits for each dispatch's KV allocation. Latencies are computed by hand."""

from __future__ import annotations

import pytest

from conveyor.sim.cluster import ClusterConfig, build_cluster
from conveyor.sim.engine import EventQueue, simulate
from conveyor.sim.pipeline import StepTimer
from conveyor.sim.sharing import SharedHostPipeline
from conveyor.sim.workload import Workload
from tests.unit.test_sim_engine import LinearCost, burst


def run_pipeline(stages: int, cores: int, dispatches: list[tuple],
                 corun: float = 1.0) -> tuple[list[float], SharedHostPipeline]:
    """Dispatches (time, stage durations[, co-run speed]) to a shared-host pipeline; returns
    completion times in completion order."""
    queue = EventQueue()
    pipe = SharedHostPipeline(stages, cores, queue.push)
    done: list[float] = []
    for at, durations, *own in dispatches:
        queue.run_until(at)
        pipe.submit(at, durations, (0.0,) * (stages - 1), lambda _, t: done.append(t), None, *(own or [corun]))
    queue.run()
    return done, pipe


def test_three_stages_on_two_cores_run_at_two_thirds_speed_while_all_are_busy():
    # Three micro-batches of 1 s per stage, dispatched together. Until t=2 at most two stages
    # run; from 2 to 3.5 all three do, at 2/3 speed, so the 1 s steps take 1.5 s.
    done, pipe = run_pipeline(3, 2, [(0.0, (1.0, 1.0, 1.0))] * 3)
    assert done == pytest.approx([3.5, 4.5, 5.5])
    assert pipe.busy == pytest.approx([3.5, 3.5, 3.5])  # wall time, as a stage measures it
    own, _ = run_pipeline(3, 3, [(0.0, (1.0, 1.0, 1.0))] * 3)
    assert own == pytest.approx([3.0, 4.0, 5.0])


def test_a_later_dispatch_slows_down_a_step_already_running():
    # One core, two stages. The first micro-batch's stage 1 starts at 1 with 1 s of work; the
    # second arrives at stage 0 at 1.5, so from then on each gets half the core: the remaining
    # 0.5 s of the first takes 1 s (done at 2.5), and the second's stage 0 has 0.5 s left at
    # 2.5, alone again: done at 3.0, then its stage 1 to 4.0.
    done, pipe = run_pipeline(2, 1, [(0.0, (1.0, 1.0)), (1.5, (1.0, 1.0))])
    assert done == pytest.approx([2.5, 4.0])
    assert pipe.busy == pytest.approx([2.5, 2.5])
    assert pipe.steps == 2


def test_input_wait_is_counted_on_later_stages_only():
    # A lone micro-batch: stage 1 holds the plan from dispatch (0) and waits 2 s for stage 0.
    _, pipe = run_pipeline(2, 1, [(0.0, (2.0, 1.0))])
    assert pipe.wait == pytest.approx([0.0, 2.0])


def test_a_shared_host_lowers_simulated_throughput():
    wl = burst(24, 64, 40)
    base = {"model": {"shape": "tiny", "max_model_len": 2048},
            "kvcache": {"num_blocks": 4096, "block_size": 16}, "scheduler": {"policy": "fcfs"}}
    alone = simulate(build_cluster({**base, "cluster": {"stages": 3}}), LinearCost(), wl)
    shared = simulate(build_cluster({**base, "cluster": {"stages": 3, "host_cores": 2}}),
                      LinearCost(), wl)
    assert all(r.finished for r in shared.requests)
    assert 1.1 * alone.end_s < shared.end_s < 1.5 * alone.end_s + 1e-9


def with_cluster(**cluster: object) -> ClusterConfig:
    return build_cluster({"model": {"shape": "tiny", "max_model_len": 2048},
                          "cluster": cluster, "kvcache": {"num_blocks": 4096, "block_size": 16},
                          "scheduler": {"policy": "fcfs"}})


def with_sim(stages: int, **simulator: float) -> ClusterConfig:
    """A tiny fcfs cluster with [simulator] settings."""
    return build_cluster({"model": {"shape": "tiny", "max_model_len": 2048},
                          "cluster": {"stages": stages},
                          "kvcache": {"num_blocks": 4096, "block_size": 16},
                          "scheduler": {"policy": "fcfs"},
                          "simulator": {"waiting_head": -1, **simulator}})


def test_a_serial_ingress_spreads_a_burst_and_latency_counts_from_the_send():
    cost = LinearCost(10e-3, 0, 0)  # every step 10 ms
    # Without an ingress delay the four requests share the first micro-batch.
    res = simulate(with_sim(1), cost, burst(4, 8, 1))
    assert [r.first_token for r in res.requests] == pytest.approx([0.010] * 4)
    # With 1 ms per request the first reaches the controller alone at 1 ms (done at 11 ms);
    # the others arrive at 2, 3 and 4 ms and go in the next micro-batch, done at 21 ms.
    res = simulate(with_sim(1, ingress_us=1000), cost, burst(4, 8, 1))
    assert [r.first_token for r in res.requests] == pytest.approx([0.011] + [0.021] * 3)
    assert [r.arrival for r in res.requests] == [0.0] * 4  # TTFT from the client's send
    assert [r.first_scheduled for r in res.requests] == pytest.approx([0.001] + [0.011] * 3)


def test_the_scheduling_loop_waits_out_each_dispatch():
    cost = LinearCost(10e-3, 0, 0)
    arrivals = Workload([0.0, 0.001, 0.002], [8, 8, 8], [1, 1, 1])
    # Two stages, two micro-batches in flight. The first is planned at 0 and reaches stage 0
    # at 5 ms (done at 25 ms); the loop is held until 5 ms, when both later arrivals are
    # there: they share the second micro-batch, whose stage 0 follows the first's (15-25 ms).
    res = simulate(with_sim(2, dispatch_latency_us=5000), cost, arrivals)
    assert [r.first_scheduled for r in res.requests] == pytest.approx([0.0, 0.005, 0.005])
    assert [r.first_token for r in res.requests] == pytest.approx([0.025, 0.035, 0.035])
    # Without a latency each arrival gets a micro-batch of its own at once (two in flight),
    # and the third waits for the first to finish at 20 ms.
    res = simulate(with_sim(2), cost, arrivals)
    assert [r.first_scheduled for r in res.requests] == pytest.approx([0.0, 0.001, 0.020])


def test_stages_computing_together_run_at_the_corun_speed():
    # Two stages on two cores: no sharing of cores, but at 0.8 speed while both compute.
    # Second micro-batch's stage 0 overlaps the first's stage 1 from 1 s: both 1 s steps take
    # 1.25 s (done 2.25), then the second's stage 1 runs alone (1 s).
    done, _ = run_pipeline(2, 2, [(0.0, (1.0, 1.0)), (0.0, (1.0, 1.0))], corun=0.8)
    assert done == pytest.approx([2.25, 3.25])
    # The same through the simulator: two requests 1 ms apart, a micro-batch each, 10 ms per
    # stage. Alone: the second's stage 0 runs 10-20 ms, its stage 1 20-30 ms. At 0.8: the
    # first's stage 1 and the second's stage 0 share 10-22.5 ms, then the second's stage 1
    # runs alone until 32.5 ms.
    two = Workload([0.0, 0.001], [8, 8], [1, 1])
    alone = simulate(with_cluster(stages=2, host_cores=2), LinearCost(10e-3, 0, 0), two)
    assert alone.end_s == pytest.approx(0.030)
    res = simulate(with_cluster(stages=2, host_cores=2, host_corun_speed=0.8),
                   LinearCost(10e-3, 0, 0), two)
    assert res.end_s == pytest.approx(0.0325)


def test_each_micro_batch_runs_at_its_own_corun_speed():
    # Two stages, two cores; a micro-batch at co-run speed 1 then one at 0.5, both dispatched
    # at 0: from 1 s the first's stage 1 runs at full speed (done 2.0) while the second's
    # stage 0 does 0.5 s of its work; alone from 2.0 it finishes at 2.5, its stage 1 at 3.5.
    done, _ = run_pipeline(2, 2, [(0.0, (1.0, 1.0), 1.0), (0.0, (1.0, 1.0), 0.5)])
    assert done == pytest.approx([2.0, 3.5])


def test_the_corun_speed_of_a_micro_batch_follows_its_prefill_size_and_mix():
    cost = LinearCost(base=0.0, per_prefill=1e-3, per_decode=1e-3)
    curve = [[32, 0.8], [512, 1.0]]
    cfg = with_cluster(stages=2, host_cores=2, host_corun_speed=0.5, host_corun_prefill=curve)
    assert [cfg.corun_speed(n) for n in (1, 32, 272, 512, 4096)] == pytest.approx(
        [0.8, 0.8, 0.9, 1.0, 1.0])
    timer = StepTimer.for_cluster(cfg, cost)
    assert timer(0, 10, 100.0, 10)[2] == 0.5  # decode only
    assert timer(272, 0, 0.0, 1)[2] == pytest.approx(0.9)  # prefill only, on the curve
    # 30 prefill + 10 decode tokens at 1 ms each: 3/4 of the time is prefill work at 0.8 and
    # 1/4 decode work at 0.5, so 1 s alone takes 0.75 / 0.8 + 0.25 / 0.5 s beside another stage
    assert timer(30, 10, 100.0, 11)[2] == pytest.approx(1 / (0.75 / 0.8 + 0.25 / 0.5))
    # no curve: prefill contends as decode does; nothing set: nothing slows
    assert StepTimer.for_cluster(with_cluster(stages=2, host_cores=2, host_corun_speed=0.5),
                                 cost)(30, 10, 100.0, 11)[2] == 0.5
    assert StepTimer.for_cluster(with_cluster(stages=2, host_cores=2), cost)(30, 10, 100.0,
                                                                            11)[2] == 1.0
    # and through the simulator: the run whose prefill work contends less finishes sooner
    wl = Workload([0.004 * i for i in range(6)], [48] * 6, [6] * 6)  # overlapping batches
    faster = simulate(cfg, cost, wl)
    slower = simulate(with_cluster(stages=2, host_cores=2, host_corun_speed=0.5), cost, wl)
    assert faster.end_s < slower.end_s
