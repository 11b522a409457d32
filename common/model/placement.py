"""Which layers each pipeline stage runs: a dynamic program over per-layer cost (UELLM's layer
placement, reduced to what a chain of identical devices needs).

A pipeline runs at the pace of its slowest stage, so the split should minimize the largest
stage cost, not the difference in layer counts. The stages are not alike: the first also looks
up embeddings (cheap), the last also runs the final norm, the LM head and sampling. On a small
model the LM head is large — SmolLM2-135M's 49152 x 576 head has as many weights as eight of its
decoder layers — so an even split leaves the first stage idle while the last one works, which
is a pipeline bubble no scheduling policy can remove.

Costs are in "layer equivalents". A decode step reads every weight of its stage once, so the
head weighs (head weights / layer weights) when every token samples; a prefill chunk samples
one row, and the head weighs almost nothing. `head_weight` is the fraction of that full cost to
plan for; the default 0.5 stands for micro-batches that mix prefill chunks and decodes.
`memory_cap_layers` bounds how many layers one stage may hold (device memory), the second
constraint of UELLM's program; inter-stage link cost does not depend on where a contiguous
split falls (every boundary carries one hidden vector per token), so it drops out.

Devices that differ (`model.devices`) are HELR's case: `stage_layout` below hands them to the
program of helr.py with per-device roofline costs (device_plan.py); it is the function every
consumer of a split calls (stage workers, the profiler, `conveyor plan`, the simulator).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.model.shape import ModelShape
from common.model.source import split_layers

DEFAULT_HEAD_WEIGHT = 0.5


def head_cost_in_layers(shape: ModelShape, head_weight: float = DEFAULT_HEAD_WEIGHT) -> float:
    """The last stage's extra work (final norm + LM head), in decoder-layer equivalents."""
    head_params = shape.vocab_size * shape.hidden_size + shape.hidden_size
    return head_weight * head_params / shape.layer_param_count()


def min_max_partition(costs: Sequence[float], stages: int, first_extra: float = 0.0,
                      last_extra: float = 0.0, max_layers: int | None = None) -> list[int]:
    """Layer counts per stage (contiguous, each >= 1) minimizing the costliest stage, where a
    stage costs the sum of its layers' costs, plus `first_extra` on the first stage and
    `last_extra` on the last. Among splits with the same maximum, the DP keeps the first it
    meets. O(stages x layers^2), which is nothing at model sizes."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} layers over {stages} stages")
    cap = max_layers or n
    if cap * stages < n:
        raise ValueError(f"{n} layers do not fit in {stages} stages of at most {cap} layers")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the smallest possible max stage cost placing layers [0, i) on stages [0, s).
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        extra_first = first_extra if s == 1 else 0.0
        for i in range(s, n - (stages - s) + 1):
            extra = extra_first + (last_extra if s == stages else 0.0)
            for j in range(max(s - 1, i - cap), i):
                if best[s - 1][j] == inf:
                    continue
                cost = max(best[s - 1][j], prefix[i] - prefix[j] + extra)
                if cost < best[s][i] - 1e-12:
                    best[s][i], cut[s][i] = cost, j
    counts, i = [], n
    for s in range(stages, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


def balanced_layer_split(shape: ModelShape, stages: int,
                         head_weight: float = DEFAULT_HEAD_WEIGHT,
                         max_layers: int | None = None) -> list[int]:
    """Layer counts per stage for `shape` that balance the stages' work, LM head included."""
    return min_max_partition([1.0] * shape.num_layers, stages,
                             last_extra=head_cost_in_layers(shape, head_weight)
                             if stages > 1 else 0.0,
                             max_layers=max_layers)


def stage_layer_bounds(shape: ModelShape, stages: int, explicit: Sequence[int] = (),
                       placement: str = "balanced",
                       head_weight: float = DEFAULT_HEAD_WEIGHT) -> list[tuple[int, int]]:
    """[start, end) layers of every stage: the explicit counts when given, else the placement's
    (what stage workers, the profiler and the simulator all use, so they agree)."""
    if explicit:
        return split_layers(shape.num_layers, stages, explicit)
    if placement == "even":
        return split_layers(shape.num_layers, stages)
    if placement != "balanced":
        raise ValueError(f"unknown placement {placement!r}; choose balanced or even (helr "
                         f"needs model.devices: stage_layout)")
    return split_layers(shape.num_layers, stages,
                        balanced_layer_split(shape, stages, head_weight))


