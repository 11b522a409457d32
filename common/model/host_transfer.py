"""Copies between the host and a GPU that do not stall the host more than they must.

A plain `.to("cuda")` of a host tensor (and `torch.tensor(values, device="cuda")`) waits for
the copy, and so for all the device work queued before it: a stage building its next step
would wait for the previous step's kernels to finish. From pinned (page-locked) memory with
non_blocking the copy is queued behind that work instead, and the host goes on; PyTorch's
pinned allocator keeps the pinned buffer alive until the copy has run. Back to the host, the
wait is unavoidable (the host reads the data), but a pinned destination is copied by DMA at
full speed rather than staged through a bounce buffer. On CPU both are the tensor itself.
"""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`, without waiting for the device's queued work."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the CPU, once its value is ready there (a GPU tensor goes through a pinned
    buffer; the wait is for the work that produces it, as any read of a result must)."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host
