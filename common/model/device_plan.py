"""HELR's inputs from named devices, and the figures of a placement on them.

For `model.devices` (common/costmodel/devices.py) each device's time for a stage of n layers is
the roofline's (common/costmodel/roofline.py) on one reference micro-batch (`model.helr`:
prefill tokens, decodes and their context), exactly, not a per-layer rate: a roofline step is
the larger of its compute and memory time, which is not linear in the layers. A stage fits on
its device when its weights plus a KV reserve (`model.helr.kv_reserve_tokens` tokens for each
of its layers) fit in the memory a GPU stage may use: the device's memory times
`gpu_memory_utilization`, less GPU_RESERVED_BYTES of working room, the rule the simulator and
the stage workers size their KV pools by (`gpu_kv_blocks`). A hop costs the sending device's
link (or a cluster file's [link]) for the reference micro-batch's tokens.

`DevicePlanner` answers for the placement program (common/model/helr.py), for `conveyor plan`
(`stage_rows`) and, through common/model/placement.py's `stage_layout`, for the stage workers,
the profiler and the simulator alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from common.costmodel import StepCost, hop_seconds
from common.costmodel.devices import NamedDevice, parse_devices
from common.costmodel.roofline import RooflineCostModel
from common.model.helr import DeviceCost, ModelMemory, Placement, evaluate, helr_placement
from common.model.kv_cache import GPU_RESERVED_BYTES
from common.model.shape import ModelShape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def placement_dtype_bytes(dtype: str) -> int:
    """Bytes per weight the placement plans for: `auto` is bfloat16, as on the GPUs the
    devices name (a CPU deployment planned for GPUs splits as they would)."""
    return DTYPE_BYTES.get(dtype, 2)


def gpu_kv_blocks(shape: ModelShape, layers: int, first: bool, last: bool, memory_bytes: float,
                  utilization: float, dtype_bytes: int, block_size: int) -> int:
    """KV blocks a GPU stage holds: its share (utilization) of the device's memory, less its
    weights and GPU_RESERVED_BYTES (services/stage/devices.py measures what a real worker
    uses; the simulator and the placement estimate the weights from the shape)."""
    weights = shape.stage_param_count(layers, first, last) * dtype_bytes
    budget = memory_bytes * utilization - weights - GPU_RESERVED_BYTES
    return int(budget // shape.kv_bytes_per_block(block_size, layers, dtype_bytes))


@dataclass(frozen=True)
class StageRow:
    """One stage of a placement as `conveyor plan` prints it."""

    device: str
    device_index: int
    start: int
    end: int
    step_s: float
    hop_s: float
    """To the next stage (0 for the last)."""
    weight_bytes: float
    reserve_bytes: float
    available_bytes: float
    kv_blocks: int
    """Blocks of the KV pool its memory holds after its weights."""


class DevicePlanner:
    """A model shape on a list of named devices: HELR's costs and memory, and the figures of
    any placement on them."""

    def __init__(self, shape: ModelShape, devices: Sequence[str], helr: Any, max_model_len: int,
                 dtype_bytes: int = 2, gpu_memory_utilization: float = 0.9,
                 link_bandwidth_bytes_s: float = 0.0, link_latency_s: float = 0.0):
        """helr: a common.placement_config.HelrConfig (the reference micro-batch, the KV
        reserve, the objective)."""
        self.shape, self.helr, self.dtype_bytes = shape, helr, dtype_bytes
        self.devices: list[NamedDevice] = parse_devices(devices)
        self.models = [RooflineCostModel(shape, d.spec, dtype_bytes) for d in self.devices]
        self.utilization = gpu_memory_utilization
        self.link = (link_bandwidth_bytes_s, link_latency_s)
        self.reserve_tokens = helr.reserve_tokens(max_model_len)
        self.tokens = helr.prefill_tokens + helr.decode_tokens
        self.step_s = lru_cache(maxsize=None)(self._step_s)

    def _step_s(self, device: int, layers: int, first: bool, last: bool) -> float:
        h = self.helr
        sampled = h.decode_tokens + (1 if h.prefill_tokens else 0)
        return self.models[device].stage_step_s(StepCost(
            h.prefill_tokens, h.decode_tokens, float(h.context_len), sampled, layers, first,
            last))

    def hop_s(self, device: int) -> float:
        """The reference micro-batch's activations from `device` to the next of the list."""
        return hop_seconds(self.models[device], self.tokens,
                           self.shape.hidden_size * self.dtype_bytes, *self.link)

    def available_bytes(self, device: int) -> float:
        return self.devices[device].memory_bytes * self.utilization - GPU_RESERVED_BYTES

    def weight_bytes(self, layers: int, first: bool, last: bool) -> float:
        return float(self.shape.stage_param_count(layers, first, last) * self.dtype_bytes)

    def reserve_bytes(self, layers: int) -> float:
        return float(self.reserve_tokens * self.shape.kv_size * 2 * self.dtype_bytes * layers)

    def device_costs(self) -> list[DeviceCost]:
        return [DeviceCost(d.entry, 0.0, self.available_bytes(i), hop_s=self.hop_s(i),
                           step_s=lambda n, f, lst, i=i: self.step_s(i, n, f, lst))
                for i, d in enumerate(self.devices)]

    def memory(self) -> ModelMemory:
        return ModelMemory(0.0, stage_bytes=lambda n, f, lst: self.weight_bytes(n, f, lst)
                           + self.reserve_bytes(n))

    def place_helr(self, objective: str | None = None) -> Placement:
        """HELR's placement (ValueError when the model does not fit)."""
        return helr_placement(self.device_costs(), self.shape.num_layers, self.memory(),
                              objective or self.helr.objective)

    def on_every_device(self, counts: Sequence[int]) -> Placement:
        """The figures of a split with stage i on device i (even, balanced, explicit)."""
        if len(counts) != len(self.devices):
            raise ValueError(f"{len(counts)} stages for {len(self.devices)} devices")
        return evaluate(self.device_costs(), range(len(counts)), counts)

    def stage_rows(self, placement: Placement, block_size: int = 16) -> list[StageRow]:
        rows, start = [], 0
        last = len(placement.devices) - 1
        for s, (d, n) in enumerate(zip(placement.devices, placement.layers)):
            first_end, last_end = s == 0, s == last
            rows.append(StageRow(
                self.devices[d].entry, d, start, start + n, placement.stage_s[s],
                placement.hop_s[s] if s < last else 0.0,
                self.weight_bytes(n, first_end, last_end), self.reserve_bytes(n),
                self.available_bytes(d),
                gpu_kv_blocks(self.shape, n, first_end, last_end, self.devices[d].memory_bytes,
                              self.utilization, self.dtype_bytes, block_size)))
            start += n
        return rows
