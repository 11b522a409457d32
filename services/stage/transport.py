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
When a stage dies (or the controller restarts), the others leave the group and join the next
generation with its successor, without restarting (ActivationLink).
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
    """The stage's link to its neighbours in one *generation* of the instance's group.

    The controller hands out generations (JoinPipeline): at the start, and whenever a stage of
    the instance died or its controller restarted. Joining one is a step of the stage's own
    loop (`start_join`, then `try_join` until it returns True), never a blocking wait, so the
    stage keeps reading its controller meanwhile (a newer generation may come). Generation g's
    rendezvous keys live under `gen{g}/` in stage 0's store: a dead process's leftovers, or a
    survivor of an older generation, cannot join it. Each stage first counts itself in at
    `gen{g}/arrived`, and only when every stage has does it build the group (which then takes
    milliseconds). A broken group (a peer died: gloo fails its sends and receives at once with
    "Connection closed by peer") is left (`leave`) before the next one is joined."""

    def __init__(self, stage: int, num_stages: int, host: str, port: int, device: torch.device,
                 shares_device: bool = False, timeout_s: float = 1800.0):
        self.stage = stage
        self.num_stages = num_stages
        self.device = device
        self.host, self.port = host, port
        self.timeout = timedelta(seconds=timeout_s)
        self._pending: tuple[dist.Work, torch.Tensor] | None = None
        if device.type == "cuda" and not shares_device:
            self.backend, self.wire_device = "nccl", device
        else:
            self.backend, self.wire_device = "gloo", torch.device("cpu")
        self.own = source_address_towards(host) if num_stages > 1 else host
        if num_stages > 1 and self.backend == "gloo":
            _bind_gloo_to(self.own)
        self.generation = 0
        """The generation this stage is a member of; 0 while it is in none."""
        self.target = 0
        """The generation it is joining (start_join); 0 when none."""
        self._store: dist.TCPStore | None = None
        """Stage 0: the rendezvous server, kept across generations. The others: a client of
        it, dropped when it fails (stage 0 restarted)."""
        self._counted = False
        self._join_started = 0.0

    @property
    def joined(self) -> bool:
        return self.generation != 0

    def start_join(self, generation: int) -> None:
        """Leaves the current group and starts joining `generation` (try_join goes on)."""
        self.leave()
        self.target, self._counted = generation, False
        self._join_started = time.monotonic()
        if self.num_stages > 1:
            log.info("waiting for the instance's other stages at the rendezvous",
                     rendezvous=f"{self.host}:{self.port}", stages=self.num_stages,
                     listens_on=self.own, generation=generation,
                     hint="every stage of the instance must start; stage 0 serves the "
                          "rendezvous")

    def try_join(self) -> bool:
        """One step toward the generation being joined, without blocking for long; True once
        this stage is a member of it."""
        if not self.target:
            return self.joined
        if self.num_stages > 1:
            store = self._connect()
            if store is None:
                return False
            prefix = dist.PrefixStore(f"gen{self.target}/", store)
            try:
                if not self._counted:
                    prefix.add("arrived", 1)
                    self._counted = True
                if prefix.add("arrived", 0) < self.num_stages:
                    return False
            except RuntimeError:  # the store's host (stage 0) died: count in at its successor
                self._store, self._counted = None, False
                return False
            dist.init_process_group(self.backend, store=prefix, rank=self.stage,
                                    world_size=self.num_stages, timeout=self.timeout)
        self.generation, self.target = self.target, 0
        log.info("pipeline joined", rendezvous=f"{self.host}:{self.port}",
                 generation=self.generation,
                 waited_s=round(time.monotonic() - self._join_started, 1))
        return True

    def leave(self) -> None:
        """Out of the current group (a send still pending is dropped: its micro-batch is
        lost with the group). An NCCL group is not torn down in-process: with a dead peer that
        can hang, so the process exits instead (SystemExit, status 1) and its service manager
        restarts it into the next generation."""
        self._pending = None
        self.target = 0
        if self.generation and self.num_stages > 1 and dist.is_initialized():
            if self.backend == "nccl":
                log.error("leaving an NCCL pipeline group: exiting, to be restarted into the "
                          "next generation", generation=self.generation)
                raise SystemExit(1)
            dist.destroy_process_group()
        self.generation = 0

    def _connect(self) -> dist.TCPStore | None:
        if self._store is not None:
            return self._store
        if self.stage == 0:
            self._store = _serve_store(self.host, self.port, self.timeout)
        elif _accepts(self.host, self.port):  # torch's own connect would block and retry
            self._store = dist.TCPStore(self.host, self.port, None, False, self.timeout)
        return self._store

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
            if self.joined:
                self.flush()
        finally:
            if self.joined and self.num_stages > 1 and dist.is_initialized():
                dist.destroy_process_group()  # at shutdown, with every peer alive
            self.generation = 0


def _serve_store(host: str, port: int, timeout: timedelta) -> dist.TCPStore:
    """Stage 0's rendezvous store, served from a socket bound to `host` alone (torch binds its
    own listening socket to every interface). It waits for no one: the generations' counters
    do that."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    return dist.TCPStore(host, port, None, True, timeout, master_listen_fd=listener.detach())


def _accepts(host: str, port: int) -> bool:
    """Whether the rendezvous store answers: a plain connection, closed at once (the store
    ignores it), where torch's client would retry for its whole timeout, logging each try."""
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _bind_gloo_to(address: str) -> None:
    """gloo listens on the interface named by GLOO_SOCKET_IFNAME (torch 2.x ignores a gloo
    device passed in pg_options; without the variable gloo binds whatever the machine's host
    name resolves to, or falls back to loopback, where peers on other hosts cannot reach it).
    An operator's own setting wins."""
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        ifname = interface_of(address)
        if ifname is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = ifname
