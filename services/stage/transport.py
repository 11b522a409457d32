"""Activations between consecutive stages of one instance, over torch.distributed p2p.

Each instance is its own process group (rank = stage). CPU stages use gloo. CUDA stages on
distinct GPUs use NCCL. Stages that share one GPU cannot use either directly (NCCL refuses two
ranks on one device; gloo cannot send CUDA tensors), so they stage through pinned host memory
over gloo.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


class ActivationLink:
    def __init__(self, stage: int, num_stages: int, host: str, port: int, device: torch.device,
                 shares_device: bool = False, timeout_s: float = 1800.0):
        self.stage = stage
        self.num_stages = num_stages
        self.device = device
        self._pending: tuple[dist.Work, torch.Tensor] | None = None
        if device.type == "cuda" and not shares_device:
            self.backend, self.wire_device = "nccl", device
        else:
            self.backend, self.wire_device = "gloo", torch.device("cpu")
        if num_stages > 1:
            dist.init_process_group(self.backend, init_method=f"tcp://{host}:{port}",
                                    rank=stage, world_size=num_stages,
                                    timeout=timedelta(seconds=timeout_s))

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Blocks until the previous stage's activations of the current micro-batch arrive."""
        pin = self.wire_device.type == "cpu" and self.device.type == "cuda"
        buf = torch.empty(shape, dtype=dtype, device=self.wire_device, pin_memory=pin)
        dist.recv(buf, src=self.stage - 1)
        return buf.to(self.device, non_blocking=True) if pin else buf

    def send(self, tensor: torch.Tensor) -> None:
        """Hands activations to the next stage without waiting for it to take them; only one
        send is outstanding at a time, which bounds memory and keeps micro-batches in order."""
        self.flush()
        wire = tensor.to(self.wire_device) if tensor.device != self.wire_device else tensor
        wire = wire.contiguous()
        self._pending = (dist.isend(wire, dst=self.stage + 1), wire)

    def flush(self) -> None:
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self.num_stages > 1 and dist.is_initialized():
                dist.destroy_process_group()
