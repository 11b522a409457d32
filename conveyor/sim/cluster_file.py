"""The cluster file's schema: its TOML sections as typed, validated structs (resolved into a
ClusterConfig by cluster.py). Unknown keys and wrong types are errors naming the key.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from common.config import KVCacheConfig, PlacementConfig
from common.prediction.config import PredictorConfig


class ClusterError(ValueError):
    """A cluster file is missing, malformed or inconsistent."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ModelSection(PlacementConfig):
    """`conveyor serve`'s placement settings (max_model_len, layer_split, placement,
    head_weight: common.config.PlacementConfig), on a named shape instead of weights."""

    shape: str = "smollm2-135m"
    """A named model shape (common/model/shape.py NAMED_SHAPES)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights, activations and KV dtype: sizes the KV pool and the activations sent."""


class ClusterSection(_Section):
    instances: int = 1
    stages: int = 2
    routing: Literal["least-loaded", "round-robin"] = "least-loaded"
    """A router of common/scheduling/routing.py, as the controller's deployment.routing:
    least-loaded (fewest tokens still to process, InstanceCore.load) or round-robin."""
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


class LinkSection(_Section):
    bandwidth_gbps: float = 0.0
    """Gigabytes/s between consecutive stages; 0 uses the cost model's transfer_s."""
    latency_us: float = 0.0
    """Added to every stage-to-stage hop."""


class SimulatorSection(_Section):
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


class ClusterFile(_Section):
    name: str = ""
    model: ModelSection = msgspec.field(default_factory=ModelSection)
    cluster: ClusterSection = msgspec.field(default_factory=ClusterSection)
    kvcache: KVSection = msgspec.field(default_factory=KVSection)
    scheduler: dict[str, Any] = {}
    link: LinkSection = msgspec.field(default_factory=LinkSection)
    simulator: SimulatorSection = msgspec.field(default_factory=SimulatorSection)
    cost: dict[str, Any] = {}
    predictor: PredictorConfig = msgspec.field(default_factory=PredictorConfig)