@dataclass(frozen=True)
class StageLayout:
    """Where each stage of an instance runs: its layers and, with model.devices, its device."""

    bounds: tuple[tuple[int, int], ...]
    """[start, end) layers of every stage."""
    device_index: tuple[int, ...] = ()
    """Each stage's index in `devices` (empty without devices)."""
    devices: tuple[str, ...] = ()
    """model.devices as written (the placement may leave some out)."""

    @property
    def num_stages(self) -> int:
        return len(self.bounds)

    @property
    def counts(self) -> list[int]:
        return [end - start for start, end in self.bounds]

    def device(self, stage: int) -> str:
        """The device entry stage `stage` runs on ("" without devices)."""
        return self.devices[self.device_index[stage]] if self.devices else ""

    def link_devices(self, stage: int) -> tuple[str, ...]:
        """The devices whose links the hop from `stage` to the next crosses (more than one
        when the placement skips a device: the slowest of them sets the hop, as HELR plans)."""
        if not self.devices or stage + 1 >= self.num_stages:
            return ()
        return tuple(self.devices[k] for k in range(self.device_index[stage],
                                                    self.device_index[stage + 1]))


def device_planner(shape: ModelShape, model: Any, dtype: str = "auto",
                   gpu_memory_utilization: float = 0.9, link_bandwidth_bytes_s: float = 0.0,
                   link_latency_s: float = 0.0):
    """The DevicePlanner (device_plan.py) of `model` (a common.placement_config.PlacementConfig
    with devices) for `shape`."""
    from common.model.device_plan import DevicePlanner, placement_dtype_bytes

    return DevicePlanner(shape, model.devices, model.helr, model.max_model_len,
                         placement_dtype_bytes(dtype), gpu_memory_utilization,
                         link_bandwidth_bytes_s, link_latency_s)


def stage_layout(shape: ModelShape, model: Any, stages: int, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.9, link_bandwidth_bytes_s: float = 0.0,
                 link_latency_s: float = 0.0,
                 stages_key: str = "deployment.stages") -> StageLayout:
    """The one answer to which layers each stage runs, on which device: what stage workers,
    the profiler, `conveyor plan` and the simulator all use, so that they agree.

    `model` is a common.placement_config.PlacementConfig (a deployment's [model] or a cluster
    file's); `stages` the deployment's stage count (0: as many as the placement uses, which
    needs model.devices). Without devices: `stage_layer_bounds`. With devices: stage i on
    device i for explicit, even and balanced splits; HELR's program for "helr", whose stage
    count `stages` must then be 0 or equal (ValueError naming both otherwise)."""
    if not model.devices:
        return StageLayout(tuple(stage_layer_bounds(shape, stages, model.layer_split,
                                                    model.placement, model.head_weight)))
    devices = tuple(model.devices)
    n = len(devices)
    if model.placement != "helr":
        if stages not in (0, n):
            raise ValueError(f"{stages_key} is {stages} but model.devices names {n} devices")
        bounds = stage_layer_bounds(shape, n, model.layer_split, model.placement,
                                    model.head_weight)
        return StageLayout(tuple(bounds), tuple(range(n)), devices)
    planner = device_planner(shape, model, dtype, gpu_memory_utilization,
                             link_bandwidth_bytes_s, link_latency_s)
    p = planner.place_helr()
    k = len(p.devices)
    if stages not in (0, k):
        names = ", ".join(devices[d] for d in p.devices)
        raise ValueError(
            f"model.placement = helr uses {k} of the {n} devices in model.devices ({names}; "
            f"{model.helr.objective} {_objective_ms(p, model.helr.objective):.3f} ms) but "
            f"{stages_key} is {stages}: set it to {k}, or to 0 to follow the placement "
            f"(`conveyor plan` shows it)")
    return StageLayout(tuple(split_layers(shape.num_layers, k, p.layers)), p.devices, devices)


def _objective_ms(p: Any, objective: str) -> float:
    return 1e3 * (p.bottleneck_s if objective == "bottleneck" else p.latency_s)


def deployment_layout(cfg: Any, shape: ModelShape) -> StageLayout:
    """stage_layout for a deployment's config (a common.config.ConveyorConfig)."""
    return stage_layout(shape, cfg.model, cfg.deployment.stages, cfg.model.dtype,
                        cfg.kvcache.gpu_memory_utilization)
