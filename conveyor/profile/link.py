"""How long activations take between two stage processes on this host: a gloo ping-pong.

Two processes (this one and a spawned child) join a two-rank gloo group over TCP on 127.0.0.1,
as two CPU stages of an instance do (services/stage/transport.py), and bounce a float32 tensor
of a small and a large size back and forth. Half the median round trip is the one-way time;
the small size gives the latency, the difference between the sizes the bandwidth.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from common.ports import free_port

SMALL_BYTES = 4 * 1024
LARGE_BYTES = 8 * 1024 * 1024


def _ping_pong(rank: int, port: int, sizes: list[int], rounds: int, warmup: int,
               timeout_s: float) -> list[float]:
    """Half the median round trip of each size (rank 0's view; rank 1 only echoes)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=timeout_s))
    try:
        one_way = []
        for nbytes in sizes:
            buf = torch.zeros(max(1, nbytes // 4), dtype=torch.float32)
            samples = []
            for i in range(warmup + rounds):
                start = time.perf_counter()
                if rank == 0:
                    dist.send(buf, dst=1)
                    dist.recv(buf, src=1)
                else:
                    dist.recv(buf, src=0)
                    dist.send(buf, dst=0)
                if i >= warmup:
                    samples.append((time.perf_counter() - start) / 2)
            one_way.append(statistics.median(samples))
        dist.barrier()
        return one_way
    finally:
        dist.destroy_process_group()


def _echo(port: int, sizes: list[int], rounds: int, warmup: int, timeout_s: float) -> None:
    _ping_pong(1, port, sizes, rounds, warmup, timeout_s)


def measure_gloo_link(rounds: int = 20, warmup: int = 3, timeout_s: float = 60.0
                      ) -> dict[str, float | str]:
    """{bandwidth_bytes_s, latency_s, source} of a gloo link between two local processes.
    Raises RuntimeError when the measurement fails (e.g. no free port, a child crash)."""
    sizes = [SMALL_BYTES, LARGE_BYTES]
    port = free_port()
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=_echo, args=(port, sizes, rounds, warmup, timeout_s), daemon=True)
    child.start()
    try:
        small_s, large_s = _ping_pong(0, port, sizes, rounds, warmup, timeout_s)
    except Exception as e:
        raise RuntimeError(f"gloo ping-pong failed: {e}") from e
    finally:
        child.join(timeout=timeout_s)
        if child.is_alive():
            child.terminate()
            child.join()
    bandwidth = (LARGE_BYTES - SMALL_BYTES) / max(large_s - small_s, 1e-9)
    latency = max(small_s - SMALL_BYTES / bandwidth, 0.0)
    return {"bandwidth_bytes_s": bandwidth, "latency_s": latency,
            "source": f"measured: gloo send/recv ping-pong between two processes on this host "
                      f"({SMALL_BYTES} and {LARGE_BYTES} bytes, median of {rounds})"}
