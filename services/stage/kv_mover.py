"""A stage's side of live migration: copying a request's KV blocks to the stage of the same
index in another instance (identical layer splits, so block b of this stage's cache holds the
same layers there), over torch.distributed.

The transport is a pair process group per round, built from a store: each stage serves a
TCPStore of its own on `dist_host` (port chosen by the OS, reported to the controller in
KVEndpoint), and for each round the source (rank 0) and the destination (rank 1) build a
two-rank gloo group under the prefix `mig_id/round` of the source's store. Why not one group
per stage index across instances: a process belongs to one default group (its instance's
pipeline), a standing group across instances would need every instance up at once to be
built, and `conveyor serve` restarts an instance's stages alone when one dies, which no
standing group survives. A pair group costs one connection per round and involves only the
two processes concerned; gloo runs on CPU and GPU stages alike (a GPU stage stages the blocks
through host memory; NCCL pairs are not built yet).

The copy runs in a thread, so the stage's loop goes on computing micro-batches meanwhile (the
request keeps decoding at the source). The source takes its copy of the blocks out of the
cache in the loop, in the order of the controller's messages, so it holds the KV of every
micro-batch dispatched before the round; the destination writes into blocks no micro-batch
of its own touches until the controller commits the move.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from common.log import get_logger
from common.model import PagedKVCache
from common.wire.internal_messages import KVMoved, MoveKV

log = get_logger()


@dataclass
class _Job:
    msg: MoveKV
    data: torch.Tensor
    """Source: the blocks' KV (a copy); destination: the buffer to receive into."""
    blocks: list[int]


class KVMover:
    def __init__(self, kv: PagedKVCache, instance: int, stage: int, host: str,
                 timeout_s: float = 10.0):
        self.kv = kv
        self.instance, self.stage = instance, stage
        self.host = host
        self.timeout = timedelta(seconds=timeout_s)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))  # on dist_host only, as the activation store
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self.store = dist.TCPStore(host, self.port, None, True, self.timeout,
                                   master_listen_fd=listener.detach(), wait_for_workers=False)
        self._peers: dict[str, dist.TCPStore] = {}
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self.done: queue.Queue[KVMoved] = queue.Queue()
        self.wake_r, self._wake_w = os.pipe()
        """Readable when a round is done (the stage's loop polls it beside its socket)."""
        self._thread = threading.Thread(target=self._run, name="kv-mover", daemon=True)
        self._thread.start()

    def submit(self, msg: MoveKV, tables: dict[int, list[int]]) -> None:
        """Takes a round in the stage's loop: the source copies its blocks out now; the
        destination installs the request's table and receives in the background."""
        try:
            if msg.send:
                table = tables.get(msg.req_id)
                if table is None or msg.first + msg.count > len(table) or msg.count < 1:
                    raise ValueError(f"request {msg.req_id}: blocks [{msg.first}, "
                                     f"{msg.first + msg.count}) are not in its table here "
                                     f"({len(table) if table is not None else 'none'})")
                blocks = table[msg.first:msg.first + msg.count]
                data = self.kv.data[:, :, blocks]  # indexing copies: later writes miss it
                if data.device.type != "cpu":  # gloo sends host tensors
                    data = data.cpu()
            else:
                if len(msg.blocks) != msg.count or not msg.peer:
                    raise ValueError(f"request {msg.req_id}: {len(msg.blocks)} blocks for "
                                     f"{msg.count}, peer {msg.peer!r}")
                blocks = list(msg.blocks)
                tables[msg.req_id] = list(msg.table)
                shape = list(self.kv.data.shape)
                shape[2] = msg.count
                data = torch.empty(shape, dtype=self.kv.data.dtype)
        except Exception as e:  # refuse this round; the controller aborts the migration
            self._finish(msg, 0, 0.0, f"{type(e).__name__}: {e}")
            return
        self._jobs.put(_Job(msg, data, blocks))

    def drain(self) -> list[KVMoved]:
        os.read(self.wake_r, 4096)
        out = []
        while True:
            try:
                out.append(self.done.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            t0 = time.perf_counter()
            msg = job.msg
            try:
                store = self.store if msg.send else self._peer(msg.peer)
                prefix = dist.PrefixStore(f"{msg.mig_id}/{msg.round}/", store)
                group = dist.ProcessGroupGloo(prefix, 0 if msg.send else 1, 2, self._options())
                if msg.send:
                    group.send([job.data], 1, 0).wait()
                else:
                    group.recv([job.data], 0, 0).wait()
                    self.kv.data[:, :, job.blocks] = job.data.to(self.kv.data.device)
                del group
                error = ""
            except Exception as e:  # the peer died, refused, or timed out
                error = f"{type(e).__name__}: {e}"
                log.warning("KV copy failed", mig_id=msg.mig_id, round=msg.round,
                            send=msg.send, error=error)
            nbytes = job.data.numel() * job.data.element_size()
            self._finish(msg, nbytes if not error else 0, time.perf_counter() - t0, error)

    def _finish(self, msg: MoveKV, nbytes: int, seconds: float, error: str) -> None:
        self.done.put(KVMoved(msg.mig_id, self.instance, self.stage, msg.round, nbytes,
                              seconds, error))
        os.write(self._wake_w, b"x")

    def _peer(self, address: str) -> dist.TCPStore:
        store = self._peers.get(address)
        if store is None:
            host, port = address.rsplit(":", 1)
            store = self._peers[address] = dist.TCPStore(host, int(port), None, False,
                                                          self.timeout)
        return store

    def _options(self):
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host)]
        options._timeout = self.timeout
        return options
