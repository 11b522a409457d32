"""What a simulation run yields: each worker's share of the counters (`shard_results`) and
their merge into one `SimResult` (`finalize`), in the controller's own metric types so that the
report can treat it as a controller snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from conveyor.sim.cluster import ClusterConfig
from conveyor.sim.requests import SimRequest
from conveyor.sim.state import SimInstance
from common.stats import ControllerMetrics, StageCounters, mean_std


@dataclass
class SimResult:
    cfg: ClusterConfig
    requests: list[SimRequest]
    """Every request of the workload, in workload order."""
    metrics: ControllerMetrics
    """The controller's counters over the run (same definitions as `conveyor stats`)."""
    instances: list[dict[str, Any]]
    stage_busy: dict[tuple[int, int], tuple[int, float, float]]
    """(instance, stage) -> (steps, busy seconds, input-wait seconds)."""
    end_s: float
    """Simulated time when the last event ran."""
    wall_s: float
    events: int
    policy_calls: int
    cost_cache: dict[str, int] = field(default_factory=dict)
    workers: int = 1
    cascade: dict[str, Any] | None = None
    """Length groups and migrations (conveyor/sim/cascade.py's report), when used."""

    @property
    def first_arrival_s(self) -> float:
        return min((r.arrival for r in self.requests), default=0.0)


def _instance_raw(inst: SimInstance) -> dict[str, Any]:
    tpb = inst.tokens_per_batch
    count, s, sq = tpb.count, tpb.sum, tpb.sumsq
    mean, std = mean_std(count, s, sq)
    return {"instance": inst.index, "kv_total_blocks": inst.total_blocks,
            "wait_area": inst.wait_area, "used_area": inst.used_area,
            "inflight_area": inst.inflight_area, "max_inflight": inst.max_inflight_seen,
            "max_waiting": inst.max_waiting, "max_used_blocks": inst.max_used,
            "micro_batches": count,
            "tokens_per_batch": {"count": count, "sum": s, "sumsq": sq, "mean": mean, "std": std},
            "preemptions": inst.preemptions, "finished": inst.finished,
            "policy_calls": inst.policy_calls, "samples": inst.samples,
            "stage_queue_area": list(inst.stage_queue_area),
            "stage_samples": inst.stage_samples}


def shard_results(shard: Any) -> dict[str, Any]:
    busy = {}
    for inst in shard.instances:
        p = inst.pipeline
        for s in range(p.num_stages):
            busy[(inst.index, s)] = (p.steps, p.busy[s], p.wait[s])
    return {"metrics": shard.metrics, "instances": [_instance_raw(i) for i in shard.instances],
            "busy": busy, "events": shard.queue.processed, "end": shard.queue.now,
            "policy_calls": sum(i.policy_calls for i in shard.instances),
            "cache": {"hits": shard.timer.hits, "misses": shard.timer.misses},
            "cascade": shard.cascade.report() if shard.cascade is not None else None}


def finalize(cfg: ClusterConfig, requests: list[SimRequest], parts: list[dict[str, Any]],
              wall: float, workers: int) -> SimResult:
    end = max(p["end"] for p in parts)
    metrics = ControllerMetrics(started=0.0, num_instances=cfg.instances)
    for part in parts:
        metrics.merge(part["metrics"])
    for clock in metrics.pending:
        clock.update(False, end)  # open only where requests never finished
    busy: dict = {}
    for p in parts:
        busy.update(p["busy"])
    # Stage counters in the controller's form (what StepDone reports per stage).
    for (i, s), (steps, b, w) in sorted(busy.items()):
        metrics.stages[(i, s)] = StageCounters(steps=steps, busy_s=b, wait_s=w)
    span = end if end > 0 else 1.0
    instances = []
    for raw in sorted((x for p in parts for x in p["instances"]), key=lambda d: d["instance"]):
        total = raw["kv_total_blocks"]
        wait_area, used_area, max_used = (raw.pop("wait_area"), raw.pop("used_area"),
                                          raw.pop("max_used_blocks"))
        queue_area = raw.pop("stage_queue_area")
        spread = metrics.length_spread[raw["instance"]]
        instances.append({**raw, "mean_waiting": wait_area / span,
                          "length_spread": spread.sum / spread.count if spread.count else None,
                          "mean_stage_queue": [a / span for a in queue_area],
                          "mean_inflight": raw.pop("inflight_area") / span,
                          "mean_kv_used": used_area / span / total if total else 0.0,
                          "max_kv_used": max_used / total if total else 0.0})
    requests.sort(key=lambda r: r.index)
    for r in requests:
        if not r.finished and not r.error:
            r.error = ("never finished: the policy returned empty plans with nothing in flight "
                       "(stalled)")
            metrics.finished["error"] += 1
    cache = {"hits": sum(p["cache"]["hits"] for p in parts),
             "misses": sum(p["cache"]["misses"] for p in parts)}
    return SimResult(cfg, requests, metrics, instances, busy, end, wall,
                     sum(p["events"] for p in parts), sum(p["policy_calls"] for p in parts),
                     cache, workers, parts[0].get("cascade"))
