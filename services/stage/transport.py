"""Activations between consecutive stages of one instance, over torch.distributed p2p.

Each instance is its own process group (rank = stage). CPU stages use gloo. CUDA stages on
distinct GPUs use NCCL. Stages that share one GPU cannot use either directly (NCCL refuses two
ranks on one device; gloo cannot send CUDA tensors), so they stage through pinned host memory
over gloo.

The rendezvous store (a TCPStore in stage 0) listens on the rendezvous host's address only
(torch's own `tcp://` init would listen on every interface, where anyone could write into the
store: it has no authentication), and each stage's gloo connections listen on the interface of
the address its host reaches the rendezvous host from, which on stage 0's host is that address
itself (GLOO_SOCKET_IFNAME: gloo's default device binds to whatever the machine's hostname
resolves to, or loopback). Stages may start in any
order: each waits at the rendezvous until the instance's last stage has joined, and says so.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from common.addresses import interface_of, source_address_towards
from common.log import get_logger
from common.model.host_transfer import to_host

log = get_logger()


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
            timeout = timedelta(seconds=timeout_s)
            own = source_address_towards(host)
            if self.backend == "gloo":
                _bind_gloo_to(own)
            log.info("waiting for the instance's other stages at the rendezvous",
                     rendezvous=f"{host}:{port}", stages=num_stages, listens_on=own,
                     hint="every stage of the instance must start; stage 0 serves the "
                          "rendezvous")
            t0 = time.monotonic()
            dist.init_process_group(self.backend, store=_store(host, port, stage, num_stages,
                                                               timeout),
                                    rank=stage, world_size=num_stages, timeout=timeout)
            log.info("pipeline joined", rendezvous=f"{host}:{port}",
                     waited_s=round(time.monotonic() - t0, 1))

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
        # Stages sharing a GPU: through pinned host memory (a DMA at full speed, as recv's).
        wire = to_host(tensor) if tensor.device != self.wire_device else tensor
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


def _store(host: str, port: int, stage: int, num_stages: int, timeout: timedelta
           ) -> dist.TCPStore:
    """The rendezvous store; stage 0 serves it from a socket bound to `host` alone (torch
    binds its own listening socket to every interface)."""
    if stage != 0:
        return dist.TCPStore(host, port, num_stages, False, timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    return dist.TCPStore(host, port, num_stages, True, timeout,
                         master_listen_fd=listener.detach())


def _bind_gloo_to(address: str) -> None:
    """gloo listens on the interface named by GLOO_SOCKET_IFNAME (torch 2.x ignores a gloo
    device passed in pg_options; without the variable gloo binds whatever the machine's host
    name resolves to, or falls back to loopback, where peers on other hosts cannot reach it).
    An operator's own setting wins."""
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        ifname = interface_of(address)
        if ifname is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = ifname
