"""HELR layer placement: UELLM's deployer as a dynamic program over heterogeneous devices.

placement.py splits layers over a chain of identical devices. Here each device in the chain has
its own speed, memory and link to the next: layers go in contiguous blocks, in pipeline order,
onto a subsequence of the devices (a slow device may be left out when the pipeline is faster
without it), each block's weights plus its KV reserve within that device's memory. The cost of a
placement is its bottleneck, the slowest stage or hop (a pipeline runs at that pace: the
objective for throughput), or the sum of stage and hop times (one request's way through: the
objective for latency).

    best[d][i] = min over an earlier device e and a cut j of
                 combine(best[e][j], hop(e -> d), stage(d, layers j..i))

with combine = max ("bottleneck") or + ("sum"). A hop past skipped devices goes at the slowest
link between them. O(devices^2 x layers^2): nothing at model sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

OBJECTIVES = ("bottleneck", "sum")

StageFn = Callable[[int, bool, bool], float]
"""(layers, holds the first end, holds the last end) -> a figure for that stage."""


@dataclass(frozen=True)
class DeviceCost:
    """What the program knows of one device, for a reference micro-batch."""

    name: str
    layer_s: float
    """Seconds one decoder layer takes."""
    memory_bytes: float
    """Memory for weights and KV."""
    first_s: float = 0.0
    """Extra seconds as the first stage (embeddings)."""
    last_s: float = 0.0
    """Extra seconds as the last stage (final norm, LM head, sampling)."""
    overhead_s: float = 0.0
    """Fixed seconds per step of any stage on it."""
    hop_s: float = 0.0
    """Seconds to send the step's activations from it to the next device of the chain."""
    step_s: StageFn | None = None
    """The exact seconds of a stage on it, where its time is not linear in its layers (a
    roofline's max of compute and memory time); None: the linear terms above."""


@dataclass(frozen=True)
class ModelMemory:
    layer_bytes: float
    """One decoder layer's weights plus the KV reserve it needs."""
    first_bytes: float = 0.0
    """Embeddings, on the first stage."""
    last_bytes: float = 0.0
    """Final norm and LM head, on the last stage."""
    stage_bytes: StageFn | None = None
    """The exact bytes a stage needs (tied embeddings are held once by a stage with both ends);
    None: the linear terms above."""


@dataclass(frozen=True)
class Placement:
    devices: tuple[int, ...]
    """Indices of the devices used, in pipeline order."""
    layers: tuple[int, ...]
    """Layers on each of them."""
    stage_s: tuple[float, ...]
    hop_s: tuple[float, ...]
    """Seconds of each hop between consecutive stages used."""

    @property
    def bottleneck_s(self) -> float:
        return max((*self.stage_s, *self.hop_s))

    @property
    def latency_s(self) -> float:
        return sum(self.stage_s) + sum(self.hop_s)


def stage_seconds(dev: DeviceCost, layers: int, first: bool, last: bool) -> float:
    if dev.step_s is not None:
        return dev.step_s(layers, first, last)
    return (dev.overhead_s + layers * dev.layer_s + (dev.first_s if first else 0.0)
            + (dev.last_s if last else 0.0))


def stage_bytes(mem: ModelMemory, layers: int, first: bool, last: bool) -> float:
    if mem.stage_bytes is not None:
        return mem.stage_bytes(layers, first, last)
    return layers * mem.layer_bytes + (mem.first_bytes if first else 0.0) + \
        (mem.last_bytes if last else 0.0)


def fits(dev: DeviceCost, mem: ModelMemory, layers: int, first: bool, last: bool) -> bool:
    return stage_bytes(mem, layers, first, last) <= dev.memory_bytes


def hop_seconds(devices: Sequence[DeviceCost], e: int, d: int) -> float:
    """From device e to device d > e: the slowest link on the way."""
    return max(devices[k].hop_s for k in range(e, d))


def helr_placement(devices: Sequence[DeviceCost], num_layers: int, mem: ModelMemory,
                   objective: str = "bottleneck", max_devices: int | None = None) -> Placement:
    """The best placement of `num_layers` layers on a subsequence of `devices` (at most
    `max_devices` of them). ValueError when no placement fits in memory."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r} (bottleneck or sum)")
    combine = max if objective == "bottleneck" else (lambda a, b, c: a + b + c)
    n, m = num_layers, len(devices)
    cap = min(max_devices or m, m)
    inf = float("inf")
    # best[(k, d)][i]: layers [0, i) on k stages, the last on device d; back-pointers in prev.
    best: dict[tuple[int, int], list[float]] = {}
    prev: dict[tuple[int, int, int], tuple[int, int]] = {}
    for k in range(1, cap + 1):
        for d in range(k - 1, m):
            row = [inf] * (n + 1)
            for i in range(1, n + 1):
                last = i == n
                for j in range(0, i):
                    layers = i - j
                    if k == 1:
                        if j != 0 or not fits(devices[d], mem, layers, True, last):
                            continue
                        cost, back = stage_seconds(devices[d], layers, True, last), (-1, 0)
                        if cost < row[i]:
                            row[i] = cost
                            prev[(k, d, i)] = back
                        continue
                    if not fits(devices[d], mem, layers, False, last):
                        continue
                    stage = stage_seconds(devices[d], layers, False, last)
                    for e in range(k - 2, d):
                        before = best.get((k - 1, e))
                        if before is None or before[j] == inf:
                            continue
                        cost = combine(before[j], hop_seconds(devices, e, d), stage)
                        if cost < row[i] - 1e-15:
                            row[i] = cost
                            prev[(k, d, i)] = (e, j)
            best[(k, d)] = row
    ends = [(row[n], k, d) for (k, d), row in best.items() if row[n] < inf]
    if not ends:
        raise ValueError(f"{n} layers do not fit in the devices' memory "
                         f"({', '.join(dv.name for dv in devices)})")
    # Ties: fewer devices first (less to run), then the earlier ones.
    _, k, d = min(ends, key=lambda t: (round(t[0], 15), t[1], t[2]))
    used, counts, i = [], [], n
    while k >= 1:
        e, j = prev[(k, d, i)]
        used.append(d)
        counts.append(i - j)
        k, d, i = k - 1, e, j
    used.reverse()
    counts.reverse()
    return evaluate(devices, used, counts)


def evaluate(devices: Sequence[DeviceCost], used: Sequence[int],
             counts: Sequence[int]) -> Placement:
    """The stage and hop times of a given placement (e.g. an even split, to compare)."""
    last = len(used) - 1
    stages = tuple(stage_seconds(devices[d], c, s == 0, s == last)
                   for s, (d, c) in enumerate(zip(used, counts)))
    hops = tuple(hop_seconds(devices, a, b) for a, b in zip(used, used[1:]))
    return Placement(tuple(used), tuple(counts), stages, hops)
