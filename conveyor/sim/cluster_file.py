"""The cluster file's schema: its TOML sections as typed, validated structs (resolved into a
ClusterConfig by cluster.py). Unknown keys and wrong types are errors naming the key.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from common.config import KVCacheConfig, PlacementConfig
from common.prediction.config import PredictorConfig
from common.config_section import Section


class ClusterError(ValueError):
    """A cluster file is missing, malformed or inconsistent."""


class ModelSection(PlacementConfig):
    """`conveyor serve`'s placement settings (max_model_len, layer_split, placement,
    head_weight: common.config.PlacementConfig), on a named shape instead of weights."""

    shape: str = "smollm2-135m"
    """A named model shape (common/model/shape.py NAMED_SHAPES)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights, activations and KV dtype: sizes the KV pool and the activations sent."""


class ClusterSection(Section):
    instances: int = 1
    stages: int = 2
    routing: Literal["least-loaded", "round-robin", "length-groups"] = "least-loaded"
    """A router of common/scheduling/routing.py, as the controller's deployment.routing:
    least-loaded (fewest tokens still to process, InstanceCore.load), round-robin, or
    length-groups (CascadeInfer: `groups`, then the less loaded of two of the group's)."""
    groups: str = ""
    """With length-groups: LO-HI:INSTANCES ranges in instance order ("0-512:2,512-:1"), or
    "auto": the range DP (common/scheduling/range_dp.py) on the workload's lengths."""
    host_cores: int = 0
    """CPU cores an instance's stage processes share (a CPU deployment on one machine); 0: a
    device each (sharing.py explains the sharing model)."""
    host_corun_speed: float = 1.0
    """With host_cores: the speed of a stage's decode work while another stage computes too
    (shared caches and memory bandwidth), as a fraction of its speed alone, on top of the
    sharing of cores (scripts/measure_host_corun.py measures it)."""
    host_corun_prefill: list[tuple[int, float]] = []
    """The same for prefill work, as [tokens, speed] points (interpolated, flat beyond the
    ends): a long prefill is compute-bound and contends less than decode, a short one streams
    the weights as a decode does. Empty: as decode. A mixed micro-batch runs at the harmonic
    blend of the two by its time split (pipeline.py's StepTimer)."""


class KVSection(KVCacheConfig):
    """`conveyor serve`'s [kvcache] (memory_gib sizes a CPU stage's pool), plus a GPU's memory
    to size it as on a GPU. lease_blocks is accepted and plays no part: the simulator has no
    kv-cache manager round trip to avoid."""

    gpu_memory_gib: float = 0.0
    """>0: size as on a GPU of this much memory per stage: utilization share, less the stage's
    weights and 2 GiB of working room, as services/stage/devices.py does."""


class LinkSection(Section):
    bandwidth_gbps: float = 0.0
    """Gigabytes/s between consecutive stages; 0 uses the cost model's transfer_s."""
    latency_us: float = 0.0
    """Added to every stage-to-stage hop."""


class SimulatorSection(Section):
    dispatch_latency_us: float = 0.0
    """From the scheduling decision to stage 0 starting (the KV allocation round trip and the
    plan's sends). The instance's scheduling loop waits it out, as the controller's awaits the
    allocation, so requests arriving meanwhile can join the next micro-batch."""
    ingress_us: float = 0.0
    """Ingress time per request (validation, tokenization, forwarding), one request at a time:
    a burst reaches the controller spread out. Latencies still count from the client's send."""
    waiting_head: int = 0
    """Waiting requests passed in a snapshot: 0 = what the policy declares it needs
    (SchedulingPolicy.waiting_need, as the controller passes), N = the first N, -1 = the whole
    queue."""
    context_quantum: float = 1.0
    """Mean decode context is rounded to a multiple of this many tokens before costing (lets the
    step-cost cache hit); 0 = exact."""
    sample_points: int = 400
    stage_queue_samples: bool = False
    """Keep a time series of each stage's queue (micro-batches dispatched and not yet through
    it) beside the queue and KV samples, for plots (scripts/sim_planck.py). Off by default: it
    logs every stage's end of every micro-batch, a few percent of a large run's time; the
    time-averaged stage queues of every report come from the pipelines without it."""
    """About how many samples of each instance's queue and KV use the time series keep."""
    step_jitter: float = 0.0
    """Step-to-step scatter of stage times: each stage's time of each micro-batch is the cost
    model's times a log-normal factor of mean 1 and this coefficient of variation (0: exact).
    A real deployment's steps scatter (scripts/step_timeline.py measures it), and where the
    scheduling is path-dependent — which requests share a micro-batch for the rest of the run
    is settled by who came back first — a noiseless run follows one path; average several seeds
    for the expected figures."""
    seed: int = 0
    """Seeds the step-time noise (the same seed, the same run)."""


class CascadeSection(Section):
    """CascadeInfer's moving parts in the simulator (docs/scheduling.md, "CascadeInfer")."""

    migration: list[Literal["boundary", "balance"]] = []
    """Migration planners (common/scheduling/migration.py): boundary (a request whose context
    outgrew its group moves up), balance (Llumnix's: within a group, the most loaded sends its
    shortest running request to the least loaded when that narrows the gap). Empty: none."""
    plan_interval_ms: float = 50.0
    """How often the planners and the refinement look at the instances."""
    balance_min_gap: int = 0
    """balance leaves gaps of fewer tokens alone."""
    migration_stages: int = 3
    """Llumnix's live migration: KV copied in at most this many stages while decoding."""
    pause_blocks: int = 16
    """The request stops for the last copy once at most this many blocks are left to copy."""
    migration_bandwidth_gbps: float = 0.0
    """Gigabytes/s between stage s of two instances; 0: link.bandwidth_gbps, else the cost
    model's link."""
    migration_latency_us: float = 50.0
    """Added to every copy stage (the handshake and the commit)."""
    choices: int = 2
    """The router's power of d choices within a group."""
    refine: bool = False
    """Move boundaries toward balanced load between DP runs (group_refinement.py)."""
    refine_interval_s: float = 1.0
    hysteresis: float = 0.2
    refine_step: float = 0.1
    drift: float = 0.2
    """Re-run the DP (groups = auto) when the recent prompts' KS distance passes this."""
    replan_s: float = 0.0
    window: int = 2000
    dp_grid: int = 16
    dp_max_groups: int = 4
    dp_longest_quantile: float = 0.95

    def problems(self, routing: str, groups: str, instances: int) -> list[str]:
        from common.scheduling.length_groups import LengthGroups

        problems = []
        if routing == "length-groups":
            if not groups:
                problems.append("cluster.routing = length-groups needs cluster.groups (a spec "
                                "such as 0-512:2,512-:1, or auto)")
            elif groups != "auto":
                try:
                    LengthGroups.parse(groups, instances)
                except ValueError as e:
                    problems.append(f"cluster.groups: {e}")
        elif groups:
            problems.append(f"cluster.groups ({groups!r}) needs cluster.routing = length-groups")
        if "boundary" in self.migration and routing != "length-groups":
            problems.append("cascade.migration boundary needs length groups (cluster.routing = "
                            "length-groups)")
        checks = [(self.plan_interval_ms > 0, "cascade.plan_interval_ms must be > 0"),
                  (self.balance_min_gap >= 0, "cascade.balance_min_gap must be >= 0"),
                  (self.migration_stages >= 1, "cascade.migration_stages must be >= 1"),
                  (self.pause_blocks >= 0, "cascade.pause_blocks must be >= 0"),
                  (self.migration_bandwidth_gbps >= 0,
                   "cascade.migration_bandwidth_gbps must be >= 0"),
                  (self.migration_latency_us >= 0, "cascade.migration_latency_us must be >= 0"),
                  (self.choices >= 1, "cascade.choices must be >= 1"),
                  (self.refine_interval_s > 0, "cascade.refine_interval_s must be > 0"),
                  (self.hysteresis >= 0, "cascade.hysteresis must be >= 0"),
                  (0 < self.refine_step < 1, "cascade.refine_step must be in (0, 1)"),
                  (0 < self.drift <= 1, "cascade.drift must be in (0, 1]"),
                  (self.replan_s >= 0, "cascade.replan_s must be >= 0"),
                  (self.window >= 1, "cascade.window must be >= 1"),
                  (self.dp_grid >= 1, "cascade.dp_grid must be >= 1"),
                  (self.dp_max_groups >= 1, "cascade.dp_max_groups must be >= 1"),
                  (0 < self.dp_longest_quantile <= 1,
                   "cascade.dp_longest_quantile must be in (0, 1]")]
        return problems + [message for ok, message in checks if not ok]


class ClusterFile(Section):
    name: str = ""
    model: ModelSection = msgspec.field(default_factory=ModelSection)
    cluster: ClusterSection = msgspec.field(default_factory=ClusterSection)
    kvcache: KVSection = msgspec.field(default_factory=KVSection)
    scheduler: dict[str, Any] = {}
    link: LinkSection = msgspec.field(default_factory=LinkSection)
    simulator: SimulatorSection = msgspec.field(default_factory=SimulatorSection)
    cost: dict[str, Any] = {}
    predictor: PredictorConfig = msgspec.field(default_factory=PredictorConfig)
    cascade: CascadeSection = msgspec.field(default_factory=CascadeSection)
