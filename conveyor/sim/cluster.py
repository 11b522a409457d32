"""The simulated cluster: a TOML file (see deploy/clusters/*.toml; schema in cluster_file.py)
resolved into a ClusterConfig: stage layer counts, KV pool size, the policy's settings.

    [model]      shape (a NAMED_SHAPES entry), max_model_len, layer_split or placement
                 (balanced | even | helr, head_weight, devices, [model.helr]: as `conveyor
                 serve`), dtype. With devices, each stage is timed by its own device's
                 roofline, its KV pool sized by that device's memory, and cluster.stages may
                 be 0 (as many stages as the placement uses)
    [cluster]    instances, stages, routing; host_cores, host_corun_speed, host_corun_prefill
                 (stage processes sharing one machine's cores, and how much they slow each other)
    [kvcache]    block_size and the pool size per instance: num_blocks, or memory per stage
                 (memory_gib on CPU, like `conveyor serve`; gpu_memory_gib with
                 gpu_memory_utilization for GPUs, sized the way services/stage/devices.py does)
    [scheduler]  `conveyor serve`'s very section (common/scheduling/config.py): policy,
                 max_inflight and a [scheduler.NAME] table of settings per policy
    [link]       bandwidth_gbps (0: the cost model's transfer_s), latency_us (added per hop)
    [simulator]  dispatch_latency_us, ingress_us, waiting_head, context_quantum, sample_points,
                 stage_queue_samples, step_jitter, seed
    [predictor]  output-length prediction (common/prediction/config.py): mode auto | online |
                 oracle | off, and the model's settings
    [cascade]    CascadeInfer's migration, refinement and range-DP settings (cluster_file.py's
                 CascadeSection); cluster.groups holds the length groups
    [cost]       optional default cost model: device = "h100" (roofline, other keys passed to
                 RooflineCostModel) or profile = "PATH" (a `conveyor profile` JSON)

Unknown keys and wrong types are errors naming the key, as in common/config.py; inconsistent
values (a layer split that does not add up, a pool too small) are ClusterErrors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from common.scheduling.config import (SchedulerConfig, scheduler_section,
                                      written_scheduler_table)
from conveyor.sim.cluster_file import CascadeSection, ClusterError, ClusterFile, KVSection

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class StageSpec:
    num_layers: int
    first: bool
    last: bool
    device: str = ""
    """Its device as model.devices names it ("" on a cluster of identical devices)."""
    link: tuple[str, ...] = ()
    """The devices whose links its hop to the next stage crosses (StageLayout.link_devices)."""


@dataclass
class ClusterConfig:
    """A resolved cluster: everything the simulator needs, validated."""

    name: str
    shape_name: str
    shape: Any
    """common.model.shape.ModelShape"""
    instances: int
    stages: list[StageSpec]
    max_model_len: int
    dtype: str
    block_size: int
    num_blocks: int
    """KV blocks per instance (the smallest of its stages' pools, as the controller takes)."""
    policy: str
    scheduler: SchedulerConfig
    max_inflight: int
    routing: str = "least-loaded"
    host_cores: int = 0
    host_corun_speed: float = 1.0
    host_corun_prefill: tuple[tuple[int, float], ...] = ()
    link_bandwidth_bytes_s: float = 0.0
    link_latency_s: float = 0.0
    dispatch_latency_s: float = 0.0
    ingress_s: float = 0.0
    waiting_head: int = 0
    context_quantum: float = 1.0
    sample_points: int = 400
    stage_queue_samples: bool = False
    step_jitter: float = 0.0
    seed: int = 0
    cost: dict[str, Any] = field(default_factory=dict)
    kv_sizing: str = ""
    """How num_blocks was reached (for the report)."""
    predictor: Any = None
    """common.prediction.config.PredictorConfig (None: the defaults)."""
    groups: str = ""
    """cluster.groups: a length-groups spec, "auto" (the range DP) or "" (none)."""
    cascade: CascadeSection = field(default_factory=CascadeSection)

    @property
    def uses_cascade(self) -> bool:
        """Length groups or migration: the instances then interact beyond routing."""
        return self.routing == "length-groups" or bool(self.cascade.migration)

    def prediction_mode(self) -> str:
        """online, oracle or off: what the simulated instances do for this policy."""
        from common.prediction.config import PredictorConfig

        return (self.predictor or PredictorConfig()).active_mode(self.make_policy(), True)

    @property
    def corun_slows(self) -> bool:
        """Stages on a shared host slow each other beyond the sharing of cores."""
        return self.host_cores > 0 and (self.host_corun_speed < 1 or any(
            speed < 1 for _, speed in self.host_corun_prefill))

    def corun_speed(self, prefill_tokens: int) -> float:
        """Co-run speed of a prefill of this many tokens (host_corun_prefill interpolated)."""
        points = self.host_corun_prefill
        if not points:
            return self.host_corun_speed
        if prefill_tokens <= points[0][0]:
            return points[0][1]
        for (n0, v0), (n1, v1) in zip(points, points[1:]):
            if prefill_tokens <= n1:
                return v0 + (v1 - v0) * (prefill_tokens - n0) / (n1 - n0)
        return points[-1][1]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def activation_bytes_per_token(self) -> int:
        return self.shape.hidden_size * DTYPE_BYTES[self.dtype]

    def describe_head(self) -> str:
        """The waiting head a policy is shown (simulator.waiting_head), in words."""
        from conveyor.sim.state import waiting_need  # the rule the instances apply

        need = waiting_need(self.make_policy(), self.waiting_head)
        if need.whole:
            return "the whole queue"
        seats = f"free seats + 1 (at least {need.min_requests})" if need.max_num_seqs else \
            f"{need.min_requests}"
        ranked = f", and the first {need.ranked} in the policy's order" if need.rank else ""
        return f"{seats} requests and {need.tokens} pending tokens{ranked}"

    def make_policy(self):
        return self.scheduler.build_policy()

    def with_policy(self, policy: str, **settings: Any) -> "ClusterConfig":
        """A copy running `policy` (checked), with some of its settings changed."""
        cfg = dataclasses.replace(self, policy=policy,
                                  scheduler=self.scheduler.with_settings(policy, **settings))
        _check_policy(cfg)
        return cfg

    def describe(self) -> dict[str, Any]:
        """The resolved configuration, for result files."""
        return {"name": self.name, "shape": self.shape_name, "instances": self.instances,
                "stages": self.num_stages,
                "layer_split": [s.num_layers for s in self.stages],
                "stage_devices": [s.device for s in self.stages if s.device],
                "max_model_len": self.max_model_len, "dtype": self.dtype,
                "block_size": self.block_size, "kv_blocks_per_instance": self.num_blocks,
                "kv_sizing": self.kv_sizing, "policy": self.policy,
                "scheduler": written_scheduler_table(self.scheduler),
                "max_inflight": self.max_inflight, "routing": self.routing,
                "host_cores": self.host_cores, "host_corun_speed": self.host_corun_speed,
                "host_corun_prefill": [list(p) for p in self.host_corun_prefill],
                "link_bandwidth_bytes_s": self.link_bandwidth_bytes_s,
                "link_latency_s": self.link_latency_s,
                "dispatch_latency_s": self.dispatch_latency_s, "ingress_s": self.ingress_s,
                "waiting_head": self.describe_head(), "context_quantum": self.context_quantum,
                "step_jitter": self.step_jitter, "seed": self.seed, "cost": dict(self.cost),
                "predictor": self.prediction_mode(), "groups": self.groups,
                "cascade": msgspec.to_builtins(self.cascade)}


def named_shape(name: str) -> Any:
    from common.model.shape import NAMED_SHAPES

    try:
        return NAMED_SHAPES[name]
    except KeyError:
        raise ClusterError(f"unknown model shape {name!r}; choose from "
                           f"{', '.join(sorted(NAMED_SHAPES))}") from None


def kv_blocks_per_instance(shape: Any, stages: list[StageSpec], kv: KVSection,
                           dtype: str) -> tuple[int, str]:
    """The pool of one instance: the configured count, else the smallest stage's pool by the
    memory rule of services/stage/devices.py (on a GPU the weights are estimated from the
    shape, where a worker reads the memory it really uses). A stage on a named device
    (model.devices) has that device's memory."""
    from common.costmodel.devices import parse_device
    from common.model.device_plan import gpu_kv_blocks

    if kv.num_blocks:
        return kv.num_blocks, "kvcache.num_blocks"
    b = DTYPE_BYTES[dtype]
    counts = []
    for spec in stages:
        memory = (parse_device(spec.device).memory_bytes if spec.device
                  else kv.gpu_memory_gib * GIB)
        if memory > 0:
            counts.append(gpu_kv_blocks(shape, spec.num_layers, spec.first, spec.last, memory,
                                        kv.gpu_memory_utilization, b, kv.block_size))
        else:
            per_block = shape.kv_bytes_per_block(kv.block_size, spec.num_layers, b)
            counts.append(int(kv.memory_gib * GIB // per_block))
    blocks = min(counts)
    how = ("each device's memory x " if stages[0].device else
           f"gpu_memory_gib={kv.gpu_memory_gib:g} x " if kv.gpu_memory_gib > 0 else "")
    how = (f"{how}{kv.gpu_memory_utilization:g} less weights" if how
           else f"memory_gib={kv.memory_gib:g} per stage")
    if blocks < 1:
        raise ClusterError(f"no memory left for the KV cache ({how}): give kvcache more memory "
                           f"or set kvcache.num_blocks")
    return blocks, how


def _check_policy(cfg: ClusterConfig) -> None:
    try:
        cfg.make_policy()
    except ValueError as e:
        raise ClusterError(f"scheduler: {e}") from None


def build_cluster(raw: dict[str, Any], name: str = "") -> ClusterConfig:
    """A ClusterConfig from the parsed TOML (a dict); raises ClusterError naming the problem."""
    try:
        f = msgspec.convert(raw, ClusterFile)
    except msgspec.ValidationError as e:
        raise ClusterError(f"invalid cluster file: {e}") from None
    m, c, kv, sim = f.model, f.cluster, f.kvcache, f.simulator
    checks = [
        (c.instances >= 1, "cluster.instances must be >= 1"),
        (c.host_cores >= 0, "cluster.host_cores must be >= 0"),
        (0 < c.host_corun_speed <= 1, "cluster.host_corun_speed must be in (0, 1]"),
        (all(0 < speed <= 1 for _, speed in c.host_corun_prefill),
         "cluster.host_corun_prefill: every speed must be in (0, 1]"),
        (all(a[0] < b[0] for a, b in zip(c.host_corun_prefill, c.host_corun_prefill[1:]))
         and all(n >= 1 for n, _ in c.host_corun_prefill),
         "cluster.host_corun_prefill: token counts must be >= 1 and increasing"),
        (kv.gpu_memory_gib >= 0, "kvcache.gpu_memory_gib must be >= 0"),
        (not (m.devices and kv.gpu_memory_gib), "kvcache.gpu_memory_gib and model.devices: "
         "each device has its memory (name:GIB sets another), give only the devices"),
        (f.link.bandwidth_gbps >= 0, "link.bandwidth_gbps must be >= 0"),
        (f.link.latency_us >= 0, "link.latency_us must be >= 0"),
        (sim.dispatch_latency_us >= 0, "simulator.dispatch_latency_us must be >= 0"),
        (sim.ingress_us >= 0, "simulator.ingress_us must be >= 0"),
        (sim.waiting_head >= -1, "simulator.waiting_head must be -1, 0 or a positive count"),
        (sim.context_quantum >= 0, "simulator.context_quantum must be >= 0"),
        (sim.sample_points >= 2, "simulator.sample_points must be >= 2"),
        (0 <= sim.step_jitter <= 1, "simulator.step_jitter must be in [0, 1]"),
    ]
    problems = [message for ok, message in checks if not ok]
    problems += m.problems(c.stages, "cluster.stages") + kv.problems()
    problems += f.cascade.problems(c.routing, c.groups, c.instances)
    if problems:
        raise ClusterError(problems[0])
    shape = named_shape(m.shape)
    from common.model.placement import stage_layout

    try:  # the very split (and devices) the stage workers and the profiler use
        layout = stage_layout(shape, m, c.stages, m.dtype, kv.gpu_memory_utilization,
                              f.link.bandwidth_gbps * 1e9, f.link.latency_us * 1e-6,
                              stages_key="cluster.stages")
    except ValueError as e:
        what = "model.placement" if m.devices else "model.layer_split"
        raise ClusterError(f"{what}: {e} ({m.shape} has {shape.num_layers} layers)") from None
    last = layout.num_stages - 1
    stages = [StageSpec(end - start, i == 0, i == last, layout.device(i), layout.link_devices(i))
              for i, (start, end) in enumerate(layout.bounds)]
    num_blocks, how = kv_blocks_per_instance(shape, stages, kv, m.dtype)
    try:
        sc = scheduler_section(f.scheduler)
    except ValueError as e:
        raise ClusterError(f"scheduler: {e}") from None
    cost = dict(f.cost)
    if cost.get("device") and cost.get("profile"):
        raise ClusterError("cost: give device or profile, not both")
    cfg = ClusterConfig(
        name=f.name or name, shape_name=m.shape, shape=shape, instances=c.instances,
        stages=stages, max_model_len=m.max_model_len, dtype=m.dtype, block_size=kv.block_size,
        num_blocks=num_blocks, policy=sc.policy, scheduler=sc,
        max_inflight=sc.max_inflight or len(stages), routing=c.routing,
        host_cores=c.host_cores, host_corun_speed=c.host_corun_speed,
        host_corun_prefill=tuple((int(n), float(v)) for n, v in c.host_corun_prefill),
        link_bandwidth_bytes_s=f.link.bandwidth_gbps * 1e9,
        link_latency_s=f.link.latency_us * 1e-6,
        dispatch_latency_s=sim.dispatch_latency_us * 1e-6, ingress_s=sim.ingress_us * 1e-6,
        waiting_head=sim.waiting_head,
        context_quantum=sim.context_quantum, sample_points=sim.sample_points,
        stage_queue_samples=sim.stage_queue_samples,
        step_jitter=sim.step_jitter, seed=sim.seed, cost=cost, kv_sizing=how,
        predictor=f.predictor, groups=c.groups, cascade=f.cascade)
    _check_policy(cfg)
    return cfg


def load_cluster(path: str | Path, overrides: dict[str, Any] | None = None) -> ClusterConfig:
    """Reads a cluster TOML (or JSON) file and applies dotted overrides such as
    {"scheduler.policy": "throttle", "cluster.instances": 4}."""
    from common.config import ConfigError, read_settings

    p = Path(path)
    try:
        raw = read_settings(p, overrides, what="cluster file")
    except ConfigError as e:
        raise ClusterError(str(e)) from None
    try:
        return build_cluster(raw, name=p.stem)
    except ClusterError as e:
        raise ClusterError(f"{p}: {e}") from None


# ---- cost models --------------------------------------------------------------------------------

def build_cost_model(cfg: ClusterConfig, profile: str | Path | None = None,
                     device: str | None = None) -> Any:
    """The cost model named on the command line (--profile or --device), else the cluster's
    [cost] section. The implementations are imported only when asked for."""
    if profile and device:
        raise ClusterError("give --profile or --device, not both")
    extra = {k: v for k, v in cfg.cost.items() if k not in ("device", "profile")}
    if cfg.stages[0].device:
        other = profile or device or cfg.cost.get("profile") or cfg.cost.get("device")
        if other:
            raise ClusterError(f"model.devices times each stage by its own device's roofline: "
                               f"drop the other cost model ({other})")
        from conveyor.sim.pipeline import StageCosts

        try:
            return StageCosts.rooflines(cfg.shape, cfg.stages, DTYPE_BYTES[cfg.dtype], **extra)
        except (TypeError, ValueError) as e:
            raise ClusterError(f"cost model of the devices: {e}") from None
    if not profile and not device:
        profile, device = cfg.cost.get("profile") or None, cfg.cost.get("device") or None
    if profile:
        from common.costmodel.profile_model import ProfileCostModel

        try:
            return ProfileCostModel.load(profile, cfg.shape)
        except (OSError, ValueError) as e:
            raise ClusterError(f"cost profile {profile}: {e}") from None
    if device:
        from common.costmodel.roofline import RooflineCostModel

        try:
            return RooflineCostModel(cfg.shape, device=device,
                                     dtype_bytes=DTYPE_BYTES[cfg.dtype], **extra)
        except (TypeError, ValueError) as e:
            raise ClusterError(f"cost model for device {device!r}: {e}") from None
    raise ClusterError("no cost model: pass --profile FILE (from `conveyor profile`) or "
                       "--device NAME (roofline), or give the cluster file a [cost] section")
