"""Where a stage runs: its device, dtype, CPU threads, and how many KV blocks it can hold."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from common.config import ConveyorConfig
from common.model import ModelShape, PagedKVCache
from common.model.dtypes import resolve_dtype
from common.model.kv_cache import GPU_RESERVED_BYTES
from common.model.placement import StageLayout


@dataclass(frozen=True)
class StagePlacement:
    device: torch.device
    dtype: torch.dtype
    shares_device: bool
    """Another stage of the same instance uses this GPU (activations go through the host)."""
    workers_on_device: int
    """Stage processes of the deployment on this device (each budgets its share of a GPU)."""
    kv_num_blocks: int
    kv_memory_gib: float
    gpu_memory_utilization: float

    def kv_blocks(self, shape: ModelShape, layers: tuple[int, int], block_size: int) -> int:
        """The KV blocks this stage can hold: the configured count, else what the memory
        budget (CPU) or the free GPU memory after the weights (CUDA) allows."""
        if self.kv_num_blocks:
            return self.kv_num_blocks
        per_block = PagedKVCache.bytes_per_block(shape, block_size, layers[1] - layers[0],
                                                 self.dtype)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            if self.workers_on_device > 1:
                # Stages sharing a GPU start at once: each budgets its own share, so the first
                # to look does not take the memory of the others still loading.
                own = torch.cuda.memory_reserved(self.device)
                share = total * self.gpu_memory_utilization / self.workers_on_device
                budget = min(share - own, free) - GPU_RESERVED_BYTES
            else:
                used = total - free
                budget = total * self.gpu_memory_utilization - used - GPU_RESERVED_BYTES
        else:
            budget = self.kv_memory_gib * 1024**3
        blocks = int(budget // per_block)
        if blocks < 1:
            raise RuntimeError(f"no memory left for the KV cache on {self.device} "
                               f"({budget / 1024**3:.2f} GiB budget)")
        return blocks


def place_stage(cfg: ConveyorConfig, instance: int, stage: int,
                layout: StageLayout | None = None) -> StagePlacement:
    """With model.devices (`layout.devices`), instance i's devices are the GPUs i * len(devices)
    onwards, in the list's order, and a stage runs on the one its placement chose (HELR may
    skip some); otherwise stage s of instance i on GPU (i * stages + s) mod the GPU count."""
    dep = cfg.deployment
    use_cuda = dep.device == "cuda" or (dep.device == "auto" and torch.cuda.is_available())
    if dep.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("deployment.device is cuda but no CUDA device is visible")
    workers = dep.stages * dep.instances
    if use_cuda:
        count = torch.cuda.device_count()
        slot = instance * dep.stages + stage
        if layout is not None and layout.devices:
            slot = instance * len(layout.devices) + layout.device_index[stage]
        device = torch.device("cuda", slot % count)
        torch.cuda.set_device(device)
        if layout is not None and layout.devices:
            _check_device_kind(device, layout.device(stage))
        shares = count < dep.stages  # neighbours within the instance on the same GPU
        on_device = -(-workers // count)
    else:
        device, shares, on_device = torch.device("cpu"), False, 1
        threads = dep.threads_per_stage or max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
    dtype = resolve_dtype(cfg.model.dtype, use_cuda)
    return StagePlacement(device, dtype, shares, on_device, cfg.kvcache.num_blocks,
                          cfg.kvcache.memory_gib,
                          cfg.kvcache.gpu_memory_utilization)


def _check_device_kind(device: torch.device, planned: str) -> None:
    """The placement planned this stage for a named device; say so when the GPU is another
    (the split still runs, planned for the wrong speeds)."""
    from common.costmodel.devices import device_for_gpu, parse_device
    from common.log import get_logger

    name = torch.cuda.get_device_name(device)
    found = device_for_gpu(name)
    if found is None or found.name != parse_device(planned).spec.name:
        get_logger().warning("the placement planned this stage for another device",
                             planned=planned, device=str(device), gpu=name)
