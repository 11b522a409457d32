"""`conveyor simulate`: a discrete-event simulator of Conveyor clusters.

It drives the very policy objects the controller runs (`common.scheduling`): every micro-batch
is the plan `policy.schedule(SchedulerSnapshot)` returns, carried out with the controller's
semantics (chunk accounting, awaiting tokens, max_inflight micro-batches in flight, preemption
by recompute, stop at max_tokens, blocks freed on finish), while a cost model
(`common.costmodel`: a measured profile or a roofline) says how long each stage takes.

Modules: `cluster` (the cluster file), `workload` (bench's datasets and arrivals, traces),
`state` (requests and instances as the controller keeps them), `pipeline` (FIFO stages and the
step-cost cache), `sharing` (stage processes sharing a host's cores), `engine` (the event
loop, routing, worker processes), `results` (the workers' counters merged) and `report`
(bench's figures and charts, plus the simulator's own).

    from conveyor.sim import load_cluster, build_cost_model, make_workload, simulate
    cfg = load_cluster("deploy/clusters/h100-4stage.toml")
    result = simulate(cfg, build_cost_model(cfg), make_workload("sharegpt", 500, 4.0))
"""

from conveyor.sim.cluster import ClusterConfig, ClusterError, build_cost_model, load_cluster
from conveyor.sim.engine import SimResult, simulate
from conveyor.sim.workload import Workload, WorkloadError, load_trace, make_workload

__all__ = ["ClusterConfig", "ClusterError", "SimResult", "Workload", "WorkloadError",
           "build_cost_model", "load_cluster", "load_trace", "make_workload", "simulate"]
